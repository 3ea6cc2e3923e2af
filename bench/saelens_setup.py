"""SAELens 6.x set up as its most careful user would, shared by bench/sae_train.py (real activations) and
bench/synthetic_quality.py (ground truth): one home for which SAELens class and settings stand in for each
of our architectures, and for its trainer's configuration.

- Input scale: SAELens's `normalize_activations="expected_average_only_in"` scales to mean norm sqrt(d_in)
  (sae_lens 6.54.12, `training/activation_scaler.py` line 90); the benches scale its batches by
  `saelens_scale` from the same first tokens ours uses.
- TopK family: its sparse path (`use_sparse_activations=True`, fp32 without autocast, as its docstring asks),
  which needs `rescale_acts_by_decoder_norm=False` (with True it fails in backward on torch 2.13).
- JumpReLU: its L0-targeting ("quadratic") mode, its bandwidth default (0.05), and for a short run
  (`add_jumprelu_flags`) the L0 term's gradient passed to the encoder (`jumprelu_ste_to_input=True`,
  "Anthropic's setup" in `saes/jumprelu_sae.py` l. 206) with the thresholds starting where its initial
  encoder fires the target L0. With its defaults (`jumprelu_init_threshold=0.01`, thresholds-only STE,
  l. 210-224) the thresholds rise by about lr per Adam step while its encoder, which the L0 term does
  not reach, grows faster: on SmolLM2 layer 15 (d_sae 4608, target 32, lr 1e-3) its L0 was still ~2000
  after 150 steps. Its JumpReLU has no sparse path: a step is six dense [batch, d_in] x [d_in, d_sae]
  products (~7x one encoder matmul, measured on 1 thread), which is why it is slow on CPU.
- standard and Gated: `l1_coefficient` as given (its units are those of the sqrt(d_in) scale).
- Trainer: the same batch size, token budget, learning rate, warm-up and decay length as ours (decaying to
  lr / 10, SAELens's `lr_end`), its dead-latent window as given (its default, 1000 steps, is longer than a
  short run, so its AuxK would never act).
"""

from __future__ import annotations

import torch

from helpers.saes.registry import sae_class


def add_input_norm_flag(parser) -> None:
    """Both benches' `--ours-input-norm`: an ablation of our `TrainConfig.input_norm` (SAELens's scale is
    always its own)."""
    parser.add_argument(
        "--ours-input-norm",
        default="auto",
        choices=["auto", "unit", "sqrt_d_in"],
        help="ablation: our TrainConfig.input_norm (auto: the architecture's; unit: unit mean squared norm; "
        "sqrt_d_in: SAELens's mean norm sqrt(d_in))",
    )


def add_class_ablation_flags(parser) -> None:
    """Both benches' ablations of our architectures' class settings (`apply_class_ablations`)."""
    parser.add_argument(
        "--ours-encoder-init-scale",
        type=float,
        default=None,
        help="ablation: the architecture's SAE.encoder_init_scale",
    )
    parser.add_argument(
        "--ours-decoder-norm",
        type=float,
        default=None,
        help="ablation: the architecture's SAE.decoder_norm (the rows' initial norm; held there unless free)",
    )
    parser.add_argument(
        "--ours-free-decoder",
        type=int,
        choices=[0, 1],
        default=None,
        help="ablation: the architecture's SAE.free_decoder (1: the rows' norms move freely)",
    )


def apply_class_ablations(args) -> None:
    """Set the class settings `add_class_ablation_flags` names on every architecture of `args.archs`, for
    this process."""
    settings = {
        "encoder_init_scale": args.ours_encoder_init_scale,
        "decoder_norm": args.ours_decoder_norm,
        "free_decoder": None if args.ours_free_decoder is None else bool(args.ours_free_decoder),
    }
    for arch in filter(None, args.archs.split(",")):
        for name, value in settings.items():
            if value is not None:
                setattr(sae_class(arch), name, value)


def add_jumprelu_flags(parser, *, ste_to_input: int, init_threshold: str) -> None:
    """Both benches' settings of SAELens's JumpReLU (`jumprelu_settings`, `set_jumprelu_threshold`), with
    the bench's defaults: its best of those tried on that bench's data."""
    parser.add_argument(
        "--saelens-jumprelu-ste-to-input",
        type=int,
        choices=[0, 1],
        default=ste_to_input,
        help="SAELens's jumprelu_ste_to_input (1: Anthropic's setup, the L0 term's gradient reaches the "
        f"encoder; 0: its default, DeepMind's, thresholds only; default here: {ste_to_input})",
    )
    parser.add_argument(
        "--saelens-jumprelu-init-threshold",
        default=init_threshold,
        help="SAELens's jumprelu_init_threshold: a number (its default is 0.01), or 'l0': where its "
        f"initial encoder fires the target L0 on the init tokens (default here: {init_threshold})",
    )
    parser.add_argument(
        "--saelens-jumprelu-pre-act-coef",
        type=float,
        default=None,
        help="SAELens's pre_act_loss_coefficient (Anthropic's pre-activation loss on dead latents; its "
        "default, None, is off): a sensitivity check of SAELens with the term our JumpReLU trains with",
    )


