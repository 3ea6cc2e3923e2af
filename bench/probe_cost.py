"""Benchmark: what notebook 04's statistics cost at nanochat-d32 scale on a CPU (a free Colab session's
2 vCPUs have no GPU for them either), on synthetic data of that shape.

Shape: 34 scenarios x 3 paraphrases x 16 samples = 1,632 completions (about 1,600 from 100 prompts);
notebook 04 probes the analysis split notebook 03 never trains on, about half of them. Raw pooled
residuals d = 2048 with a decaying spectrum (256 latent factors); SAE features d_sae = 16,384,
non-negative and sparse (about 1,000 non-zero per completion, as the mean over ~30 tokens of an L0 ~ 64
SAE). Labels per answer, the prompts' lie rates varying; a weak planted signal so the fits are neither
trivial nor hopeless.

Timed, each in this one process on the same data:
- `probe_raw` / `probe_sae`: `probes.probe` with 200 permutations and 200 refitted bootstrap draws
  (notebook 04's defaults), and its random-direction control (20 one-dimensional probes);
- `sklearn_loop_raw` / `sklearn_loop_sae`: the previous approach as a careful user would write it, one
  scikit-learn `LogisticRegression` fit per permutation on the same SVD-coordinate designs (timed on 20
  permutations and scaled to 200; it had no refitting bootstrap), for the ratio;
- `features`: `features.select_and_report` over 16,384 features (effect sizes and CIs for all, the
  held-out one-sided permutation test with 2,000 permutations for the top 20).
The estimate for notebook 04's statistics at d32 (3 layers, 9 SAEs per layer: 3 raw + 3 bag-of-words
+ 27 SAE probes and 27 feature tables) excludes encoding the store through the SAEs and the windows.

With `--protocol` (the field's protocol of detection.py, timed in the same process on the same data):
the rows it adds per layer — the prompt-only probe, a random-weight SAE probe per SAE (grouped CV, no
permutations or bootstrap), every reader trained on the train set and scored on an eval set and a
400-answer control set (raw, prompt-only, 9 SAEs, 9 random SAEs), the 2 x 2 transfer matrix, the 36
SAE-vs-SAE tests with 8 SAEs re-probed at the matched L0 (the sparsest keeps its own probe) — and once
per run the multi-layer ensembles (a probe on the 3 layers concatenated with 50 refitted draws, the mean of
per-layer scores) and a 16-layer sweep (50 refitted draws per layer). The CV rows keep their size (816), so
the ratio is an upper bound. Encoding through the random SAEs and the L0-matched re-encoding are
excluded, as SAE encoding is above.

    python bench/probe_cost.py                 # 2 threads, as Colab's CPU
    python bench/probe_cost.py --threads 1 --n 1632
    python bench/probe_cost.py --device cuda --protocol   # the statistics on a GPU (logistic.DEVICE)
    # before vs after in one run, in CPU seconds (robust to other jobs on a shared machine), the old code
    # from a worktree: git worktree add --detach /tmp/base <commit>
    python bench/probe_cost.py --threads 1 --protocol --clock cpu --peer-permutations 0 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

# --baseline runs this file again with the helpers of another checkout first on the path
sys.path.insert(0, os.environ.get("PROBE_COST_CHECKOUT") or str(Path(__file__).resolve().parent.parent))
from sklearn.linear_model import LogisticRegression  # noqa: E402

from helpers.analysis import detection, features, logistic, probes  # noqa: E402
from helpers.stats import label_permutations, nested_index  # noqa: E402


def d32_data(n: int, seed: int = 0):
    """(raw [n, 2048], sae [n, 16384], y, groups, prompts) of the d32 shape (module doc)."""
    rng = np.random.default_rng(seed)
    per_prompt = 16
    n_prompts = n // per_prompt
    prompt = np.repeat(np.arange(n_prompts), per_prompt)
    group = prompt // 3
    rate = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], n_prompts)
    y = (rng.random(len(prompt)) < rate[prompt]).astype(int)
    # Residual streams are far from isotropic: 256 latent factors (group, prompt and completion effects)
    # through loadings whose scale decays as 1/sqrt(rank), plus a little isotropic noise.
    latent = (
        rng.standard_normal((group.max() + 1, 256))[group]
        + 2 * rng.standard_normal((n_prompts, 256))[prompt]
        + rng.standard_normal((len(y), 256))
    )
    latent[:, 7] += 0.8 * y  # a weak deception direction among the factors
    loadings = rng.standard_normal((256, 2048)) / np.sqrt(np.arange(1, 257))[:, None]
    raw = latent @ loadings + 0.1 * rng.standard_normal((len(y), 2048))
    sae = np.zeros((len(y), 16384), np.float32)
    for i in range(len(y)):
        on = rng.choice(16384, 1000, replace=False)
        sae[i, on] = rng.exponential(1.0, 1000)
    sae[:, :50] += 0.5 * y[:, None] * (rng.random((len(y), 50)) < 0.5)
    return raw, sae, y, group.astype(str), prompt.astype(str)


def sklearn_loop(X, y, groups, prompts, n_permutations: int) -> float:
    """Seconds for the previous approach: the same folds and designs, one sklearn fit per permutation."""
    folds = probes.grouped_folds(groups, 5, 0, y=y)
    start = time.perf_counter()
    designs = [probes.standardised_design(X, tr, te) for tr, te in folds]
    pidx, gidx = nested_index(prompts, groups)
    Y, _ = label_permutations(y, pidx, gidx, n_permutations, np.random.default_rng(1))
    for labels in np.concatenate([y[None], Y]):
        for (Z_tr, _Z_te), (tr, _te) in zip(designs, folds, strict=True):
            LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(Z_tr, labels[tr])
    return time.perf_counter() - start


def protocol_cost(raw, sae, y, groups, prompts) -> dict:
    """Seconds of the rows the field's protocol adds (module doc), on this data split by group into a
    train and an eval set, with 400 control rows drawn from another world of the same shape."""
    gidx = np.unique(groups, return_inverse=True)[1]
    train_idx, eval_idx = np.flatnonzero(gidx % 2 == 0), np.flatnonzero(gidx % 2 == 1)
    c_raw, c_sae, *_ = d32_data(400, seed=1)
    raw_all, sae_all = np.vstack([raw, c_raw]), np.vstack([sae, c_sae]).astype(np.float64)
    control_idx = np.arange(len(y), len(y) + 400)
    sets = [
        detection.EvalSet("train", "train", train_idx, y[train_idx], groups[train_idx]),
        detection.EvalSet("eval", "eval", eval_idx, y[eval_idx], groups[eval_idx]),
        detection.EvalSet("control", "control", control_idx, None, np.arange(400).astype(str)),
    ]

    def transfer(X):
        return detection.transfer_rows(lambda t, yt, tg: detection.fit_scores(X, t, yt, tg), sets, {})

    light = dict(n_permutations=0, n_bootstrap=0)
    timings = {}
    timings["prompt_only_probe"], _ = timed(lambda: probes.probe(raw, y, groups, prompts=prompts, **light))
    timings["random_sae_probe_x9"], _ = timed(
        lambda: [probes.probe(sae, y, groups, prompts=prompts, **light) for _ in range(9)]
    )
    timings["transfer_raw_and_prompt"], _ = timed(lambda: [transfer(raw_all) for _ in range(2)])
    timings["transfer_sae_and_random_x18"], _ = timed(lambda: [transfer(sae_all) for _ in range(18)])
    timings["transfer_matrix"], _ = timed(lambda: detection.transfer_matrix(raw_all, sets))
    timings["sae_vs_sae_8_reprobed_28_pairs"], _ = timed(
        lambda: [
            probes.compare_paired(a, b)
            for a, b in itertools.combinations(
                [probes.probe(sae, y, groups, prompts=prompts, **light) for _ in range(8)], 2
            )
        ]
    )
    per_layer = sum(timings.values())
    layers3 = np.hstack([raw, raw[::-1] * 0.5, raw + 0.1])
    run = {}
    run["ensemble_concat_probe"], _ = timed(
        lambda: probes.probe(layers3, y, groups, prompts=prompts, n_permutations=0, n_bootstrap=50)
    )
    run["ensemble_mean_cv"], _ = timed(lambda: [detection.cv_scores(raw, y, groups) for _ in range(3)])
    run["ensemble_transfers"], _ = timed(lambda: [transfer(raw_all) for _ in range(4)])
    run["layer_sweep_16_layers"], _ = timed(
        lambda: [
            (
                probes.probe(
                    raw[train_idx],
                    y[train_idx],
                    groups[train_idx],
                    prompts=prompts[train_idx],
                    n_permutations=0,
                    n_bootstrap=50,
                ),
                transfer(raw_all),
            )
            for _ in range(16)
        ]
    )
    return {
        "per_layer": {k: round(v, 2) for k, v in timings.items()},
        "per_layer_seconds": round(per_layer, 1),
        "per_run": {k: round(v, 2) for k, v in run.items()},
        "per_run_seconds": round(sum(run.values()), 1),
    }


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU seconds, all threads)


def timed(fn) -> tuple[float, object]:
    start = CLOCK()
    out = fn()
    return CLOCK() - start, out


def side_by_side(args, argv: list[str]) -> None:
    """--baseline: this benchmark on the baseline checkout's helpers, then on this one's, one JSON."""
    rest = [a for i, a in enumerate(argv) if a != "--baseline" and (i == 0 or argv[i - 1] != "--baseline")]
    runs = {}
    for name, checkout in (("baseline", args.baseline), ("current", "")):
        env = {**os.environ, "PROBE_COST_CHECKOUT": str(Path(checkout).resolve()) if checkout else ""}
        out = subprocess.run(
            [sys.executable, __file__, *rest], env=env, capture_output=True, text=True, check=True
        )
        runs[name] = json.loads(out.stdout)
    commit = subprocess.run(
        ["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()

    def ratios(a, b):  # current / baseline for every number both runs share
        if isinstance(a, dict):
            return {k: r for k in a if k in b and (r := ratios(a[k], b[k])) is not None} or None
        if isinstance(a, int | float) and isinstance(b, int | float) and a and not isinstance(a, bool):
            return round(b / a, 3)
        return None

    print(
        json.dumps(
            {
                "benchmark": (
                    "notebook 04 statistics before vs after, one run (bench/probe_cost.py --baseline)"
                ),
                "command": " ".join(["python", "bench/probe_cost.py", *argv]),
                "baseline_commit": commit,
                "current_over_baseline": ratios(runs["baseline"], runs["current"]),
                **runs,
            },
            indent=1,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--n", type=int, default=816, help="completions probed (816: the analysis split of 1,632)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--protocol", action="store_true", help="also time the rows the field's protocol adds")
    ap.add_argument(
        "--peer-permutations", type=int, default=20, help="sklearn fits timed, then scaled to 200"
    )
    ap.add_argument(
        "--device",
        default=None,
        help="logistic.DEVICE: cuda, cpu (torch on the CPU); default numpy on the CPU",
    )
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU seconds")
    ap.add_argument("--baseline", help="a checkout of older code (git worktree): run both, one JSON")
    args = ap.parse_args()
    if args.baseline:
        return side_by_side(args, sys.argv[1:])
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    logistic.DEVICE = args.device
    dev = getattr(logistic, "pick_device", lambda: None)()  # a baseline checkout may predate it
    raw, sae, y, groups, prompts = d32_data(args.n)
    out: dict = {}
    with threadpool_limits(limits=args.threads):
        for name, X in (("raw", raw), ("sae", sae)):
            t, r = timed(
                lambda X=X: probes.probe(X, y, groups, prompts=prompts, n_permutations=200, n_bootstrap=200)
            )
            t_rd, _ = timed(lambda X=X: probes.random_direction_control(X, y, groups, n_directions=20))
            t_sk = (
                sklearn_loop(X, y, groups, prompts, args.peer_permutations)
                * 201
                / (args.peer_permutations + 1)
                if args.peer_permutations
                else float("nan")
            )
            out[f"probe_{name}"] = {
                "seconds": round(t, 1),
                "random_direction_control_seconds": round(t_rd, 1),
                "balanced_accuracy": round(r.balanced_accuracy, 3),
                "ba_ci": [round(v, 3) for v in r.ba_ci],
                "p_value": round(r.p_value, 4),
            }
            out[f"sklearn_loop_{name}"] = {"seconds_for_200_permutations_no_bootstrap": round(t_sk, 1)}
            out[f"speedup_{name}"] = round(t_sk / t, 2)
        t_f, rows = timed(
            lambda: features.select_and_report(sae, y, groups, prompts=prompts, k=20, n_permutations=2000)
        )
        out["features"] = {"seconds": round(t_f, 1), "top_p_value": rows[0]["p_value"]}
        if args.protocol:
            out["protocol"] = protocol_cost(raw, sae, y, groups, prompts)
    per_layer = (
        out["probe_raw"]["seconds"]
        + out["probe_raw"]["random_direction_control_seconds"]
        + 9
        * (
            out["probe_sae"]["seconds"]
            + out["probe_sae"]["random_direction_control_seconds"]
            + out["features"]["seconds"]
        )
    )
    today = 3 * per_layer
    if args.protocol:
        added = 3 * out["protocol"]["per_layer_seconds"] + out["protocol"]["per_run_seconds"]
        out["protocol"]["ratio_to_today"] = round((today + added) / today, 3)
        out["protocol"]["estimate_with_protocol_minutes"] = round((today + added) / 60, 1)
    if dev is None:
        statistics_device = "numpy (CPU)"
    else:
        statistics_device = str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
    print(
        json.dumps(
            {
                "benchmark": (
                    "notebook 04 statistics at nanochat-d32 scale, synthetic data (bench/probe_cost.py)"
                ),
                "command": " ".join(["python", "bench/probe_cost.py", *sys.argv[1:]]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} BLAS threads",
                "clock": "process CPU seconds" if args.clock == "cpu" else "wall seconds",
                "statistics_device": statistics_device,
                "n_completions": args.n,
                "d_model": 2048,
                "d_sae": 16384,
                **out,
                "estimate_notebook_04_statistics_3_layers_9_saes_minutes": round(today / 60, 1),
                "excluded": (
                    "bag-of-words probes (~ a raw probe each), encoding the store through the SAEs, "
                    "example windows"
                ),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
