"""Simulated worlds for calibrating the suite's statistics (tests/analysis/test_calibration.py, and the
larger bench/calibration.py): the designs notebook 02 produces, with the random effects real
completions have, and no label signal unless one is planted.

Every world has groups (facts, scenarios), prompts nested in them, several completions per prompt, and
activations = group effect + prompt effect + completion noise (each an independent Gaussian vector),
so completions of one prompt, and prompts of one group, are correlated as real ones are. Designs:

- "contrast": per group one honest and one lie prompt (labels fixed per prompt: contrast pairs);
- "paraphrase": per group several paraphrase prompts, each labelled as a whole at random (scenario
  prompts whose answers are all judged alike);
- "sampled": per group several prompts, each completion labelled on its own with a prompt-specific
  probability of lying (same-prompt sampling judged per answer).

`signal` plants a shift of `signal` (in noise SDs) along one unit direction for deceptive rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DESIGNS = ("contrast", "paraphrase", "sampled")


@dataclass
class World:
    X: np.ndarray  # [n, d] pooled activations (dense) or per-completion feature means (sparse, >= 0)
    y: np.ndarray  # [n] 0/1
    prompts: np.ndarray  # [n] prompt ids
    groups: np.ndarray  # [n] group ids
    direction: np.ndarray | None = None  # the planted direction, when there is one


def labels_and_ids(rng: np.random.Generator, design: str, n_groups: int, n_prompts: int, n_samples: int):
    """(y, prompt index, group index) of one world's rows."""
    if design == "contrast":
        n_prompts = 2
    g = np.repeat(np.arange(n_groups), n_prompts * n_samples)
    p = np.repeat(np.arange(n_groups * n_prompts), n_samples)
    if design == "contrast":
        y = np.repeat(np.tile([0, 1], n_groups), n_samples)
    elif design == "paraphrase":
        prompt_labels = rng.integers(0, 2, n_groups * n_prompts)
        # keep both classes in the world (a one-class world cannot be probed)
        prompt_labels[:2] = [0, 1]
        y = prompt_labels[p]
    elif design == "sampled":
        rate = rng.choice([0.0, 0.2, 0.5, 0.8, 1.0], n_groups * n_prompts)
        y = (rng.random(len(p)) < rate[p]).astype(int)
        y[:2] = [0, 1]
    else:
        raise ValueError(f"unknown design {design!r}: choose one of {DESIGNS}")
    return y, p, g


def dense_world(
    rng: np.random.Generator,
    design: str = "contrast",
    *,
    n_groups: int = 40,
    n_prompts: int = 4,
    n_samples: int = 4,
    d: int = 16,
    group_sd: float = 1.0,
    prompt_sd: float = 2.0,
    noise_sd: float = 0.5,
    signal: float = 0.0,
) -> World:
    """Pooled activations of one world (the referee's W1 world: prompt sd 2, noise 0.5, d 16)."""
    y, p, g = labels_and_ids(rng, design, n_groups, n_prompts, n_samples)
    X = (
        group_sd * rng.standard_normal((g.max() + 1, d))[g]
        + prompt_sd * rng.standard_normal((p.max() + 1, d))[p]
        + noise_sd * rng.standard_normal((len(y), d))
    )
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    X += signal * noise_sd * np.outer(y, u)
    return World(X, y, np.array([f"p{i}" for i in p]), np.array([f"g{i}" for i in g]), u)


def sparse_world(
    rng: np.random.Generator,
    design: str = "contrast",
    *,
    n_groups: int = 60,
    n_prompts: int = 4,
    n_samples: int = 4,
    d: int = 200,
    prompt_share: float = 0.5,
    signal: float = 0.0,
    n_signal: int = 0,
) -> World:
    """Per-completion SAE feature means of one world: ReLU(latent - threshold) with latent = group +
    prompt + noise effects, `prompt_share` of the latent variance per prompt (half at the W3 world),
    thresholds spread so features fire on 5-60% of completions. The first `n_signal` features get
    `signal` latent SDs more for deceptive rows."""
    y, p, g = labels_and_ids(rng, design, n_groups, n_prompts, n_samples)
    share_g = 0.25
    latent = (
        np.sqrt(share_g) * rng.standard_normal((g.max() + 1, d))[g]
        + np.sqrt(prompt_share) * rng.standard_normal((p.max() + 1, d))[p]
        + np.sqrt(max(1 - prompt_share - share_g, 0.05)) * rng.standard_normal((len(y), d))
    )
    latent[:, :n_signal] += signal * y[:, None]
    threshold = rng.uniform(-0.3, 1.6, d)
    X = np.maximum(latent - threshold, 0.0) * rng.uniform(0.5, 3.0, d)
    return World(X, y, np.array([f"p{i}" for i in p]), np.array([f"g{i}" for i in g]))
