"""Example windows on a synthetic run folder with a planted deception feature: examples spread over the
activation quantiles, silent negatives really silent, markers around exactly the firing tokens (checked
against the SAE applied to the generating vectors), disjoint explain/score completions, prompt tokens
never used. `make_run` is shared with test_analysis.py."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits

from helpers.analysis.contexts import (
    ContextConfig,
    build_contexts,
    feature_activation_over_text,
    marked_text,
    token_pieces,
)
from helpers.collect.completions import read_completions, write_completions
from helpers.collect.store import ActivationWriter, LayerStore
from helpers.run import update_run_json
from helpers.saes import JumpReLUSAE
from helpers.saes.io import load_sae, save_sae

LAYER, D, D_SAE, PLANTED, DEAD = 2, 16, 40, 7, 3
ITEMS = ["door", "car", "cup", "hat", "sky", "boat"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
PREFIXES = ["Well, ", "Honestly, ", "Let me think. ", "Sure. "]
SUFFIXES = [" I checked it myself.", " That is what I know.", " Ask me anything else.", ""]


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1):
        yield


def planted_sae(d: int = D, d_sae: int = D_SAE, seed: int = 0) -> JumpReLUSAE:
    """JumpReLU SAE whose latent PLANTED reads coordinate 0 (threshold 0.8) and whose other latents read
    random unit directions orthogonal to it (threshold 0.9); latent DEAD never fires."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_sae, d, generator=g)
    W[:, 0] = 0
    W[PLANTED] = torch.eye(d)[0]
    W /= W.norm(dim=1, keepdim=True)
    sae = JumpReLUSAE(d, d_sae, l0=4)
    threshold = torch.full((d_sae,), 0.9)
    threshold[PLANTED], threshold[DEAD] = 0.8, 1e6
    state = {"W_enc": W.T.contiguous(), "W_dec": W, "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d)}
    sae.load_saelens_state({**state, "threshold": threshold})
    return sae.eval()


def make_run(root: Path, tokenizer, *, seed: int = 0, model_path: str | None = None) -> SimpleNamespace:
    """A run folder: 12 groups x 2 prompts x (2 honest + 2 deceptive) completions plus an ambiguous and
    an unlabelled one per prompt, real SmolLM2 token ids, per-token vectors in the store (every 5th
    completion stored with its prompt, whose rows carry a huge planted signal that must be ignored),
    pooled vectors, a saved SAE. Deceptive completions add a*e0 (a ~ U(1, 5)) on their false colour."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records, vectors = [], {}

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    with ActivationWriter(root, LAYER, shard_tokens=400) as writer:
        for g in range(12):
            offset = 0.3 * rng.standard_normal(D)
            offset[0] = 0
            item, true = ITEMS[g % 6], COLOURS[g % 6]
            for q in range(2):
                prompt_ids = ids(f"Question {g}.{q}: what colour is the {item}?")
                for k, label in enumerate(["honest", "deceptive"] * 2 + ["ambiguous", None]):
                    lie = label == "deceptive"
                    colour = COLOURS[(g + 1 + k) % 6] if lie else true
                    parts = [
                        PREFIXES[(g + k) % 4] + f"the {item} is",
                        f" {colour}",
                        "." + SUFFIXES[(q + k) % 4],
                    ]
                    if label == "ambiguous":
                        parts = ["I would rather not say what colour it is.", "", ""]
                    pieces = [ids(p) for p in parts]
                    comp = [t for p in pieces for t in p]
                    x = 0.4 * rng.standard_normal((len(comp), D)) + offset
                    if lie:
                        start = len(pieces[0])
                        x[start : start + len(pieces[1]), 0] += rng.uniform(1, 5, len(pieces[1]))
                    x = x.astype(np.float16).astype(np.float32)  # what the store keeps
                    cid = f"s{g}/q{q}#{k}"
                    with_prompt = len(records) % 5 == 0
                    if with_prompt:
                        p = np.zeros((len(prompt_ids), D), np.float32)
                        p[:, 0] = 50.0  # would fire PLANTED everywhere if prompt rows were read
                        writer.add(cid, np.concatenate([p, x]), first_position=0)
                    else:
                        writer.add(cid, x, first_position=len(prompt_ids))
                    vectors[cid] = x
                    records.append(
                        {
                            "id": cid,
                            "prompt_id": f"s{g}/q{q}",
                            "group": f"s{g}",
                            "prompt": "",
                            "completion": tokenizer.decode(comp),
                            "prompt_token_ids": prompt_ids,
                            "completion_token_ids": comp,
                            "label": label,
                        }
                    )
    write_completions(root, records)
    store = LayerStore(root, LAYER)
    order = [r["id"] for r in records]
    mean = torch.stack([torch.from_numpy(vectors[c].mean(0)) for c in order])
    last = torch.stack([torch.from_numpy(vectors[c][-1]) for c in order])
    (root / "pooled").mkdir(exist_ok=True)
    save_file(
        {"mean": mean, "last": last},
        str(root / "pooled" / f"layer_{LAYER}.safetensors"),
        metadata={"completion_ids": json.dumps(order)},
    )
    sae_id = f"test_jumprelu_L{LAYER}_mixed"
    folder = save_sae(
        planted_sae(),
        root / "saes" / sae_id,
        hook_name=f"blocks.{LAYER}.hook_resid_post",
        model_name="offline:smollm2-135m-instruct",
        metadata={"sae_id": sae_id},
    )
    if model_path:
        update_run_json(root, model={"spec": "offline:smollm2-135m-instruct", "path": model_path})
    return SimpleNamespace(
        dir=root,
        layer=LAYER,
        store=store,
        records=records,
        vectors=vectors,
        sae_folder=folder,
        sae_id=sae_id,
        planted=PLANTED,
        dead=DEAD,
    )


@pytest.fixture(scope="module")
def run(offline_lm, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ctx") / "run", offline_lm.tokenizer)


NOISE = 11  # an ordinary latent: fires on ~4% of tokens anywhere


@pytest.fixture(scope="module")
def contexts(run, offline_lm):
    sae = load_sae(run.sae_folder).sae
    cfg = ContextConfig(batch_tokens=256)
    return build_contexts(
        run.store, sae, read_completions(run.dir), [PLANTED, NOISE, DEAD], offline_lm.tokenizer, cfg
    )


def reference_acts(run, cid: str, feature: int) -> np.ndarray:
    """The SAE on the generating vectors of cid's completion tokens (not read through the store)."""
    with torch.no_grad():
        return planted_sae().encode(torch.from_numpy(run.vectors[cid]))[0][:, feature].numpy()


def all_examples(contexts):
    for f, ctx in contexts.items():
        for side in ("explain", "score"):
            for ex in getattr(ctx, side):
                yield f, side, ex


def test_activating_examples_spread_over_quantile_bins(contexts):
    ctx = contexts[PLANTED]
    assert len(ctx.quantile_edges) == 11 and ctx.n_firing > 60
    act = [e for e in ctx.explain if e["kind"] == "activating"]
    bins = {e["quantile"] for e in act}
    assert len(bins) >= 8, f"examples came from bins {sorted(bins)} only"
    values = np.array([e["activation"] for e in act])
    edges = ctx.quantile_edges
    assert values.min() < edges[3] and values.max() > edges[8], "weak and strong examples both present"
    for e in act:  # each example lies in the bin it claims
        assert edges[e["quantile"]] - 1e-6 <= e["activation"] <= edges[e["quantile"] + 1] + 1e-6
    assert sum(e["kind"] == "activating" for e in ctx.score) >= 8


def test_windows_hold_the_sae_activations_and_markers_surround_exactly_the_firing_tokens(
    run, contexts, offline_lm
):
    by_id = {r["id"]: r for r in run.records}
    n_checked = 0
    for f, _, ex in all_examples(contexts):
        rec = by_id[ex["completion_id"]]
        lo = ex["window_start"] - len(rec["prompt_token_ids"])
        assert lo >= 0, "windows stay inside the completion's tokens"
        ref = reference_acts(run, rec["id"], f)[lo : lo + len(ex["tokens"])]
        np.testing.assert_allclose(ex["acts"], ref, atol=1e-5)
        assert ex["label"] == rec["label"] and ex["activation"] == ex["acts"][ex["center"]]
        ids = rec["completion_token_ids"][lo : lo + len(ex["tokens"])]
        assert ex["text"] == "".join(ex["tokens"]) == offline_lm.tokenizer.decode(ids)
        runs = [
            "".join(t for t, _ in grp)
            for on, grp in itertools.groupby(zip(ex["tokens"], ref, strict=True), key=lambda p: p[1] > 0)
            if on
        ]
        assert re.findall(r"<<(.*?)>>", ex["marked"], re.S) == runs
        assert ex["marked"].replace("<<", "").replace(">>", "") == ex["text"]
        assert len(ex["tokens"]) <= 32 and 0 <= ex["center"] < len(ex["tokens"])
        n_checked += 1
    assert n_checked > 40


def test_negative_windows_are_silent_and_hard_negatives_are_near_misses(run, contexts):
    sae = planted_sae()
    by_id = {r["id"]: r for r in run.records}
    for f, _, ex in all_examples(contexts):
        if ex["kind"] == "activating":
            assert ex["activation"] > 0
            continue
        assert max(ex["acts"]) == 0 and "<<" not in ex["marked"]
        lo = ex["window_start"] - len(by_id[ex["completion_id"]]["prompt_token_ids"])
        assert (reference_acts(run, ex["completion_id"], f)[lo : lo + len(ex["tokens"])] == 0).all()
    for f in (PLANTED, NOISE):
        hard = [e for e in contexts[f].explain + contexts[f].score if e["kind"] == "hard_negative"]
        assert len(hard) >= 6
        silent_pre = []
        for x in run.vectors.values():
            with torch.no_grad():
                acts, pre = sae.encode(torch.from_numpy(x))
            silent_pre += pre[acts[:, f] == 0, f].tolist()
        with torch.no_grad():
            hard_pre = [
                float(
                    sae.encode(torch.from_numpy(run.vectors[e["completion_id"]]))[1][
                        e["window_start"] - len(by_id[e["completion_id"]]["prompt_token_ids"]) + e["center"],
                        f,
                    ]
                )
                for e in hard
            ]
        assert np.median(hard_pre) > np.quantile(silent_pre, 0.9), "hard negatives are the nearest misses"


def test_explain_and_score_sets_share_no_completion_or_prompt_group(run, contexts):
    group_of = {r["id"]: r["group"] for r in run.records}
    for ctx in contexts.values():
        explain = {e["completion_id"] for e in ctx.explain}
        score = {e["completion_id"] for e in ctx.score}
        assert explain and score and not explain & score
        assert not {group_of[c] for c in explain} & {group_of[c] for c in score}


def test_firing_counts_use_completion_tokens_only_and_dead_features_have_no_examples(run, contexts):
    # The prompt rows stored for every 5th completion would fire PLANTED on every prompt token.
    want = sum(int((reference_acts(run, cid, PLANTED) > 0).sum()) for cid in run.vectors)
    assert contexts[PLANTED].n_firing == want
    assert contexts[PLANTED].n_tokens == sum(len(x) for x in run.vectors.values())
    dead = contexts[DEAD]
    assert dead.n_firing == 0 and dead.max_activation == 0 and dead.quantile_edges == []
    assert not any(e["kind"] == "activating" for e in dead.explain + dead.score)
    assert sum(e["kind"] == "non_activating" for e in dead.score) == 5


def test_results_do_not_depend_on_the_encoder_batch_size(run, contexts, offline_lm):
    sae = load_sae(run.sae_folder).sae
    other = build_contexts(
        run.store, sae, run.records, [PLANTED], offline_lm.tokenizer, ContextConfig(batch_tokens=4000)
    )
    assert other[PLANTED].to_dict() == contexts[PLANTED].to_dict()


class OutOfMemoryAbove(torch.nn.Module):
    """An SAE whose encode raises CUDA's out-of-memory error on batches of more than `rows` rows, the
    first `times` times (every time when None), as a GPU with too little memory left would."""

    def __init__(self, sae: torch.nn.Module, rows: int, times: int | None = None):
        super().__init__()
        self.sae, self.rows, self.left = sae, rows, times
        self.d_in, self.d_sae, self.W_dec = sae.d_in, sae.d_sae, sae.W_dec
        self.failed = 0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) > self.rows and (self.left is None or self.left > 0):
            self.left = None if self.left is None else self.left - 1
            self.failed += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.sae.encode(x)


