"""Every nanochat layout against upstream's own code (../shared/oracles, three commits).

For each commit a small random `GPT` is built with upstream's code (weights perturbed: its init zeroes
projections), saved as nanochat saves a checkpoint, loaded with `load_model` (2025 layout: transformers'
NanoChatForCausalLM; 2026 layouts: our NanoChatGPTForCausalLM) and compared with upstream: logits and the
residual stream after every block, in fp32 and bf16; KV-cached batched sampling against upstream's full
forward pass; padded batches against the unpadded sequences; steering at a block against the same vector
added to upstream's block; the chat prompt and stop tokens against upstream's renderer and engine.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import helpers
from helpers.collect.sampling import generate_batch
from helpers.model import nanochat, nanochat_layouts
from helpers.model.chat import cache_kwarg, encode_chat, stop_token_ids
from helpers.model.hooks import add_to_residual, capture, hook_name, hook_points
from tests.model.nanochat_oracle import (
    COMMITS,
    LAYOUT_OF,
    LONG,
    block_outputs,
    build_oracle,
    import_oracle,
    oracle_dir,
    sample_ids,
    save_native,
    tiny_encoding,
    write_tiny_2026_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=COMMITS)
def case(request, tmp_path_factory):
    """(commit, upstream model fp32, its model_config, the LoadedModel, the native folder, the cache dir)."""
    commit = request.param
    oracle_dir(commit)  # skips with the reason when ../shared/oracles is absent
    model, model_config = build_oracle(commit)
    root = tmp_path_factory.mktemp(commit)
    # The 2026-07 checkpoint carries torch.compile's `_orig_mod.` prefix, as a compiled training run saves it.
    native = save_native(model, model_config, root / "native", compile_prefix=commit.startswith("2026-07"))
    lm = helpers.load_model(str(native), device="cpu", cache_dir=root / "cache")
    return commit, model, model_config, lm, native, root / "cache"


def _batch(commit: str) -> torch.Tensor:
    return torch.tensor([sample_ids(LONG[commit], seed=1), sample_ids(LONG[commit], seed=2)])


def test_layout_detected_and_class_chosen(case):
    commit, _, _, lm, _, _ = case
    assert lm.info.layout == LAYOUT_OF[commit]
    assert lm.info.family == "nanochat" and lm.info.chat_format == "nanochat" and lm.info.dtype == "float32"
    want = "NanoChatForCausalLM" if commit.startswith("2025") else "NanoChatGPTForCausalLM"
    assert type(lm.model).__name__ == want
    assert lm.model.config.vocab_size == tiny_encoding().n_vocab == len(lm.tokenizer)


def test_logits_and_every_residual_match_upstream_fp32(case):
    commit, model, _, lm, _, _ = case
    ids = _batch(commit)
    want_logits, want_blocks = block_outputs(model, ids)
    with capture(lm.model, hook_points(lm.model)) as got, torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == want_logits.shape == (2, LONG[commit], 277)
    torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-5)
    assert len(got) == len(want_blocks) == model.config.n_layer
    for i, want in enumerate(want_blocks):
        torch.testing.assert_close(got[hook_name(i)], want, atol=5e-5, rtol=1e-5, msg=f"layer {i}")


def _upstream_bf16(commit: str, fp32_model):
    """Upstream's code computing in bf16 end to end on the same weights, as our bf16 model does: the
    2026-03+ code in its own NANOCHAT_DTYPE=bfloat16 mode (bf16 matmuls, embeddings and activations);
    the older code with its weights cast to bf16 (its training used autocast, which keeps an fp32 residual
    stream and is more precise than any pure-bf16 model: 0.038 vs 0.058 max logit error on 2026-01)."""
    if not commit.startswith("2026-07"):
        return copy.deepcopy(fp32_model).to(torch.bfloat16)
    gpt = import_oracle(commit, compute_dtype="bfloat16")
    with torch.device("meta"):
        model = gpt.GPT(fp32_model.config)
    model.to_empty(device="cpu")
    model.init_weights()  # bf16 rotary tables, bf16 embeddings
    model.load_state_dict(fp32_model.state_dict())  # copies, casting into each parameter's dtype
    return model.eval()


def test_bf16_error_is_within_upstreams_own_bf16_error(case):
    """No fixed tolerance: our bf16 model may differ from upstream's fp32 by at most 1.5x what upstream's
    own bf16 mode differs from it, per layer and for the logits (bf16 keeps 8 bits of mantissa)."""
    commit, model, _, _, native, cache = case
    lm16 = helpers.load_model(str(native), device="cpu", cache_dir=cache, dtype=torch.bfloat16)
    assert lm16.info.dtype == "bfloat16"
    ids = _batch(commit)
    ref_logits, ref_blocks = block_outputs(model, ids)
    up_logits, up_blocks = block_outputs(_upstream_bf16(commit, model), ids)
    with capture(lm16.model, hook_points(lm16.model)) as got, torch.no_grad():
        logits = lm16.model(ids).logits

    def err(a, b):
        return float((a.float() - b.float()).abs().max())

    assert 0 < err(up_logits, ref_logits) < 0.5, "upstream's bf16 mode should differ a little from fp32"
    assert err(logits, ref_logits) <= 1.5 * err(up_logits, ref_logits)
    for i, ref in enumerate(ref_blocks):
        assert err(got[hook_name(i)], ref) <= 1.5 * err(up_blocks[i], ref) + 1e-6, f"layer {i}"


def _padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), 268)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_the_unpadded_sequences(case, side):
    """Left padding is the sampler's, right padding the capture's; positions come from the mask (the
    sampler also passes them explicitly, which is what the 2025 transformers class needs)."""
    commit, model, _, lm, _, _ = case
    n = LONG[commit]
    rows = [sample_ids(n, seed=3), sample_ids(n - 13, seed=4)]
    ids, mask = _padded(rows, side)
    kwargs = {"attention_mask": mask}
    if commit.startswith("2025") or side == "left":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with capture(lm.model, hook_points(lm.model)) as got, torch.no_grad():
        logits = lm.model(ids, **kwargs).logits
    assert torch.isfinite(logits).all(), "padded positions must not produce NaN"
    for b, row in enumerate(rows):
        want_logits, want_blocks = block_outputs(model, torch.tensor([row]))
        real = mask[b].bool()
        torch.testing.assert_close(logits[b, real], want_logits[0], atol=2e-5, rtol=1e-5)
        for i, want in enumerate(want_blocks):
            torch.testing.assert_close(got[hook_name(i)][b, real], want[0], atol=5e-5, rtol=1e-5)
    if not commit.startswith("2025"):  # our class derives the positions itself from the mask
        with torch.no_grad():
            derived = lm.model(ids, attention_mask=mask).logits
        torch.testing.assert_close(derived, logits, atol=0, rtol=0)


def test_kv_cached_batched_sampling_equals_full_forward(case):
    """The sampler's greedy, KV-cached, left-padded batch (rows leaving as they stop) picks, token by token,
    the argmax of upstream's full forward pass over the same tokens; long enough for the window to bite."""
    commit, model, _, lm, _, _ = case
    n = LONG[commit]
    prompts = [sample_ids(n - 20, seed=5), sample_ids(n - 8, seed=6), sample_ids(n - 20, seed=5)]
    stop = sample_ids(1)[0]  # bos ends a row, as in upstream's engine
    out = generate_batch(
        lm.model,
        prompts,
        [torch.Generator().manual_seed(i) for i in range(3)],
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=12,
        stop_ids=[stop],
        pad_id=stop,
    )
    assert out[0] == out[2], "a repeated prompt samples the same greedy tokens"
    for prompt, (tokens, _stopped) in zip(prompts, out, strict=True):
        assert tokens, "greedy decoding produced nothing"
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens]))[0]
        assert logits[len(prompt) - 1 :].argmax(-1).tolist()[: len(tokens)] == tokens


