"""EleutherAI sparsify as the training engine on a nanochat model: the run's corpus exported as its uint16
token memmap, our nanochat class loaded by `AutoModel` and hooked by sparsify's own Trainer (a few steps
on CPU), its output folder imported into the run folder, where our loader encodes as sparsify does.
Needs sparsify (pip install eai-sparsify==1.3.3 --no-deps natsort schedulefree simple-parsing); skipped
without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel

import helpers
from helpers.collect.corpus import BUILTIN_CORPUS, collect_corpus
from helpers.collect.store import LayerStore
from helpers.model.hooks import hook_name, run_with_capture
from helpers.run import SAE_METRICS, sae_dir, update_run_json
from helpers.saes.handoff import (
    Selection,
    check_sparsify_version,
    export_sparsify_tokens,
    import_sparsify_sae,
    sparsify_command,
)
from helpers.saes.io import load_sae
from helpers.saes.sparsify_main import register
from tests.model.nanochat_oracle import write_tiny_2026_checkpoint

sparsify = pytest.importorskip("sparsify")
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer  # noqa: E402
from sparsify.data import MemmapDataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYER, SEQ = 1, 32


@pytest.fixture(scope="module")
def nanochat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsify")
    native = write_tiny_2026_checkpoint(root / "native", n_layer=3, n_embd=64, seq_len=64)
    lm = helpers.load_model(str(native), device="cpu", cache_dir=root / "cache")
    run = root / "run"
    update_run_json(run, model={"spec": "tiny-nanochat", "n_layers": 3, "d_model": 64}, layers=[LAYER])
    collect_corpus(lm, BUILTIN_CORPUS, [LAYER], run, max_tokens=1600, seq_len=SEQ, batch_size=8)
    return lm, run


def test_sparsify_trains_on_our_nanochat_and_its_sae_comes_back(nanochat_run, tmp_path):
    lm, run = nanochat_run
    sel = Selection(run, LAYER, kinds=("corpus",))
    manifest = export_sparsify_tokens(sel, tmp_path / "tokens.bin")
    data = MemmapDataset(str(tmp_path / "tokens.bin"), manifest["ctx_len"])
    assert manifest["ctx_len"] == SEQ and len(data) == manifest["n_rows"] > 8
    _, store, ids = sel.sources()[0]
    want = np.concatenate([store.token_ids_of(i)[:, 0] for i in ids])[: len(data) * SEQ]
    got = np.concatenate([np.asarray(data[i]["input_ids"]) for i in range(len(data))])
    assert np.array_equal(got, want)

    register()
    model = AutoModel.from_pretrained(lm.info.path).eval()  # how sparsify's command line loads it
    assert type(model).__name__ == "NanoChatGPTForCausalLM"
    # sparsify's hookpoint h.1 (a module of model.base_model, whose output it reads) is our layer-1 hook
    seen = []
    handle = dict(model.base_model.named_modules())[f"h.{LAYER}"].register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    batch = torch.from_numpy(data[0]["input_ids"].numpy().astype(np.int64))[None]
    with torch.no_grad():
        model(batch)
    handle.remove()
    ours = run_with_capture(model, [hook_name(LAYER)], input_ids=batch)[hook_name(LAYER)]
    torch.testing.assert_close(seen[0], ours)
    cfg = TrainConfig(
        SparseCoderConfig(k=4, expansion_factor=2),
        batch_size=4,
        hookpoints=[f"h.{LAYER}"],
        log_to_wandb=False,
        save_dir=str(tmp_path / "out"),
        run_name="r",
        optimizer="adam",
        lr_warmup_steps=1,
    )
    Trainer(cfg, data, model).fit()
    folder = tmp_path / "out" / "r" / f"h.{LAYER}"
    assert (folder / "cfg.json").exists() and (folder / "sae.safetensors").exists()

    sae_id = import_sparsify_sae(folder, sel)
    assert sae_id == "tiny-nanochat_topk-sparsify_L1_corpus"
    metrics = json.loads((sae_dir(run, sae_id) / SAE_METRICS).read_text())
    assert metrics["layer"] == LAYER and 0 < metrics["activations"]["l0"] <= 4
    ours = load_sae(sae_dir(run, sae_id)).sae
    theirs = SparseCoder.load_from_disk(folder, device="cpu")
    x = torch.from_numpy(LayerStore(run, LAYER, kind="corpus").tokens_of(ids[0]))
    with torch.no_grad():
        out = theirs.encode(x)
        dense = torch.zeros(len(x), theirs.num_latents).scatter_(1, out.top_indices, out.top_acts)
        torch.testing.assert_close(ours.encode(x)[0], dense, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            ours.decode(dense), theirs.decode(out.top_acts, out.top_indices), rtol=1e-4, atol=1e-4
        )


def test_commands_and_refusals(nanochat_run, tmp_path):
    _, run = nanochat_run
    one = sparsify_command("/content/model", "/content/tokens.bin", [1, 2], ctx_len=256)
    assert one.startswith(
        "python -m helpers.saes.sparsify_main /content/model "
        "/content/tokens.bin --ctx_len 256 --hookpoints h.1 h.2"
    )
    assert sparsify_command("m", "t.bin", [1], ctx_len=64, n_gpus=8).startswith(
        "torchrun --nproc_per_node 8 -m helpers.saes.sparsify_main"
    )
    with pytest.raises(ValueError, match=r"sparsify 2.0.0 .*tested: 1.3.3"):
        check_sparsify_version("2.0.0")
    sel = Selection(run, LAYER, kinds=("corpus",))
    with pytest.raises(ValueError, match="65,536"):
        export_sparsify_tokens(sel, tmp_path / "t.bin", vocab_size=200_000)
    with pytest.raises(ValueError, match="larger than the"):
        export_sparsify_tokens(sel, tmp_path / "t.bin", ctx_len=10**7)
    with pytest.raises(ValueError, match="export the corpus"):
        export_sparsify_tokens(Selection(run, LAYER), tmp_path / "t.bin")
    export_sparsify_tokens(sel, tmp_path / "t.bin")
    before = (tmp_path / "t.bin").read_bytes()
    with pytest.raises(FileExistsError, match="nothing was changed"):
        export_sparsify_tokens(sel, tmp_path / "t.bin", ctx_len=16)
    assert (tmp_path / "t.bin").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp*"))