def test_out_of_memory_halves_the_batch_and_changes_no_example(run, contexts, offline_lm, capsys):
    flaky = OutOfMemoryAbove(load_sae(run.sae_folder).sae, rows=100)  # 256 -> 128 -> 64, both passes
    got = build_contexts(
        run.store,
        flaky,
        run.records,
        [PLANTED, NOISE, DEAD],
        offline_lm.tokenizer,
        ContextConfig(batch_tokens=256),
    )
    assert flaky.failed == 4 and {f: c.to_dict() for f, c in got.items()} == {
        f: c.to_dict() for f, c in contexts.items()
    }
    assert "at 256 tokens per batch: going on at 128" in capsys.readouterr().out
    with pytest.raises(
        torch.cuda.OutOfMemoryError, match=r"even at 16 tokens per batch.*ContextConfig\.batch_tokens"
    ):
        build_contexts(
            run.store, OutOfMemoryAbove(flaky.sae, rows=0), run.records, [PLANTED], offline_lm.tokenizer
        )


class OutOfMemoryOnCopy(torch.nn.Module):
    """An SAE whose activations and pre-activations raise CUDA's out-of-memory error when copied to the
    host, on the copies numbered in `fail` (from 1), as a GPU would when the slice of the asked-for
    features no longer fits: the encode itself succeeds. `copies` records what each copy was of."""

    def __init__(self, sae: torch.nn.Module, fail: set[int]):
        super().__init__()
        self.sae, self.d_in, self.d_sae, self.W_dec = sae, sae.d_in, sae.d_sae, sae.W_dec
        self.copies: list[str] = []
        self.kinds = [self._flaky(kind, fail) for kind in ("acts", "pre")]

    def _flaky(self, kind: str, fail: set[int]) -> type[torch.Tensor]:
        copies = self.copies

        class Flaky(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                if func is torch.Tensor.cpu:
                    copies.append(kind)
                    if len(copies) in fail:
                        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected into the copy)")
                return super().__torch_function__(func, types, args, kwargs)

        return Flaky

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.as_subclass(k) for t, k in zip(self.sae.encode(x), self.kinds, strict=True))


