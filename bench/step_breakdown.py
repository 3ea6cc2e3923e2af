"""Benchmark: where a training step of ours and of SAELens's spends its time, phase by phase (issue 25).

    python bench/step_breakdown.py --archs topk,standard --d-in 64 --d-sae 512 --batch 1024 --threads 1
    python bench/step_breakdown.py --archs standard,jumprelu,gated --world synthetic --l0 157 --warmup 300 \
        --saelens --threads 1      # the dense phase on bench/synthetic_quality.py's world, beside SAELens

The loop body of `Trainer.train_step`, run phase by phase with the thread's CPU time after each: the
forward (`losses`, the encoder's product included), the backward, clipping, Adam, and the rest (zeroing the
gradients, the architecture's controllers, the firing counts). Beside them, timed alone on the same shapes,
the operations SAELens's step runs too: the encoder's dense product and, for TopK, `torch.topk` of each
token's k largest pre-activations. With `--saelens`, SAELens's own trainer (bench/saelens_setup.py, its
`--l1` for standard and Gated, the target L0 for JumpReLU) takes the same batches at its input scale, after
the same warm-up, and its steps are split by hooks into the same phases (forward: its
`training_forward_pass`; backward: until the last parameter's gradient is accumulated, with its firing
bookkeeping; clip; Adam; the rest: zeroing, schedulers), thread CPU time too; the system share of each
trainer's time (page faults of fresh [batch, d_sae] tensors) is reported beside it.

Data: `--world sparse` (default), a synthetic sparse world (`--true-l0` of `--d-sae` random unit directions
per token, magnitudes uniform in [0, 1)); `--world synthetic`, bench/synthetic_quality.py's SynthSAEBench
world (`--d-sae` features in `--d-in` dims: 64 x 512 there). The SAE's size and batch are SAELens's synthetic
benchmark's by default (64 x 512, batch 1024). The SAE first trains `--warmup` steps (so `--l0` and the
warm-up pick the density of the timed steps: the standard SAE is dense above kernels.DENSE_ABOVE), then
`--steps` are timed. One JSON on stdout, milliseconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.saes.train import TrainConfig, Trainer, clip_grad_norm  # noqa: E402

PHASES = ("forward", "backward", "clip", "adam", "rest")


def world(n: int, d_in: int, n_features: int, true_l0: float, g: torch.Generator) -> torch.Tensor:
    """[n, d_in]: about `true_l0` of `n_features` fixed random unit directions per token."""
    dictionary = torch.nn.functional.normalize(
        torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(0)), dim=1
    )
    on = torch.rand(n, n_features, generator=g) < true_l0 / n_features
    return (on * torch.rand(n, n_features, generator=g)) @ dictionary


def per_call_ms(fn, repeats: int) -> float:
    """The fastest of 5 rounds of `repeats` calls, CPU time per call in ms."""
    fn()
    best = float("inf")
    for _ in range(5):
        c = time.thread_time()
        for _ in range(repeats):
            fn()
        best = min(best, (time.thread_time() - c) / repeats)
    return round(best * 1000, 3)


def cpu_ms() -> tuple[float, float]:
    """(this thread's CPU time, its system part), in ms."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return time.thread_time() * 1000, usage.ru_stime * 1000


def batches_for(args: argparse.Namespace) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the trainers' init sample [4 batches, d_in], the warm-up and timed batches) from `--world`."""
    n_batches = args.warmup + args.steps
    if args.world == "synthetic":  # bench/synthetic_quality.py's world, its defaults
        from bench.synthetic_quality import synthetic_world

        world_args = argparse.Namespace(
            features=args.d_sae,
            hidden=args.d_in,
            max_prob=0.2,
            min_prob=0.01,
            orthogonalize=0,
            seed=args.seed,
        )
        synthetic = synthetic_world(world_args)
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            xs = [synthetic.sample(args.batch) for _ in range(4 + n_batches)]
        return torch.cat(xs[:4]), xs[4:]
    g = torch.Generator().manual_seed(args.seed)
    init = world(4 * args.batch, args.d_in, args.d_sae, args.true_l0, g)
    return init, [world(args.batch, args.d_in, args.d_sae, args.true_l0, g) for _ in range(n_batches)]


def breakdown(arch: str, args: argparse.Namespace) -> dict:
    l0 = args.l0 if args.l0 is not None else round(args.true_l0)
    cfg = TrainConfig(
        architecture=arch,
        expansion=args.d_sae // args.d_in,
        l0=l0,
        train_tokens=args.batch * 1000,
        batch_size=args.batch,
        precision="fp32",
        seed=args.seed,
    )
    run = Trainer(cfg, args.d_in)
    init, batches = batches_for(args)
    run.init_from_data(init)
    for x in batches[: args.warmup]:
        run.train_step(x)
    sae, phases = run.sae, dict.fromkeys(PHASES, 0.0)
    start = cpu_ms()
    for x in batches[args.warmup :]:  # Trainer.train_step's body (fp32 on CPU: no scaler), phase by phase
        t = [time.thread_time()]
        x = x * run.scale
        for group in run.opt.param_groups:
            group["lr"] = cfg.lr_at(run.step)
        out = sae.losses(x, sae.dead_mask(cfg.dead_after))
        t.append(time.thread_time())
        out.loss.backward()
        t.append(time.thread_time())
        sae.project_decoder_grad()
        clip_grad_norm(run.params, cfg.grad_clip)  # the trainer's own clipping
        t.append(time.thread_time())
        run.opt.step()
        t.append(time.thread_time())
        run.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        sae.after_step(out)
        sae.record_firing(out.fired, len(x))
        run.step += 1
        t.append(time.thread_time())
        for name, a, b in zip(phases, t[:-1], t[1:], strict=True):
            phases[name] += (b - a) * 1000 / args.steps
    end = cpu_ms()
    x = batches[-1] * run.scale
    with torch.no_grad():
        x_c = x - sae.b_dec
        bias = getattr(sae, "b_enc", torch.zeros(sae.d_sae))  # Gated's shared product has no bias
        pre = torch.addmm(bias, x_c, sae.W_enc)
        shared = {"encoder_product": per_call_ms(lambda: torch.addmm(bias, x_c, sae.W_enc), 20)}
        if arch == "topk":
            shared["topk"] = per_call_ms(lambda: pre.topk(round(l0), dim=-1, sorted=False), 20)
    result = {
        "step_ms": round((end[0] - start[0]) / args.steps, 3),
        "system_ms": round((end[1] - start[1]) / args.steps, 3),
        "phases_ms": {k: round(v, 3) for k, v in phases.items()},
        "shared_with_saelens_ms": shared,
        "l0": round(out.l0, 1),
        "dead": int(sae.dead_mask(cfg.dead_after).sum()),
    }
    if args.saelens:
        result["saelens"] = saelens_breakdown(arch, args, cfg, init, batches)
        result["step_ratio_saelens_over_ours"] = round(result["saelens"]["step_ms"] / result["step_ms"], 2)
    return result


def saelens_breakdown(
    arch: str, args: argparse.Namespace, cfg: TrainConfig, init: torch.Tensor, batches: list[torch.Tensor]
) -> dict:
    """SAELens's trainer on the same batches (at its input scale, mean norm sqrt(d_in)), its steps split into
    phases by hooks, so that its own step (`saelens_setup.step`) runs unchanged."""
    from bench import saelens_setup

    warnings.filterwarnings("ignore", category=UserWarning)
    scale = saelens_setup.saelens_scale(init)
    sae = saelens_setup.training_sae(arch, args.d_in, args.d_sae, cfg.l0, l1=args.l1)
    trainer = saelens_setup.trainer(sae, cfg)
    for x in batches[: args.warmup]:
        saelens_setup.step(trainer, x * scale)
    marks: dict[str, float] = {}
    forward = sae.training_forward_pass

    def timed_forward(*a, **k):
        out = forward(*a, **k)
        marks["forward"] = time.thread_time()
        return out

    def mark(name):
        return lambda *_: marks.__setitem__(name, time.thread_time())

    sae.training_forward_pass = timed_forward
    hooks = [p.register_post_accumulate_grad_hook(mark("backward")) for p in sae.parameters()]
    hooks.append(trainer.optimizer.register_step_pre_hook(mark("clip")))
    hooks.append(trainer.optimizer.register_step_post_hook(mark("adam")))
    phases = dict.fromkeys(PHASES, 0.0)
    start = cpu_ms()
    for x in batches[args.warmup :]:
        x = x * scale
        t0 = time.thread_time()
        saelens_setup.step(trainer, x)
        marks["rest"] = time.thread_time()
        for name in PHASES:
            phases[name] += (marks[name] - t0) * 1000 / args.steps
            t0 = marks[name]
    end = cpu_ms()
    for h in hooks:
        h.remove()
    sae.training_forward_pass = forward
    with torch.no_grad():
        feats = sae.encode(batches[-1] * scale)  # a sparse tensor on SAELens's sparse TopK path
        l0 = float(((feats.to_dense() if feats.is_sparse else feats) > 0).sum(-1).float().mean())
    return {
        "step_ms": round((end[0] - start[0]) / args.steps, 3),
        "system_ms": round((end[1] - start[1]) / args.steps, 3),
        "phases_ms": {k: round(v, 3) for k, v in phases.items()},
        "l0": round(l0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="topk,standard")
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--true-l0", type=float, default=7.5, help="active directions per token in the world")
    p.add_argument("--l0", type=float, default=None, help="the SAE's k / target L0 (default: true L0)")
    p.add_argument("--world", choices=("sparse", "synthetic"), default="sparse", help="the data (docstring)")
    p.add_argument("--saelens", action="store_true", help="SAELens's step beside ours, phase by phase")
    p.add_argument(
        "--l1",
        type=float,
        default=0.3,
        help="SAELens's l1_coefficient (standard, Gated), as synthetic_quality's",
    )
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    for arch in args.archs.split(","):
        result[arch] = breakdown(arch, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
