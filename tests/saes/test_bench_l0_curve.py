"""bench/sae_train.py's matched-L0 evaluation of BatchTopK: `l0_curve` scales an SAE's inference threshold
so that exactly the asked mean L0 fires on the given tokens, the same way for SAELens's saved BatchTopK
(read back by our loader) and for ours, and leaves the threshold as it found it."""

from __future__ import annotations

import pytest
import torch

from bench import saelens_setup
from bench.sae_train import l0_curve
from helpers.saes.evals import activation_metrics
from helpers.saes.io import load_sae
from helpers.saes.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def saelens_batchtopk(tmp_path, x: torch.Tensor):
    """SAELens's BatchTopK after a few of its own steps (its θ the running mean it saves), saved by
    its `save_inference_model` and read back with our loader; and SAELens's own inference SAE."""
    import sae_lens

    torch.manual_seed(0)
    sae = saelens_setup.training_sae("batchtopk", 16, 64, 4.0, l1=1.0)
    for i in range(0, 512, 128):
        sae.update_topk_threshold(sae.encode(x[i : i + 128]))
    sae.save_inference_model(tmp_path)
    return load_sae(tmp_path).sae, sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")


def test_saelens_batchtopk_hits_each_l0_exactly_and_agrees_with_saelens_own_sae(tmp_path):
    x = torch.randn(512, 16) * 2 + 0.5
    ours_view, theirs = saelens_batchtopk(tmp_path, x)
    theta = ours_view.threshold.detach().clone()
    assert float(theta.min()) == float(theta.max()) > 0, "SAELens saves one θ in every latent"
    rows = l0_curve(ours_view, x, "cpu", [2.0, 4.0, 6.5])
    assert [r["l0"] for r in rows] == [2.0, 4.0, 6.5]
    assert torch.equal(ours_view.threshold, theta), "θ restored"
    for r in rows:  # SAELens's own JumpReLU at the scaled θ gives the same reconstruction
        with torch.no_grad():
            theirs.threshold.copy_(theta * r["threshold_scale"])
            acts = theirs.encode(x)
            x_hat = theirs.decode(acts)
        assert float((acts > 0).float().sum(1).mean()) == r["l0"]
        ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert float(ev) == pytest.approx(r["explained_variance"], abs=1e-4)


def test_our_batchtopk_curve_matches_its_own_threshold_at_its_own_l0():
    torch.manual_seed(0)
    acts = torch.randn(1280, 32) * torch.linspace(0.2, 3, 32) + 1
    cfg = TrainConfig(architecture="batchtopk", expansion=4, l0=8, train_tokens=30 * 64, batch_size=64)
    run = Trainer(cfg, d_in=32)
    run.init_from_data(acts[:512])
    for i in range(30):
        run.train_step(acts[i * 32 :][:64])
    run.calibrate([acts[:512]])
    held = acts[-256:] * run.scale
    own = activation_metrics(run.sae, [held])
    (row,) = l0_curve(run.sae, held, "cpu", [own["l0"]])
    assert row["l0"] == pytest.approx(own["l0"], abs=1e-4)
    assert row["explained_variance"] == pytest.approx(own["explained_variance"], abs=1e-4)


def test_a_zero_threshold_is_refused():
    cfg = TrainConfig(architecture="batchtopk", expansion=2, l0=4, train_tokens=64, batch_size=64)
    run = Trainer(cfg, d_in=16)
    with pytest.raises(ValueError, match="positive threshold"):
        l0_curve(run.sae, torch.randn(64, 16), "cpu", [4.0])


def test_matryoshka_comparison_gives_saelens_our_nested_widths_and_matches_l0(tmp_path):
    """bench/sae_train.py's Matryoshka row end to end on a tiny store: SAELens's MatryoshkaBatchTopK trains
    with exactly our prefixes (read back from its own config), the two alternate on the same batches, and
    both are measured at the same held-out L0s."""
    from bench.sae_train import compare, parser

    torch.manual_seed(0)
    acts = torch.randn(2304, 16) * torch.linspace(0.2, 3, 16) + 1
    args = parser().parse_args(
        [
            "--archs",
            "matryoshka_batchtopk",
            "--tokens",
            "512",
            "--batch-size",
            "64",
            "--k",
            "8",
            "--chunk",
            "2",
            "--seed",
            "0",
        ]
    )
    out = compare("matryoshka_batchtopk", acts[:2048], acts[2048:], args, tmp_path)
    assert out["ours"]["matryoshka_widths"] == [2, 8, 32, 128], "ours: d_sae/64, /16, /4, d_sae"
    assert out["saelens"]["matryoshka_widths"] == out["ours"]["matryoshka_widths"]
    assert out["schedule"] == "alternating chunks" and out["steps"] == 8
    for who in ("ours", "saelens"):
        exact = {r["l0_target"]: r["l0"] for r in out[who]["l0_curve"]}
        assert all(abs(exact[t] - t) < 1e-3 for t in exact), exact
    assert set(out["ev_at_matched_l0"]) == {"k", "ours_l0", "saelens_l0"}