def test_incremental_decoding_logits_match_upstream(case):
    """Prefill a left-padded batch into a DynamicCache, then decode one token at a time, as the sampler
    does: every step's logits equal upstream's full forward pass at that position."""
    from transformers import DynamicCache

    commit, model, _, lm, _, _ = case
    n = LONG[commit]
    rows = [sample_ids(n, seed=7), sample_ids(n - 9, seed=8)]
    start = n - 20
    ids, mask = _padded([r[: start - (n - len(r))] for r in rows], "left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.model.config)
    steps = []
    with torch.no_grad():
        steps.append(
            lm.model(
                ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(lm.model): cache}
            ).logits[:, -1]
        )
        next_pos = pos[:, -1] + 1
        for t in range(20 - 1):
            col = [r[start - (n - len(r)) + t] for r in rows]
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = lm.model(
                torch.tensor(col)[:, None],
                attention_mask=mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_kwarg(lm.model): cache},
            )
            steps.append(out.logits[:, -1])
            next_pos = next_pos + 1
    got = torch.stack(steps, 1)  # [2, 20, vocab]
    for b, row in enumerate(rows):
        want = block_outputs(model, torch.tensor([row]))[0][0]  # [len, vocab]
        first = start - (n - len(row)) - 1
        torch.testing.assert_close(got[b], want[first : first + 20], atol=2e-5, rtol=1e-5)


