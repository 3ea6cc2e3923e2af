"""Evaluation: streamed metrics equal direct ones, splicing an identity SAE changes nothing (CE/KL), the
splice hook never outlives its block, and the leaderboard reads what training wrote."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.collect.store import LayerStore
from helpers.model.chat import pad_token_id
from helpers.model.hooks import edit_residual, hook_module, hook_name
from helpers.saes import make_sae
from helpers.saes.evals import (
    activation_metrics,
    evaluate_folder,
    evaluate_lm,
    leaderboard,
    lm_batches,
    lm_eval_rows,
    lm_loss,
)
from helpers.saes.io import save_sae
from tests.saes.test_train import LAYER, residuals, shared_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(offline_lm, tmp_path_factory):
    return shared_run(offline_lm, tmp_path_factory)


@pytest.fixture(scope="module")
def acts(offline_lm, tmp_path_factory) -> torch.Tensor:
    return residuals(offline_lm, tmp_path_factory)


def test_streamed_metrics_equal_a_direct_computation(acts):
    sae = make_sae("topk", 576, 1152, l0=12, seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))
    batches = list(acts.split([100, 37, 700, len(acts) - 837]))  # uneven batches
    m = activation_metrics(sae, batches)
    x = acts.double().numpy()
    with torch.no_grad():
        f, _ = sae.encode(acts)
        x_hat = sae.decode(f).double().numpy()
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    freq = (f > 0).double().mean(0).numpy()
    assert m["explained_variance"] == pytest.approx(ev, rel=1e-12, abs=1e-12)
    assert m["mse"] == pytest.approx(((x - x_hat) ** 2).mean(), rel=1e-12)
    assert m["l0"] == 12 and m["n_tokens"] == len(acts)
    assert m["dead_fraction"] == pytest.approx((freq == 0).mean()) and 0 < m["dead_fraction"] < 1
    assert m["dense_fraction"] == pytest.approx((freq > 0.1).mean())
    hist = m["firing_histogram"]
    assert sum(hist["counts"]) + hist["never"] == 1152 and len(hist["counts"]) == len(hist["log10_edges"]) - 1


def test_non_finite_evaluation_batch_is_located(acts):
    bad = acts[:10].clone()
    bad[7, 3] = float("inf")
    with pytest.raises(
        ValueError, match=r"non-finite activation \(inf\) in evaluation batch 1, row 7, dim 3"
    ):
        activation_metrics(make_sae("topk", 576, 64, l0=4), [acts[:5], bad])


def batches_of(run_dir, lm, n: int):
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()][:n]
    store = LayerStore(run_dir, LAYER)
    first = {r["id"]: store.entries[r["id"]][3] for r in rows}
    return list(lm_batches(rows, first, pad_id=pad_token_id(lm.tokenizer), batch_size=3))


def test_identity_sae_recovers_all_the_loss(offline_lm, run_dir):
    data = batches_of(run_dir, offline_lm, 3)
    assert data[0]["splice"].sum() > data[0]["score"].sum() > 0
    res = lm_loss(
        offline_lm.model, {"identity": torch.nn.Identity(), "half": lambda h: 0.5 * h}, hook_name(LAYER), data
    )
    ident, half = res["identity"], res["half"]
    assert ident["ce_sae"] == pytest.approx(ident["ce_clean"], abs=1e-5)
    assert ident["kl_sae"] == pytest.approx(0.0, abs=1e-6) and ident["loss_recovered"] == pytest.approx(
        1.0, abs=1e-4
    )
    assert ident["ce_zero_ablation"] > ident["ce_clean"] + 0.5, "zero-ablating a residual hurts"
    assert half["kl_sae"] > 0.01 and half["loss_recovered"] < 0.999, "a lossy splice is measured as such"
    assert ident["n_tokens"] == sum(int(b["score"].sum()) for b in data)
    # SAEBench's scores beside the increases, each with a CI over the sequences' groups
    assert half["ce_loss_score"] == half["loss_recovered"] and 0 < half["kl_div_score"] < 1
    for key in ("ce_increase", "kl_sae", "ce_loss_score", "kl_div_score"):
        lo, hi = half[f"{key}_ci"]
        assert lo <= half[key] <= hi and half["n_groups"] == half["n_completions"] == 3
    assert half["by_label"] == {}, "no labels given: no per-label rows"
    # per label: the token-weighted mean of the two labels' CE increases and KLs is the pooled one
    n_seq = sum(len(b["input_ids"]) for b in data)
    labels = ["honest", "deceptive", "honest"][:n_seq] + ["deceptive"] * max(n_seq - 3, 0)
    res = lm_loss(offline_lm.model, {"half": lambda h: 0.5 * h}, hook_name(LAYER), data, labels=labels)[
        "half"
    ]
    parts = res["by_label"]
    assert set(parts) == {"honest", "deceptive"} and parts["honest"]["n_completions"] == labels.count(
        "honest"
    )
    for key in ("ce_increase", "kl_sae"):
        pooled = sum(p[key] * p["n_tokens"] for p in parts.values()) / res["n_tokens"]
        assert pooled == pytest.approx(res[key], rel=1e-9) and res[key] == pytest.approx(half[key], rel=1e-9)
        assert all(
            p[f"{key}_ci"][0] <= p[key] <= p[f"{key}_ci"][1] for p in parts.values() if p["n_groups"] > 1
        )


def test_lm_eval_rows_spread_over_groups_and_labels():
    # file order as notebook 02 writes it: each group's honest prompt first, then its lie prompt
    rows = [
        {
            "id": f"g{g}#{k}",
            "prompt_id": f"g{g}/{k // 2}",
            "group": f"g{g}",
            "label": ("honest", "deceptive")[k // 2],
        }
        for g in range(5)
        for k in range(4)
    ]
    held = {r["id"] for r in rows if r["group"] != "g4"}
    chosen = lm_eval_rows(rows, held, 6)
    groups = [r["group"] for r in chosen]
    assert len(chosen) == 6 and set(groups[:4]) == {"g0", "g1", "g2", "g3"}, "one per group before a second"
    assert "g4" not in groups and lm_eval_rows(rows, held, 6) == chosen
    labels = [r["label"] for r in chosen[:4]]
    assert labels.count("honest") == labels.count("deceptive") == 2, "the first round is half each label"
    both = lm_eval_rows(rows, held, 8)
    assert all({r["label"] for r in both if r["group"] == g} == {"honest", "deceptive"} for g in set(groups))


def test_splice_hook_is_removed_even_when_the_pass_fails(offline_lm):
    module = hook_module(offline_lm.model, hook_name(LAYER))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        clean = offline_lm.model(ids).logits
        with edit_residual(offline_lm.model, hook_name(LAYER), torch.zeros_like):
            zeroed = offline_lm.model(ids).logits
        with (
            pytest.raises(RuntimeError, match="boom"),
            edit_residual(offline_lm.model, hook_name(LAYER), torch.zeros_like),
        ):
            raise RuntimeError("boom")
    # transformers 5 keeps its own output-capturing hook once output_hidden_states was used: not ours.
    ours = [h for h in module._forward_hooks.values() if "output_capturing_hook" not in h.__qualname__]
    assert not ours and not torch.allclose(clean, zeroed)
    torch.testing.assert_close(offline_lm.model(ids).logits, clean)


def test_evaluate_lm_and_leaderboard(offline_lm, run_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "completions.jsonl", "activations"):
        (run / name).symlink_to(run_dir / name)
    store = LayerStore(run, LAYER)
    for arch in ("topk", "gated"):
        folder = run / "saes" / f"m_{arch}_L2_mixed"
        sae = make_sae(arch, 576, 256, l0=8)
        with torch.no_grad():
            sae.b_dec.copy_(torch.cat(list(store.iter_batches(4096, shuffle=False))).mean(0))
        save_sae(sae, folder, hook_name=hook_name(LAYER), model_name="smollm2")
        meta = {"sae_id": folder.name, "architecture": arch, "layer": LAYER, "condition": "mixed"}
        (folder / "metrics.json").write_text(json.dumps({**meta, **evaluate_folder(folder, store, None)}))
    res = evaluate_lm(run, offline_lm, n_completions=2, batch_size=2)
    assert set(res) == {"m_topk_L2_mixed", "m_gated_L2_mixed"}
    rows = leaderboard(run, sort_by="explained_variance")
    assert [r["sae_id"] for r in rows] == sorted(res, key=lambda s: -res_ev(run, s))
    assert all(math.isfinite(r["kl_sae"]) and r["loss_recovered"] is not None for r in rows)
    lm = json.loads((run / "saes" / rows[0]["sae_id"] / "metrics.json").read_text())["lm"]
    assert lm["by_label"] and lm["n_completions"] == sum(p["n_completions"] for p in lm["by_label"].values())
    for label, part in lm["by_label"].items():  # the completions chosen carry their labels
        assert rows[0][f"ce_increase_{label}"] == part["ce_increase"] and part["n_completions"] >= 1
    assert evaluate_lm(run, offline_lm) == {}, "already evaluated: nothing to redo"


def res_ev(run, sae_id: str) -> float:
    return json.loads((run / "saes" / sae_id / "metrics.json").read_text())["activations"][
        "explained_variance"
    ]


def test_evaluate_folder_refuses_another_width_or_layer(run_dir, tmp_path):
    store = LayerStore(run_dir, LAYER)
    save_sae(
        make_sae("topk", 2048, 64, l0=4),
        tmp_path / "wide",
        hook_name="blocks.2.hook_resid_post",
        model_name="d32",
    )
    with pytest.raises(ValueError, match="d_in=2048 but layer 2 activations have d_model=576.*another model"):
        evaluate_folder(tmp_path / "wide", store, None)
    save_sae(make_sae("topk", 576, 64, l0=4), tmp_path / "l5", hook_name="transformer.h.5", model_name="m")
    with pytest.raises(ValueError, match=r"reads transformer.h.5 \(layer 5\), not layer 2"):
        evaluate_folder(tmp_path / "l5", store, None)
