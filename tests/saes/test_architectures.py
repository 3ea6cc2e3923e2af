"""The SAE architectures: every registered one trains and round-trips; the sparse step equals the dense
maths of each paper; JumpReLU's threshold and Gated's gate learn; AuxK revives dead latents."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.saes import ARCHITECTURES, SAE, GatedSAE, JumpReLUSAE, TopKSAE, kernels, make_sae
from helpers.saes.batchtopk import BatchTopKSAE
from helpers.saes.io import load_sae, save_sae
from helpers.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from helpers.saes.registry import sae_class
from helpers.saes.standard import StandardSAE
from helpers.saes.train import TrainConfig, Trainer
from tests.saes.test_jumprelu_step import _JumpReLU, _Step
from tests.saes.test_train import residuals

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def acts(offline_lm, tmp_path_factory) -> torch.Tensor:
    return residuals(offline_lm, tmp_path_factory)


def dense_reference_loss(sae, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Each architecture's training loss written densely, straight from its paper, with autograd."""
    pre = (x - sae.b_dec) @ sae.W_enc
    mse = lambda x_hat: (x_hat - x).pow(2).sum(-1).mean()  # noqa: E731

    def auxk(pre, x_hat):  # Gao et al. §A.2, normalised by the error's variance
        e = (x - x_hat).detach()
        aux = torch.where(dead, pre, -torch.inf).topk(min(sae.k_aux, int(dead.sum())), dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, aux.indices, aux.values.relu()) @ sae.W_dec
        if isinstance(sae, MatryoshkaBatchTopKSAE):  # SAELens's form: unnormalised, × min(n_dead / k_aux, 1)
            return sae.auxk_coef * min(int(dead.sum()) / sae.k_aux, 1) * (e_hat - e).pow(2).sum(-1).mean()
        return sae.auxk_coef * (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()

    if isinstance(sae, TopKSAE):
        pre = pre + sae.b_enc
        top = pre.topk(sae.k, dim=-1)
        x_hat = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ sae.W_dec + sae.b_dec
        return mse(x_hat) + auxk(pre, x_hat)
    if isinstance(sae, BatchTopKSAE):  # Bussmann et al. 2024: the batch's n·k largest ReLU'd pre-activations
        pre = pre + sae.b_enc
        top = pre.relu().reshape(-1).topk(round(sae.k * len(x)))
        f = torch.zeros(pre.numel()).scatter(0, top.indices, pre.reshape(-1)[top.indices].relu()).view_as(pre)
        if isinstance(sae, MatryoshkaBatchTopKSAE):  # Bussmann et al. 2025: every prefix reconstructs x
            inner = sum(mse(f[:, :w] @ sae.W_dec[:w] + sae.b_dec) for w in sae.widths[:-1])
            loss = sae.inner_weight * inner + mse(f @ sae.W_dec + sae.b_dec)  # inner prefixes weighted
        else:
            loss = mse(f @ sae.W_dec + sae.b_dec)
        return loss + auxk(pre, f @ sae.W_dec + sae.b_dec)
    if isinstance(sae, StandardSAE):  # ReLU, L1 weighted by the decoder rows' norms (SAELens `standard`)
        f = (pre + sae.b_enc).relu()
        return mse(f @ sae.W_dec + sae.b_dec) + sae.sparsity_coef * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    if isinstance(sae, JumpReLUSAE):
        pre = pre + sae.b_enc
        theta = sae.threshold.expand_as(pre)
        x_hat = _JumpReLU.apply(pre, theta, sae.bandwidth) @ sae.W_dec + sae.b_dec
        l0 = _Step.apply(pre, theta, sae.bandwidth).sum(-1).mean()
        pre_act = ((theta - pre).relu() * dead * sae.W_dec.norm(dim=1)).sum(-1).mean()  # Anthropic's
        return (
            mse(x_hat)
            + sae.sparsity_coef * (l0 - sae.target_l0) ** 2 / sae.target_l0
            + sae.pre_act_coef * pre_act
        )
    pi_gate = pre + sae.b_gate
    pi_mag = (x - sae.b_dec) @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    x_hat = ((pi_gate > 0) * pi_mag.relu()) @ sae.W_dec + sae.b_dec
    frozen = sae.frozen_gate_decoder  # the paper's form; SAELens's (the default) trains the decoder here too
    W, b = (sae.W_dec.detach(), sae.b_dec.detach()) if frozen else (sae.W_dec, sae.b_dec)
    x_gate = pi_gate.relu() @ W + b
    revive = ((-pi_gate).relu() * dead).sum(-1).mean()  # the pre-activation loss on dead latents' gates
    l1 = pi_gate.relu().sum(-1).mean()
    return mse(x_hat) + sae.sparsity_coef * l1 + mse(x_gate) + sae.revive_coef * revive


def perturbed(arch: str, x: torch.Tensor) -> SAE:
    """A small SAE with non-trivial biases and thresholds, so every code path is exercised."""
    options = {"matryoshka_widths": [8, 30, 96]} if arch == "matryoshka_batchtopk" else {}
    sae = make_sae(arch, x.shape[1], 96, l0=6, seed=1, **options)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        if isinstance(sae, StandardSAE):  # free decoder norms: make them unequal
            sae.W_dec.mul_(0.5 + torch.rand(96, 1, generator=g))
        sae.b_dec.copy_(x.mean(0) + 0.1 * torch.randn(x.shape[1], generator=g))
        for name in ("b_enc", "b_gate", "b_mag", "r_mag"):
            if hasattr(sae, name):
                getattr(sae, name).copy_(0.05 * torch.randn(96, generator=g))
        if isinstance(sae, JumpReLUSAE):
            sae.threshold.copy_(0.1 * torch.rand(96, generator=g))
            sae.bandwidth = 0.05
    return sae


@pytest.mark.parametrize("dense", [False, True], ids=["sparse-path", "dense-path"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_sparse_step_equals_dense_reference(arch, dense, acts, monkeypatch):
    monkeypatch.setitem(kernels.DENSE_ABOVE, "cpu", 0.0 if dense else 1.0)
    x = acts[:128] / acts[:128].pow(2).sum(1).mean().sqrt()
    sae = perturbed(arch, x)
    dead = torch.arange(96) % 3 == 0
    out = sae.losses(x, dead)
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    ref = copy.deepcopy(sae)
    ref.zero_grad()
    loss = dense_reference_loss(ref, x, dead)
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    if isinstance(sae, BatchTopKSAE):  # training picks n·k pairs of the batch; inference thresholds
        assert out.fired.sum() == round(sae.k * len(x))
    else:
        assert out.fired.sum() == (sae.encode(x)[0] > 0).sum()


@pytest.mark.parametrize("skewed", [False, True], ids=["sampled-threshold", "fallback"])
def test_batch_topk_selects_exactly_the_batchs_largest(skewed):
    """The sampled threshold never changes the answer: when the sampled rows miss where the large values
    are (skewed), the full top-k runs; pairs come back in CSR order either way."""
    pre = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    if skewed:
        pre[0::4] += 5.0  # the sampled rows (stride 4) are the large ones: the threshold overshoots
    for n_select in (1, 256 * 8, 256 * 60):
        p = kernels.batch_topk(pre, n_select)
        want = set(pre.reshape(-1).topk(n_select).indices.tolist())
        assert set((p.row * 512 + p.col).tolist()) == want and len(p.col) == n_select
        assert bool(((p.row * 512 + p.col).diff() > 0).all()), "row-major, latents sorted within a row"


def test_batch_topk_breaks_a_tie_at_the_cut_and_keeps_exactly_n_select():
    """Values on a coarse grid tie at the cut: still exactly n_select pairs, none smaller than a pair left
    out, in CSR order."""
    pre = (2 * torch.randn(64, 512, generator=torch.Generator().manual_seed(0))).round()
    flat = pre.reshape(-1)
    for n_select in (100, 64 * 8):
        p = kernels.batch_topk(pre, n_select)
        chosen = p.row * 512 + p.col
        left_out = torch.ones(flat.numel(), dtype=torch.bool).index_fill_(0, chosen, False)
        assert len(chosen) == n_select and flat[chosen].min() >= flat[left_out].max()
        assert bool((chosen.diff() > 0).all()), "row-major, latents sorted within a row"


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_batchtopk_threshold_reproduces_the_batch_selection(arch, acts):
    """θ after one step is that batch's smallest selected activation, so the JumpReLU that is saved fires on
    exactly the selected pairs of that batch but the smallest (pre > θ is strict); later batches average."""
    x = acts[:128] / acts[:128].pow(2).sum(1).mean().sqrt()
    sae = perturbed(arch, x)
    out = sae.losses(x, torch.zeros(96, dtype=torch.bool))
    sae.after_step(out)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    selected = pre.relu().reshape(-1).topk(round(sae.k * len(x))).values
    assert float(sae.threshold.min()) == float(sae.threshold.max()) == pytest.approx(float(selected.min()))
    assert int((sae.encode(x)[0] > 0).sum()) == len(selected) - 1
    x2 = acts[128:256] / acts[128:256].pow(2).sum(1).mean().sqrt()
    sae.after_step(sae.losses(x2, torch.zeros(96, dtype=torch.bool)))
    second = ((x2 - sae.b_dec) @ sae.W_enc + sae.b_enc).detach().relu().reshape(-1).topk(len(selected)).values
    r = sae.threshold_rate
    want = ((1 - r) * r * float(selected.min()) + r * float(second.min())) / (1 - (1 - r) ** 2)
    assert float(sae.threshold[0]) == pytest.approx(want, rel=1e-5), "bias-corrected moving average"


def test_batchtopk_threshold_calibrated_on_a_pool_fires_k_per_token(acts):
    """Small batches make the running θ heavy-tailed; `calibrate` sets θ from a pool so that the pool's
    mean L0 is k (n·k - 1 pairs fire: the smallest selected one is θ itself, pre > θ is strict)."""
    cfg = TrainConfig(architecture="batchtopk", expansion=2, l0=16, train_tokens=60 * 16, batch_size=16)
    run = Trainer(cfg, d_in=576)
    run.init_from_data(acts[:512])
    for i in range(60):
        run.train_step(acts[i * 16 :][:16])
    sae, pool = run.sae, acts[:1024] * run.scale
    running = float(sae.threshold[0])
    info = sae.calibrate(pool[i : i + 256] for i in range(0, 1024, 256))
    assert info == {"threshold_running_mean": running, "threshold": float(sae.threshold[0]), "tokens": 1024}
    assert float(sae.threshold.min()) == float(sae.threshold.max()) != running
    assert int((sae.encode(pool)[0] > 0).sum()) == 1024 * 16 - 1
    with pytest.raises(ValueError, match="at least one batch"):
        sae.calibrate([])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_trains_and_round_trips(arch, acts, tmp_path):
    cfg = TrainConfig(architecture=arch, expansion=2, l0=16, train_tokens=120 * 64, batch_size=64, lr=1e-3)
    run = Trainer(cfg, d_in=576)
    assert torch.equal(run.sae.W_enc, run.sae.W_dec.t() * run.sae.encoder_init_scale), (
        "encoder: the decoder's transpose"
    )
    assert run.sae.encoder_init_scale == (0.1 if arch == "gated" else 1.0)  # Gated: bench/gated_ablations.py
    run.init_from_data(acts[:512])
    x0 = acts[:512] * run.scale
    pull = (x0 - run.sae.b_dec) / (x0 - run.sae.b_dec).norm(dim=1, keepdim=True)
    assert pull.sum(0).norm() < 0.05 * len(x0), "b_dec starts at the geometric median (unit pulls cancel)"
    a, pre = run.sae.encode(acts[:10] * run.scale)
    assert a.shape == pre.shape == (10, 1152) and run.sae.decode(a).shape == (10, 576)
    data = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]
    losses = [float(run.train_step(data[i * 64 % (len(data) - 64) :][:64]).terms["mse"]) for i in range(120)]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), (
        f"{arch}: reconstruction did not improve: {losses[::20]}"
    )
    norms = run.sae.W_dec.detach().norm(dim=1)
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"):  # from 0.1, free, as SAELens's
        assert run.sae.free_decoder and not torch.allclose(norms, torch.full_like(norms, 0.1))
    elif arch != "standard":  # the standard SAE's L1 is weighted by free decoder norms instead
        torch.testing.assert_close(norms, torch.ones(1152), msg="decoder rows stay unit-norm")
    save_sae(run.sae, tmp_path, hook_name="blocks.2.hook_resid_post", model_name="smollm2", scale=run.scale)
    loaded = load_sae(tmp_path)
    assert type(loaded.sae) is sae_class(run.sae.saelens_architecture) and loaded.layer == 2
    with torch.no_grad():
        want_acts = run.sae.encode(acts[:50] * run.scale)[0] * run.sae.folded_norms() / run.scale
        want_x_hat = run.sae(acts[:50] * run.scale) / run.scale
        torch.testing.assert_close(loaded.sae.encode(acts[:50])[0], want_acts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.sae(acts[:50]), want_x_hat, rtol=1e-4, atol=1e-4)


def test_jumprelu_threshold_gets_the_ste_gradient(acts):
    x = acts[:64] / acts[:64].pow(2).sum(1).mean().sqrt()
    sae = perturbed("jumprelu", x)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    in_window = ((pre - sae.threshold).abs() < sae.bandwidth / 2).any(0)
    sae.losses(x, torch.zeros(96, dtype=torch.bool)).loss.backward()
    assert in_window.any() and (~in_window).any()
    assert (sae.threshold.grad[in_window] != 0).all(), (
        "every latent with pairs in the STE window gets gradient"
    )
    assert (sae.threshold.grad[~in_window] == 0).all(), "outside the window the pseudo-derivative is 0"


def test_jumprelu_thresholds_learn_and_sparsify(acts):
    """From the paper's init (θ = 0.001, half the latents firing) θ must rise and L0 fall to its target:
    the nanochat JumpReLU SAEs whose θ stayed at 0 (a ReLU in disguise) must be impossible."""
    cfg = TrainConfig(
        architecture="jumprelu",
        expansion=2,
        l0=20,
        train_tokens=200 * 64,
        batch_size=64,
        lr=1e-3,
        sae_options={"init_threshold": 0.001},  # not from the data (the default): test_jumprelu_init.py
    )
    run = Trainer(cfg, d_in=576)
    run.init_from_data(acts[:512])
    data = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]
    l0s = [run.train_step(data[i * 64 % (len(data) - 64) :][:64]).l0 for i in range(200)]
    theta = run.sae.threshold.detach()
    assert l0s[0] > 1152 / 4, "starts dense"
    assert sum(l0s[-10:]) / 10 < 2 * 20, f"L0 did not fall to its target (20): {l0s[::20]}"
    assert theta.min() >= 0 and theta.mean() > 10 * 0.001 and theta.std() > 0