def test_steering_a_block_equals_adding_to_upstreams_block(case):
    """`add_to_residual` at blocks.{i}.hook_resid_post = the vector added to the output of upstream's
    block i (before the next block's lambdas; for the middle block, also what backout subtracts)."""
    commit, model, _, lm, _, _ = case
    ids = _batch(commit)[:1]
    layer = model.config.n_layer // 2
    vec = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(9))
    handle = model.transformer.h[layer].register_forward_hook(lambda _m, _i, out: out + vec)
    try:
        with torch.no_grad():
            want = model(ids)
    finally:
        handle.remove()
    with add_to_residual(lm.model, {hook_name(layer): vec}), torch.no_grad():
        got = lm.model(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        assert (lm.model(ids).logits - want).abs().max() > 1e-3, "the vector must change the output"


def test_chat_prompt_and_stop_tokens_match_upstream(case):
    """Every layout's tokenizer has the same special tokens, upstream's (the oracle's encodings take ours);
    our prompt is upstream's render_for_completion (system merged into the first user turn) and we stop
    where upstream's engine stops."""
    commit, _, _, lm, _, _ = case
    tokenizer = import_oracle(commit, "tokenizer")
    assert list(nanochat.SPECIAL_TOKENS) == tokenizer.SPECIAL_TOKENS
    upstream = tokenizer.RustBPETokenizer(tiny_encoding(), "<|bos|>")
    conversation = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello world, the thing"},
            {"role": "assistant", "content": ""},
        ]
    }
    assert encode_chat(lm.tokenizer, "hello world, the thing", system="Be brief.") == (
        upstream.render_for_completion(conversation)
    )
    assert stop_token_ids(lm.tokenizer) == [
        upstream.encode_special("<|assistant_end|>"),
        upstream.get_bos_token_id(),
    ]


def test_chat_reply_is_the_samplers_greedy_reply(case):
    """helpers.chat (its own KV-cached loop, no generate) decodes what the batched sampler decodes."""
    _, _, _, lm, _, _ = case
    prompt = encode_chat(lm.tokenizer, "hello world")
    stops = stop_token_ids(lm.tokenizer)
    ((tokens, _),) = generate_batch(
        lm.model,
        [prompt],
        [torch.Generator()],
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=10,
        stop_ids=stops,
        pad_id=stops[-1],
    )
    assert (
        helpers.chat(lm, "hello world", max_new_tokens=10)
        == lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    )


def test_second_load_comes_from_the_conversion_cache(case, tmp_path):
    commit, model, _, lm, native, cache = case
    config = Path(lm.info.path) / "config.json"
    stamp = config.stat().st_mtime_ns
    again = helpers.load_model(str(native), device="cpu", cache_dir=cache)
    assert again.info.path == lm.info.path and config.stat().st_mtime_ns == stamp
    folder = helpers.load_model(lm.info.path, device="cpu", cache_dir=tmp_path)  # the converted folder itself
    assert folder.info.source == "folder" and folder.info.layout == LAYOUT_OF[commit]
    ids = _batch(commit)
    with torch.no_grad():
        torch.testing.assert_close(folder.model(ids).logits, model(ids), atol=2e-5, rtol=1e-5)


def test_overrides_change_the_model_and_survive_run_json(tmp_path):
    commit = COMMITS[2]
    oracle_dir(commit)
    model, model_config = build_oracle(commit)
    native = save_native(model, model_config, tmp_path / "native")
    cache = tmp_path / "cache"
    plain = helpers.load_model(str(native), device="cpu", cache_dir=cache)
    lm = helpers.load_model(str(native), device="cpu", cache_dir=cache, nanochat_overrides={"qk_scale": 1.0})
    assert lm.info.path != plain.info.path, "each set of overrides has its own conversion"
    assert (lm.model.config.qk_scale, plain.model.config.qk_scale) == (1.0, 1.2)
    assert lm.info.nanochat_overrides == {"qk_scale": 1.0}
    typed = helpers.load_model(
        str(native), device="cpu", cache_dir=cache, nanochat_overrides='{"qk_scale": 1.0}'
    )
    assert typed.info.path == lm.info.path, "notebook 01's JSON text is the same overrides"
    ids = _batch(commit)
    with torch.no_grad():
        assert (lm.model(ids).logits - model(ids)).abs().max() > 1e-3
    run = tmp_path / "run"
    helpers.update_run_json(run, model=lm.info.to_dict())
    again = helpers.load_run_model(run, device="cpu", cache_dir=cache)
    assert again.info.path == lm.info.path and again.model.config.qk_scale == 1.0
    with pytest.raises(ValueError, match=r"\['rope_base'\] do not apply.*rope_theta"):
        helpers.load_model(str(native), device="cpu", cache_dir=cache, nanochat_overrides={"rope_base": 1})