def test_out_of_memory_in_the_bookkeeping_halves_the_batch_and_changes_no_example(
    run, contexts, offline_lm, capsys
):
    """The copy of the pre-activations fails after the activations' copy succeeded (first pass), then the
    first copy of the second pass: each time the batch keeps nothing, its documents come again at half
    the size, and the examples equal those of a pass that never failed."""
    flaky = OutOfMemoryOnCopy(load_sae(run.sae_folder).sae, fail={4, 29})
    cfg = ContextConfig(batch_tokens=256)
    got = build_contexts(run.store, flaky, run.records, [PLANTED, NOISE, DEAD], offline_lm.tokenizer, cfg)
    assert flaky.copies[2:4] == ["acts", "pre"], "the second batch's pre-activations failed"
    assert flaky.copies[27:29] == ["pre", "acts"], "then the second pass's first batch (no pre there)"
    assert capsys.readouterr().out.count("at 256 tokens per batch: going on at 128") == 2
    assert {f: c.to_dict() for f, c in got.items()} == {f: c.to_dict() for f, c in contexts.items()}


def test_marked_text_and_token_pieces(offline_lm):
    assert marked_text(["a", " b", " c", " d", " e"], [0, 1, 2, 0, 3]) == "a<< b c>> d<< e>>"
    assert marked_text(["x"], [0.0]) == "x"
    tok = offline_lm.tokenizer
    ids = tok("Naïve café — 東京 is 42°C.", add_special_tokens=False).input_ids
    assert "".join(token_pieces(tok, ids)) == tok.decode(ids)