def test_gated_curve_hits_each_l0_exactly_on_saelens_gated_and_agrees_with_saelens_own_sae(tmp_path):
    """`gated_l0_curve` on SAELens's Gated SAE (saved by it, read back by our loader): every gate bias
    lowered by one offset fires exactly the asked L0, SAELens's own SAE at that offset rebuilds the same,
    and b_gate is restored."""
    import sae_lens

    from bench.sae_train import gated_l0_curve

    torch.manual_seed(0)
    sae = saelens_setup.training_sae("gated", 16, 64, 4.0, l1=1.0)
    with torch.no_grad():  # magnitudes that are not all positive where the gate opens
        sae.b_mag.normal_(0, 0.5)
        sae.r_mag.normal_(0, 0.3)
        sae.b_gate.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # decoder norms SAELens folds into b_gate when saving
    sae.save_inference_model(tmp_path)
    ours_view, theirs = load_sae(tmp_path).sae, sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x = torch.randn(512, 16) * 2 + 0.5
    b_gate = ours_view.b_gate.detach().clone()
    rows = gated_l0_curve(ours_view, x, "cpu", [2.0, 4.0, 6.5])
    assert [r["l0"] for r in rows] == [2.0, 4.0, 6.5]
    assert torch.equal(ours_view.b_gate, b_gate), "b_gate restored"
    for r in rows:
        with torch.no_grad():
            theirs.b_gate.copy_(b_gate - r["gate_offset"])
            acts = theirs.encode(x)
            x_hat = theirs.decode(acts)
        assert float((acts > 0).float().sum(1).mean()) == r["l0"]
        ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert float(ev) == pytest.approx(r["explained_variance"], abs=1e-4)


def test_gated_curve_records_an_l0_out_of_reach_as_null_and_goes_on(tmp_path, capsys):
    """A Gated SAE whose magnitudes are positive for few latents cannot reach a high L0 by lowering its
    gate biases (SAELens's Gated at 400 steps of bench/sae_train.py, L0 40): that point is null with the
    reason, the reachable points are still measured, and b_gate is restored."""
    from bench.sae_train import gated_l0_curve, matched_l0, targets

    torch.manual_seed(0)
    sae = saelens_setup.training_sae("gated", 16, 64, 4.0, l1=1.0)
    with torch.no_grad():  # only 8 of 64 latents have a magnitude that can be positive
        sae.b_mag.fill_(-1e3)
        sae.b_mag[:8] = 1e3
    sae.save_inference_model(tmp_path)
    ours_view = load_sae(tmp_path).sae
    b_gate = ours_view.b_gate.detach().clone()
    x = torch.randn(256, 16)
    rows = gated_l0_curve(ours_view, x, "cpu", [4.0, 20.0])
    assert rows[0]["l0"] == 4.0 and rows[0]["explained_variance"] is not None
    far = rows[1]
    assert far["l0_target"] == 20.0 and far["l0"] is None and far["explained_variance"] is None
    assert far["gate_offset"] is None and "2048 held-out activations can fire" in far["out_of_reach"]
    assert "L0 20.0 is out of reach" in capsys.readouterr().err
    assert torch.equal(ours_view.b_gate, b_gate), "b_gate restored"
    # the comparison and the targets carry the null on instead of failing on it
    mine = {"l0_target": 4, "l0": 20.0, "explained_variance": 0.9, "dead_fraction": 0.0}
    t = {"ours": {**mine, "l0_curve": rows}, "saelens": {**mine, "l0": 4.0, "l0_curve": rows}}
    ev = matched_l0(t)
    assert ev["k"]["ours"] == rows[0]["explained_variance"] and ev["ours_l0"]["saelens"] is None
    t |= {"ev_at_matched_l0": ev, "speedup_load_corrected": 3.0}
    t["ours"]["explained_variance_typical"] = t["saelens"]["explained_variance_typical"] = 0.5
    checks = targets({"gated": t})
    assert checks["gated_ev_ge_saelens_at_k"] is True and checks["gated_ev_ge_saelens_at_ours_l0"] is None


def test_standard_curve_hits_each_l0_exactly_on_saelens_standard_and_agrees_with_saelens_own_sae(tmp_path):
    """`standard_l0_curve` on SAELens's standard SAE (saved by it, read back by our loader): every b_enc
    lowered by one offset fires exactly the asked L0, SAELens's own SAE at that offset rebuilds the same,
    and b_enc is restored."""
    import sae_lens

    from bench.sae_train import standard_l0_curve

    torch.manual_seed(0)
    sae = saelens_setup.training_sae("standard", 16, 64, 4.0, l1=1.0)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    sae.save_inference_model(tmp_path)
    ours_view, theirs = load_sae(tmp_path).sae, sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x = torch.randn(512, 16) * 2 + 0.5
    b_enc = ours_view.b_enc.detach().clone()
    rows = standard_l0_curve(ours_view, x, "cpu", [2.0, 4.0, 6.5])
    assert [r["l0"] for r in rows] == [2.0, 4.0, 6.5]
    assert torch.equal(ours_view.b_enc, b_enc), "b_enc restored"
    for r in rows:
        with torch.no_grad():
            theirs.b_enc.copy_(b_enc - r["bias_offset"])
            acts = theirs.encode(x)
            x_hat = theirs.decode(acts)
        assert float((acts > 0).float().sum(1).mean()) == r["l0"]
        ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert float(ev) == pytest.approx(r["explained_variance"], abs=1e-4)