def test_gated_gate_learns_through_a_frozen_decoder(acts):
    x = acts[:64] / acts[:64].pow(2).sum(1).mean().sqrt()
    sae = perturbed("gated", x)
    sae.frozen_gate_decoder = True  # the paper's form (the default is SAELens's: test_gated_training_form.py)
    sae.losses(x, torch.zeros(96, dtype=torch.bool)).loss.backward()
    assert sae.b_gate.grad.abs().sum() > 0 and sae.W_enc_T.grad.abs().sum() > 0, "the gate receives gradient"
    # The decoder's gradient is the reconstruction's alone: the gate's auxiliary loss uses a frozen copy.
    ref = copy.deepcopy(sae)
    ref.zero_grad()
    pre = (x - ref.b_dec) @ ref.W_enc
    acts_ = (pre + ref.b_gate > 0) * (pre * ref.r_mag.exp() + ref.b_mag).relu()
    (acts_ @ ref.W_dec + ref.b_dec - x).pow(2).sum(-1).mean().backward()
    torch.testing.assert_close(sae.W_dec.grad, ref.W_dec.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("auxk_coef", [1.0, 0.0])
def test_auxk_revives_planted_dead_latents(acts, auxk_coef):
    cfg = TrainConfig(
        expansion=2,
        l0=16,
        train_tokens=100 * 64,
        batch_size=64,
        lr=2e-3,
        dead_tokens=1024,
        sae_options={"auxk_coef": auxk_coef},
    )
    run = Trainer(cfg, d_in=576)
    run.init_from_data(acts[:512])
    planted = torch.arange(0, 1152, 4)  # 288 latents whose encoder rows are shrunk 100x: never in the top-k
    with torch.no_grad():
        run.sae.W_enc_T[planted] *= 0.01
        run.sae.tokens_since_fired[planted] = 10_000
    data = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]
    for i in range(100):
        run.train_step(data[i * 64 % (len(data) - 64) :][:64])
    revived = float((run.sae.tokens_since_fired[planted] < 10_000).float().mean())
    if auxk_coef:
        assert revived > 0.5, f"AuxK revived only {revived:.0%} of the planted dead latents"
    else:
        assert revived < 0.05, "without AuxK the planted latents stay dead (the control)"


def test_unknown_architecture_and_wrong_width_fail_clearly():
    with pytest.raises(
        KeyError, match="'relu': known ones are standard, topk, batchtopk, matryoshka_batchtopk"
    ):
        make_sae("relu", 8, 16)
    with pytest.raises(ValueError, match="d_in=8 but got vectors of size 5"):
        make_sae("gated", 8, 16, l0=4).encode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"must be in \(0, d_sae=16\]"):
        make_sae("topk", 8, 16, l0=17)
    with pytest.raises(ValueError, match="ReLU-in-disguise"):
        JumpReLUSAE(8, 16, l0=4, init_threshold=0.0)
    assert isinstance(make_sae("gated", 8, 16, l0=4), GatedSAE)
    assert (TopKSAE(576, 4608).k_aux, TopKSAE(576, 128).k_aux) == (288, 128), (
        "k_aux = d_in / 2, capped by d_sae"
    )
