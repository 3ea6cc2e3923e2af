"""Ablations of our JumpReLU on the synthetic world, each a run of bench/synthetic_quality.py with flags.

    python bench/jumprelu_ablations.py                                   # all, 1M samples, lr 3e-3
    python bench/jumprelu_ablations.py --only baseline,token_penalty --tokens 5000000 --pool 500000 \\
        --lrs 1e-3,3e-3 --out bench/results/synthetic_quality_cpu_jumprelu_ablations_5m.json

Every ablation is a set of command-line flags of bench/synthetic_quality.py (`--ours-sae-option NAME=VALUE`
for a constructor argument of `JumpReLUSAE`, `--ours-decoder-norm` / `--ours-free-decoder` for its class
settings, `--ours-grad-clip`) after the spelled-out BASELINE, so each row of the output records the exact
command that reproduces it, and its commit. SAELens runs again beside every ablation (the same settings each
time: the spread of its figures across rows is its run-to-run noise). The output file is rewritten after
every run and a rerun skips the names it already holds (with the same common flags), so an interrupted sweep
resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent


def option(name: str, value) -> list[str]:
    return ["--ours-sae-option", f"{name}={value}"]


BASELINE = [
    *("--ours-decoder-norm", "0.1", "--ours-free-decoder", "1"),
    *option("bandwidth", 0.005),
    *option("init_threshold", 0.001),
    *option("coef_rate", 0.02),
    *option("pre_act_coef", 0),
    *option("threshold_lr_scale", 1),
]
"""The settings of 320af19 (decoder rows from 0.1, free; bandwidth 0.005; thresholds from 0.001; λ steered at
0.02; no pre-activation loss; θ at the trainer's learning rate throughout), spelled out so that each command
below reproduces its row whatever the defaults become: an ablation's own flags come after these and override
them (argparse and `--ours-sae-option` keep the last value)."""

ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the settings of 320af19 (BASELINE)", []),
    "before_320af19": (
        "unit decoder rows held, bandwidth 0.001 (the settings before 320af19)",
        ["--ours-decoder-norm", "1", "--ours-free-decoder", "0", *option("bandwidth", 0.001)],
    ),
    "bandwidth_0.001": ("bandwidth 0.001", option("bandwidth", 0.001)),
    "bandwidth_0.01": ("bandwidth 0.01", option("bandwidth", 0.01)),
    "bandwidth_0.02": ("bandwidth 0.02", option("bandwidth", 0.02)),
    "threshold_0.01": ("thresholds start at 0.01", option("init_threshold", 0.01)),
    "threshold_0.0001": ("thresholds start at 0.0001", option("init_threshold", 0.0001)),
    "no_grad_clip": ("no gradient clipping", ["--ours-grad-clip", "1e9"]),
    "fixed_coef": ("λ fixed at its initial 0.01 (coef_rate 0)", option("coef_rate", 0)),
    "coef_rate_0.005": ("λ steered 4x slower (coef_rate 0.005)", option("coef_rate", 0.005)),
    "coef_rate_0.08": ("λ steered 4x faster (coef_rate 0.08)", option("coef_rate", 0.08)),
    "token_penalty": (
        "the quadratic penalty on each token's L0 (SAELens's form) instead of the batch mean",
        option("l0_penalty", "token"),
    ),
    "sqrt_d_in": (
        "trained at mean norm sqrt(d_in) (SAELens's scale, 8x the unit scale here), bandwidth, threshold and "
        "λ rescaled to match (x8, x8, x64): the same SAE, but every Adam step is 8x smaller against the data",
        [
            *("--ours-input-norm", "sqrt_d_in"),
            *option("bandwidth", 0.04),
            *option("init_threshold", 0.008),
            *option("sparsity_coef", 0.64),
        ],
    ),
    **{
        f"pre_act_{c}": (
            f"Anthropic's pre-activation loss on dead latents, coefficient {c}",
            option("pre_act_coef", c),
        )
        for c in ("1e-3", "1e-2", "3e-2", "1e-1")
    },
    "threshold_lr_third_after_400": (
        "θ at 1/3 of the trainer's learning rate after its first 400 steps (the default since 584714e)",
        [*option("threshold_lr_scale", 1 / 3), *option("threshold_slow_after", 400)],
    ),
    "pre_act_1e-2_coef_rate_0.08": (
        "pre-activation loss 1e-2 and λ steered 4x faster",
        [*option("pre_act_coef", "1e-2"), *option("coef_rate", 0.08)],
    ),
}

SUMMARY = ("mcc", "f1", "precision", "recall", "explained_variance", "l0", "dead_latents")


def commit() -> str:
    """HEAD, and the files of the SAE code that differ from it (the defaults an ablation is relative to)."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git(
        "diff",
        "--name-only",
        "HEAD",
        "--",
        "helpers/saes",
        "bench/synthetic_quality.py",
        "bench/saelens_setup.py",
    )
    return git("rev-parse", "--short", "HEAD") + (
        f" + uncommitted {', '.join(dirty.split())}" if dirty else ""
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated names (default: all): {', '.join(ABLATIONS)}")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--pool", type=int, default=200_000)
    p.add_argument("--lrs", default="3e-3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench/results/synthetic_quality_cpu_jumprelu_ablations_1m.json"
    )
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(ABLATIONS)
    if unknown := [n for n in names if n not in ABLATIONS]:
        raise SystemExit(f"unknown ablation(s) {unknown}: choose from {', '.join(ABLATIONS)}")
    common = [
        "--archs",
        "jumprelu",
        "--tokens",
        str(args.tokens),
        "--pool",
        str(args.pool),
        "--lrs",
        args.lrs,
    ]
    common += ["--saelens-careful", "--threads", str(args.threads), "--seed", str(args.seed)]
    result = {"common_flags": shlex.join(common), "runs": {}}
    if args.out.exists():
        result = json.loads(args.out.read_text())
        if result.get("common_flags") != shlex.join(common):
            raise SystemExit(
                f"{args.out} holds runs with other common flags ({result.get('common_flags')}): give another "
                "--out, or the same --tokens/--pool/--lrs/--threads/--seed to resume it"
            )
    for name in tqdm([n for n in names if n not in result["runs"]], desc="ablations"):
        what, flags = ABLATIONS[name]
        command = ["python", "bench/synthetic_quality.py", *common, *BASELINE, *flags]
        done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        output = json.loads(done.stdout)
        runs = {k: v for k, v in output["jumprelu"].items() if k.startswith("lr=")}
        result["runs"][name] = {
            "what": what,
            "command": shlex.join(command),
            "commit": commit(),
            "summary": {
                lr: {who: {m: r[who][m] for m in SUMMARY} for who in ("ours", "saelens")}
                for lr, r in runs.items()
            },
            "output": output,
        }
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, args.out)
        print(json.dumps({name: result["runs"][name]["summary"]}), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