def jumprelu_settings(args) -> dict:
    """The `JumpReLUTrainingSAEConfig` fields `add_jumprelu_flags` sets before training (`training_sae`'s
    `jumprelu`); a threshold of 'l0' is set afterwards by `set_jumprelu_threshold`."""
    out = {"jumprelu_ste_to_input": bool(args.saelens_jumprelu_ste_to_input)}
    if args.saelens_jumprelu_pre_act_coef is not None:
        out["pre_act_loss_coefficient"] = args.saelens_jumprelu_pre_act_coef
    if args.saelens_jumprelu_init_threshold != "l0":
        out["jumprelu_init_threshold"] = float(args.saelens_jumprelu_init_threshold)
    return out


@torch.no_grad()
def set_jumprelu_threshold(sae, args, x: torch.Tensor) -> float:
    """With `--saelens-jumprelu-init-threshold l0`, start every threshold of SAELens's JumpReLU `sae` (b_dec
    already set) where its initial encoder fires `cfg.target_l0` latents per token of x (at its input
    scale), and record it as its `jumprelu_init_threshold`. Returns the threshold."""
    if args.saelens_jumprelu_init_threshold == "l0":
        pre = sae.encode_with_hidden_pre(x)[1].flatten()
        above = round(len(x) * sae.cfg.target_l0)  # pre-activations above the threshold
        sae.threshold.fill_(float(pre.kthvalue(len(pre) - above).values))
        sae.cfg.jumprelu_init_threshold = float(sae.threshold[0])
    return float(sae.threshold[0])


def saelens_scale(x0: torch.Tensor) -> float:
    """SAELens's `expected_average_only_in` factor: mean norm -> sqrt(d_in) (activation_scaler.py l. 90)."""
    return x0.shape[1] ** 0.5 / float(x0.norm(dim=1).mean())


def training_sae(
    arch: str,
    d_in: int,
    d_sae: int,
    l0: float,
    *,
    l1: float,
    device: str = "cpu",
    sparse: bool = True,
    widths: list[int] | None = None,
    jumprelu: dict | None = None,
    seed: int = 0,
):
    """SAELens's training SAE standing in for our `arch` (k or target L0 `l0`; `l1` for standard and
    Gated; `widths` for Matryoshka); `sparse` puts the TopK family on its sparse path; `jumprelu`: fields of
    its `JumpReLUTrainingSAEConfig` beyond the mode and target (default: its own defaults). Its initial
    weights come from torch's global generator, which torch seeds at random in every process: it is seeded
    with `seed` here (inside fork_rng, so no other draws move), and a bench's SAELens is the same from run
    to run (unseeded, its synthetic-world MCC moved by up to ~0.015 between identical runs)."""
    import sae_lens

    common = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": device}
    path = {"use_sparse_activations": sparse, "rescale_acts_by_decoder_norm": not sparse}
    make = {
        "topk": lambda: sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=int(l0), **path, **common)),
        "batchtopk": lambda: sae_lens.BatchTopKTrainingSAE(
            sae_lens.BatchTopKTrainingSAEConfig(k=l0, **path, **common)
        ),
        "matryoshka_batchtopk": lambda: sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                k=l0, matryoshka_widths=list(widths or []), **path, **common
            )
        ),
        "jumprelu": lambda: sae_lens.JumpReLUTrainingSAE(
            sae_lens.JumpReLUTrainingSAEConfig(
                jumprelu_sparsity_loss_mode="quadratic", target_l0=l0, **(jumprelu or {}), **common
            )
        ),
        "standard": lambda: sae_lens.StandardTrainingSAE(
            sae_lens.StandardTrainingSAEConfig(l1_coefficient=l1, **common)
        ),
        "gated": lambda: sae_lens.GatedTrainingSAE(
            sae_lens.GatedTrainingSAEConfig(l1_coefficient=l1, **common)
        ),
    }
    if arch not in make:
        raise ValueError(f"no SAELens counterpart wired up for {arch!r}: choose from {sorted(make)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = make[arch]()
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"  # any valid hook: the loaders need one
    return sae


def trainer(sae, cfg, *, device: str = "cpu", autocast: bool = False, dead_window_steps: int | None = None):
    """SAELens's `SAETrainer` for `sae` on the schedule of our `TrainConfig` `cfg` (see the module
    docstring); batches are given to `step` one at a time."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.train_tokens,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_warm_up_steps=min(cfg.warmup_steps, -(-cfg.total_steps // 20)),
        lr_decay_steps=int(cfg.decay_fraction * cfg.total_steps),
        device=device,
        autocast=autocast,
        **({"dead_feature_window": dead_window_steps} if dead_window_steps is not None else {}),
    )
    return SAETrainer(trainer_cfg, sae, data_provider=iter([]))


def step(t, x: torch.Tensor) -> None:
    """One step of SAELens's trainer on batch x, exactly as its `fit()` loop takes one."""
    t.maybe_reset_sparsity()
    t.step(x)
    t.n_training_steps += 1