def test_bad_inputs_fail_clearly(run, offline_lm):
    with pytest.raises(ValueError, match=r"d_in=8 .*d_model=16"):
        build_contexts(run.store, JumpReLUSAE(8, 20, l0=2), run.records, [0], offline_lm.tokenizer)
    with pytest.raises(ValueError, match=r"distinct indices in \[0, d_sae=40\)"):
        build_contexts(run.store, planted_sae(), run.records, [40], offline_lm.tokenizer)


def test_feature_activation_over_text_matches_the_hidden_states(offline_lm):
    lm = offline_lm
    d = lm.model.config.hidden_size
    sae = JumpReLUSAE(d, 64, l0=8, seed=1).eval()
    text = "No, I did not take the money."
    tokens, acts = feature_activation_over_text(lm, sae, 4, text)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states[5][0]  # output of decoder layer 4
        want = sae.encode(hidden.float())[0].numpy()
    assert acts.shape == (ids.shape[1], 64) and "".join(tokens) == lm.tokenizer.decode(ids[0])
    np.testing.assert_allclose(acts, want, atol=1e-4)
    assert (acts > 0).any()
    sub = feature_activation_over_text(lm, sae, 4, text, features=[5, 2])[1]
    np.testing.assert_allclose(sub, want[:, [5, 2]], atol=1e-4)