def test_the_2025_layout_takes_only_the_overrides_transformers_can_hold(tmp_path):
    commit = COMMITS[0]
    oracle_dir(commit)
    model, model_config = build_oracle(commit)
    native = save_native(model, model_config, tmp_path / "native")
    with pytest.raises(ValueError, match=r"\['qk_scale'\] do not apply to the 2025-10 layout"):
        helpers.load_model(
            str(native), device="cpu", cache_dir=tmp_path / "c", nanochat_overrides={"qk_scale": 1.2}
        )
    lm = helpers.load_model(
        str(native), device="cpu", cache_dir=tmp_path / "c", nanochat_overrides={"logit_softcap": 20}
    )
    assert lm.model.config.final_logit_softcapping == 20.0


def test_padded_vocabulary_of_a_2025_layout_is_cropped(tmp_path):
    """From 2025-12-09 nanochat pads wte/lm_head to a multiple of 64 and crops the logits to vocab_size."""
    commit = COMMITS[0]
    oracle_dir(commit)
    model, model_config = build_oracle(commit)
    g = torch.Generator().manual_seed(10)
    sd = dict(model.state_dict())
    for key in ("transformer.wte.weight", "lm_head.weight"):
        sd[key] = torch.cat([sd[key], torch.randn(320 - sd[key].shape[0], sd[key].shape[1], generator=g)])
    native = save_native(model, model_config, tmp_path / "native", state_dict=sd)
    lm = helpers.load_model(str(native), device="cpu", cache_dir=tmp_path / "cache")
    assert lm.model.config.vocab_size == 277 == len(lm.tokenizer)
    ids = _batch(commit)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, model(ids), atol=0, rtol=0)


@pytest.mark.parametrize("edit", ["drop smear_lambda", "add engram.weight"])
def test_unknown_layout_is_refused_with_keys_and_layouts(tmp_path, edit):
    commit = COMMITS[2]
    oracle_dir(commit)
    model, model_config = build_oracle(commit)
    sd = dict(model.state_dict())
    if edit.startswith("drop"):
        del sd["smear_lambda"]
        expect = r"missing keys \['smear_lambda'\]"
    else:
        sd["engram.weight"] = torch.zeros(3, 4)
        expect = r"unexpected keys \['engram\.weight'\]"
    native = save_native(model, model_config, tmp_path / "native", state_dict=sd)
    with pytest.raises(
        nanochat_layouts.UnknownLayoutError, match=rf"Closest is 2026-03-14: {expect}.*Known layouts: 2025-10"
    ):
        helpers.load_model(str(native), device="cpu", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "converted").exists() or not any(
        (tmp_path / "cache" / "converted").iterdir()
    )


def test_conversion_keeps_each_tensor_dtype_and_records_the_behaviour(tmp_path):
    """nanochat keeps embeddings in bf16 and matrices in fp32: the cache keeps both, and config.json says
    which behaviour was inferred."""
    commit = COMMITS[2]
    oracle_dir(commit)
    model, model_config = build_oracle(commit)
    sd = {
        k: v.bfloat16() if k.startswith(("transformer.wte", "value_embeds")) else v
        for k, v in model.state_dict().items()
    }
    native = save_native(model, model_config, tmp_path / "native", state_dict=sd)
    out = nanochat.convert_native_checkpoint(native, tmp_path / "hf")
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert (
        saved["transformer.wte.weight"].dtype == torch.bfloat16
        and saved["lm_head.weight"].dtype == torch.float32
    )
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["layout"],
        cfg["rope_theta"],
        cfg["qk_scale"],
        cfg["ve_gate_scale"],
        cfg["smear_channels"],
    ) == (
        "2026-03-14",
        100000.0,
        1.2,
        3.0,
        24,
    )
    assert cfg["attention_windows"] == [128, 128, 512, 512]  # "SSL" tiled, last layer long


def test_hub_repo_with_2026_native_files_loads_and_is_cached(tmp_path, monkeypatch):
    """A Hub repo holding a 2026-layout native checkpoint (the Hub is unreachable here: huggingface_hub's two
    calls serve a local folder laid out as the repo) converts once into our class; the next load makes no
    call."""
    import huggingface_hub

    repo_dir = write_tiny_2026_checkpoint(tmp_path / "repo", n_layer=2, seq_len=256)
    calls = []

    def list_repo_files(repo, revision=None):
        calls.append("list")
        return sorted(p.name for p in repo_dir.iterdir())

    def hf_hub_download(repo, filename, revision=None):
        calls.append(filename)
        return str(repo_dir / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    lm = helpers.load_model("someone/nanochat-2026", device="cpu", cache_dir=tmp_path / "cache")
    assert (lm.info.source, lm.info.layout, type(lm.model).__name__) == (
        "nanochat-native",
        "2026-03-14",
        "NanoChatGPTForCausalLM",
    )
    assert calls == ["list", "model_000010.pt", "meta_000010.json", "tokenizer.pkl"]
    calls.clear()
    again = helpers.load_model("someone/nanochat-2026", device="cpu", cache_dir=tmp_path / "cache")
    assert calls == [] and again.info.path == lm.info.path
