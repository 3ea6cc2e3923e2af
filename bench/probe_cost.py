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

    python bench/probe_cost.py                 # 2 threads, as Colab's CPU
    python bench/probe_cost.py --threads 1 --n 1632
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sklearn.linear_model import LogisticRegression  # noqa: E402

from helpers.analysis import features, probes  # noqa: E402
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
    latent = (rng.standard_normal((group.max() + 1, 256))[group] + 2 * rng.standard_normal((n_prompts, 256))[prompt]
              + rng.standard_normal((len(y), 256)))  # fmt: skip
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
    designs = [probes._standardised(X, tr, te) for tr, te in folds]
    pidx, gidx = nested_index(prompts, groups)
    Y, _ = label_permutations(y, pidx, gidx, n_permutations, np.random.default_rng(1))
    for labels in np.concatenate([y[None], Y]):
        for (Z_tr, _Z_te), (tr, _te) in zip(designs, folds, strict=True):
            LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(Z_tr, labels[tr])
    return time.perf_counter() - start


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--n", type=int, default=816, help="completions probed (816: the analysis split of 1,632)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--peer-permutations", type=int, default=20, help="sklearn fits timed, then scaled to 200"
    )
    args = ap.parse_args()
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
            )
            out[f"probe_{name}"] = {"seconds": round(t, 1), "random_direction_control_seconds": round(t_rd, 1),
                                    "balanced_accuracy": round(r.balanced_accuracy, 3), "ba_ci": [round(v, 3) for v in r.ba_ci],
                                    "p_value": round(r.p_value, 4)}  # fmt: skip
            out[f"sklearn_loop_{name}"] = {"seconds_for_200_permutations_no_bootstrap": round(t_sk, 1)}
            out[f"speedup_{name}"] = round(t_sk / t, 2)
        t_f, rows = timed(
            lambda: features.select_and_report(sae, y, groups, prompts=prompts, k=20, n_permutations=2000)
        )
        out["features"] = {"seconds": round(t_f, 1), "top_p_value": rows[0]["p_value"]}
    per_layer = out["probe_raw"]["seconds"] + out["probe_raw"]["random_direction_control_seconds"] + 9 * (
        out["probe_sae"]["seconds"] + out["probe_sae"]["random_direction_control_seconds"] + out["features"]["seconds"])  # fmt: skip
    print(json.dumps({
        "benchmark": "notebook 04 statistics at nanochat-d32 scale, synthetic data (bench/probe_cost.py)",
        "command": " ".join(["python", "bench/probe_cost.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} BLAS threads",
        "n_completions": args.n, "d_model": 2048, "d_sae": 16384,
        **out,
        "estimate_notebook_04_statistics_3_layers_9_saes_minutes": round(3 * per_layer / 60, 1),
        "excluded": "bag-of-words probes (~ a raw probe each), encoding the store through the SAEs, example windows",
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
