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
  probability of lying (same-prompt sampling judged per answer);
- "grouped" (not in DESIGNS): every prompt of a group carries the group's label, half the groups each
  (scenarios that are all deceptive or all honest: a label sits in few groups when groups are few).

`deceptive_share` (paraphrase and grouped) sets the share of deceptive prompts or groups (0.2: 80/20).

`signal` plants a shift of `signal` (in noise SDs) along one unit direction for deceptive rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

DESIGNS = ("contrast", "paraphrase", "sampled")


@dataclass
class World:
    X: np.ndarray  # [n, d] pooled activations (dense) or per-completion feature means (sparse, >= 0)
    y: np.ndarray  # [n] 0/1
    prompts: np.ndarray  # [n] prompt ids
    groups: np.ndarray  # [n] group ids
    direction: np.ndarray | None = None  # the planted direction, when there is one

    @classmethod
    def of(cls, X: np.ndarray, y: np.ndarray, p: np.ndarray, g: np.ndarray, direction=None) -> World:
        """A world whose prompt and group numbers `p`, `g` become the ids "p{i}", "g{i}"."""
        return cls(X, y, np.array([f"p{i}" for i in p]), np.array([f"g{i}" for i in g]), direction)


def labels_and_ids(
    rng: np.random.Generator,
    design: str,
    n_groups: int,
    n_prompts: int,
    n_samples: int,
    deceptive_share: float = 0.5,
):
    """(y, prompt index, group index) of one world's rows."""
    if design == "contrast":
        n_prompts = 2
    g = np.repeat(np.arange(n_groups), n_prompts * n_samples)
    p = np.repeat(np.arange(n_groups * n_prompts), n_samples)
    if design == "contrast":
        y = np.repeat(np.tile([0, 1], n_groups), n_samples)
    elif design == "paraphrase":
        prompt_labels = (rng.random(n_groups * n_prompts) < deceptive_share).astype(int)
        # keep both classes in the world (a one-class world cannot be probed)
        prompt_labels[:2] = [0, 1]
        y = prompt_labels[p]
    elif design == "sampled":
        rate = rng.choice([0.0, 0.2, 0.5, 0.8, 1.0], n_groups * n_prompts)
        y = (rng.random(len(p)) < rate[p]).astype(int)
        y[:2] = [0, 1]
    elif design == "grouped":
        n_dec = min(max(round(deceptive_share * n_groups), 1), n_groups - 1)
        group_labels = rng.permutation(np.r_[np.ones(n_dec, int), np.zeros(n_groups - n_dec, int)])
        y = group_labels[g]
    else:
        raise ValueError(f"unknown design {design!r}: choose one of {DESIGNS}")
    return y, p, g


def random_effects(
    rng: np.random.Generator, g: np.ndarray, p: np.ndarray, d: int, group_sd, prompt_sd, noise_sd
) -> np.ndarray:
    """[n, d]: `group_sd` x a normal draw per group + `prompt_sd` x one per prompt + `noise_sd` x one per
    row (drawn in that order)."""
    return (
        group_sd * rng.standard_normal((g.max() + 1, d))[g]
        + prompt_sd * rng.standard_normal((p.max() + 1, d))[p]
        + noise_sd * rng.standard_normal((len(g), d))
    )


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
    deceptive_share: float = 0.5,
) -> World:
    """Pooled activations of one world (the referee's W1 world: prompt sd 2, noise 0.5, d 16)."""
    y, p, g = labels_and_ids(rng, design, n_groups, n_prompts, n_samples, deceptive_share)
    X = random_effects(rng, g, p, d, group_sd, prompt_sd, noise_sd)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    X += signal * noise_sd * np.outer(y, u)
    return World.of(X, y, p, g, u)


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
    deceptive_share: float = 0.5,
) -> World:
    """Per-completion SAE feature means of one world: ReLU(latent - threshold) with latent = group +
    prompt + noise effects, `prompt_share` of the latent variance per prompt (half at the W3 world),
    thresholds spread so features fire on 5-60% of completions. The first `n_signal` features get
    `signal` latent SDs more for deceptive rows."""
    y, p, g = labels_and_ids(rng, design, n_groups, n_prompts, n_samples, deceptive_share)
    share_g = 0.25
    noise_share = max(1 - prompt_share - share_g, 0.05)
    latent = random_effects(rng, g, p, d, np.sqrt(share_g), np.sqrt(prompt_share), np.sqrt(noise_share))
    latent[:, :n_signal] += signal * y[:, None]
    threshold = rng.uniform(-0.3, 1.6, d)
    X = np.maximum(latent - threshold, 0.0) * rng.uniform(0.5, 3.0, d)
    return World.of(X, y, p, g)


# --- the statistics under test, behind one small interface -----------------------------------------
# `current()` wraps this checkout's functions; bench/calibration.py wraps the code of an older commit in
# the same shape (`impl` below), so one experiment measures both.


def current() -> SimpleNamespace:
    """The suite's statistics as they are in this checkout."""
    from helpers.analysis import features, probes, scoring
    from helpers.analysis.contexts import FeatureContexts, window_record
    from helpers.collect.completions import analysis_split
    from helpers.steer import pipeline as experiments

    def probe(X, y, groups, prompts, *, n_permutations, n_bootstrap, seed):
        r = probes.probe(
            X, y, groups, prompts=prompts, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed
        )
        return r.p_value, r.ba_ci, r.auroc_ci, r

    def compare(a, b):
        c = probes.compare_paired(a, b)
        return c["p_value"], c["ba_difference_ci"], c["auroc_difference_ci"]

    def feature_tests(acts, y, groups, prompts, *, k, n_permutations, seed):
        rows = features.select_and_report(
            acts, y, groups, prompts=prompts, k=k, n_permutations=n_permutations, seed=seed
        )
        return [(r["p_value"], r["q_value"], r["d_ci"]) for r in rows], []

    def d_cis(acts, y, groups):
        return [r["d_ci"] for r in features.feature_stats(acts, y, groups=groups)]

    def steering(rows):
        return [(o["p_value"], o["difference_ci"]) for o in experiments.compare_to_controls(rows)]

    def rate_ci(samples):
        return experiments.condition_stats(samples)["rate_ci"]

    def reserved(records, seed):
        return set(analysis_split(records, seed=seed)[1])

    return SimpleNamespace(
        name="current",
        probe=probe,
        compare=compare,
        feature_tests=feature_tests,
        d_cis=d_cis,
        steering=steering,
        rate_ci=rate_ci,
        reserved=reserved,
        fuzzing_windows=scoring.fuzzing_windows,
        window_record=window_record,
        FeatureContexts=FeatureContexts,
    )


# --- experiments: each runs n worlds and returns rates ----------------------------------------------
PROBE_SIZE = dict(n_groups=24, n_prompts=3, n_samples=3, d=8)


def probe_calibration(
    impl,
    design: str,
    n_worlds: int,
    *,
    seed: int = 0,
    n_permutations: int = 19,
    n_bootstrap: int = 40,
    size: dict | None = None,
) -> dict:
    """Permutation p-value false-positive rates (at 0.05 and 0.10) and null coverage of the CIs of
    balanced accuracy and AUROC, over null worlds of `design`."""
    rej05, rej10, cov_ba, cov_auc = [], [], [], []
    for w in range(n_worlds):
        W = dense_world(np.random.default_rng([seed, 1, w]), design, **(size or PROBE_SIZE))
        p, ba_ci, auc_ci, _ = impl.probe(
            W.X, W.y, W.groups, W.prompts, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=w
        )
        rej05.append(p <= 0.05 + 1e-9)
        rej10.append(p <= 0.10 + 1e-9)
        if n_bootstrap:
            cov_ba.append(ba_ci[0] <= 0.5 <= ba_ci[1])
            cov_auc.append(auc_ci[0] <= 0.5 <= auc_ci[1])
    out: dict = {"n_worlds": n_worlds}
    if n_permutations:
        out.update(
            {
                "false_positive_rate_0.05": float(np.mean(rej05)),
                "false_positive_rate_0.10": float(np.mean(rej10)),
            }
        )
    if n_bootstrap:
        out.update(ba_ci_coverage=float(np.mean(cov_ba)), auroc_ci_coverage=float(np.mean(cov_auc)))
    return out


def paired_calibration(
    impl, design: str, n_worlds: int, *, seed: int = 0, n_bootstrap: int = 0, size: dict | None = None
) -> dict:
    """Raw-vs-SAE style comparisons of two probes that are both null on the same rows: the paired
    test's false-positive rate and (with `n_bootstrap`) the null coverage of the difference CIs."""
    rej, cov_ba, cov_auc = [], [], []
    for w in range(n_worlds):
        rng = np.random.default_rng([seed, 2, w])
        W = dense_world(rng, design, **(size or PROBE_SIZE))
        other = dense_world(rng, design, **(size or PROBE_SIZE)).X  # other features, the same structure
        kw = dict(n_permutations=0, n_bootstrap=n_bootstrap, seed=w)
        a, b = (
            impl.probe(W.X, W.y, W.groups, W.prompts, **kw)[3],
            impl.probe(other, W.y, W.groups, W.prompts, **kw)[3],
        )
        p, ba_ci, auc_ci = impl.compare(a, b)
        rej.append(p <= 0.05)
        if n_bootstrap:
            cov_ba.append(ba_ci[0] <= 0 <= ba_ci[1])
            cov_auc.append(auc_ci[0] <= 0 <= auc_ci[1])
    out = {"n_worlds": n_worlds, "false_positive_rate_0.05": float(np.mean(rej))}
    if n_bootstrap:
        out.update(
            ba_difference_ci_coverage=float(np.mean(cov_ba)),
            auroc_difference_ci_coverage=float(np.mean(cov_auc)),
        )
    return out


FEATURE_SIZE = dict(n_groups=40, n_prompts=4, n_samples=4, d=200)


def feature_calibration(
    impl,
    design: str,
    n_worlds: int,
    *,
    seed: int = 0,
    k: int = 20,
    n_permutations: int = 99,
    size: dict | None = None,
) -> dict:
    """Held-out tests of the k chosen features in null worlds: the share of chosen features at p <=
    0.05, the share of worlds with any q <= 0.05 (family-wise error over the k) and the CI of d's null
    coverage; `all_feature_q_0.01` counts null features per world at q < 0.01 where an implementation
    reports q-values over all features (the old one did)."""
    rej, any_q, cov, all_q = [], [], [], []
    for w in range(n_worlds):
        W = sparse_world(np.random.default_rng([seed, 3, w]), design, **(size or FEATURE_SIZE))
        rows, q_all = impl.feature_tests(
            W.X, W.y, W.groups, W.prompts, k=k, n_permutations=n_permutations, seed=w
        )
        rej += [p <= 0.05 for p, _, _ in rows]
        any_q.append(min(q for _, q, _ in rows) <= 0.05)
        cov += [lo <= 0 <= hi for _, _, (lo, hi) in rows if lo == lo]
        if len(q_all):
            all_q.append(int(np.sum(np.asarray(q_all) < 0.01)))
    out = {
        "n_worlds": n_worlds,
        "chosen_features_at_p_0.05": float(np.mean(rej)),
        "worlds_with_any_q_0.05": float(np.mean(any_q)),
        "d_ci_coverage": float(np.mean(cov)),
    }
    if all_q:
        out["null_features_at_all_feature_q_0.01_per_world"] = float(np.mean(all_q))
    return out


def d_ci_calibration(
    impl, design: str, n_worlds: int, *, seed: int = 0, world: str = "sparse", size: dict | None = None
) -> dict:
    """Null coverage of the CI of Cohen's d (`features.feature_stats`) over every feature of null worlds
    (`world`: "sparse" or "dense", `size` its keywords), pooled; `se`: its Monte-Carlo SE from the
    spread of the per-world coverage (features of one world share its labels)."""
    make = sparse_world if world == "sparse" else dense_world
    per_world = []
    for w in range(n_worlds):
        W = make(np.random.default_rng([seed, 9, w]), design, **(size or FEATURE_SIZE))
        cov = [lo <= 0 <= hi for lo, hi in impl.d_cis(W.X, W.y, W.groups) if lo == lo]
        if cov:
            per_world.append(np.mean(cov))
    return {
        "n_worlds": n_worlds,
        "d_ci_coverage": float(np.mean(per_world)),
        "se": float(np.std(per_world, ddof=1) / np.sqrt(len(per_world))),
    }


def answer(scenario: int, prompt: int, deceptive: bool) -> dict:
    """One labelled answer to prompt `prompt` of scenario `scenario`, as a steering row's samples hold it."""
    return {
        "prompt_id": f"s{scenario}/q{prompt}",
        "group": f"s{scenario}",
        "label": "deceptive" if deceptive else "honest",
        "nll": 1.0,
        "n_tokens": 1,
        "label_source": "rules",
    }


def steering_row(name: str, kind: str, samples: list[dict], n_per_prompt: int, **stats) -> dict:
    """A steering experiment's row of `samples` (a no-steering row when `kind` is "none", else feature 1 at
    strength 1 on layer 1); `stats` adds to the row's stats."""
    return {
        "name": name,
        "kind": kind,
        "layer": 1,
        "strength": 0.0 if kind == "none" else 1.0,
        "feature": 1,
        "sampling": {"seed": 0, "n_per_prompt": n_per_prompt},
        "samples": samples,
        "stats": {"n": len(samples), "perplexity": 2.0, "label_sources": {"rules": len(samples)}, **stats},
    }


def steering_rows(rng: np.random.Generator, n_scenarios: int, prompts_per_scenario: int, n_per_prompt: int):
    """A no-steering row and a steered row of one null world: scenario s has a base deceptive rate
    b_s ~ U(0.35, 0.65) and a steering effect e_s ~ U(-0.3, 0.3) (zero on average: the null), its prompts
    (paraphrases) differ by U(-0.05, 0.05); each answer is a Bernoulli draw. Truth: rate 0.5, effect 0."""
    rows = []
    base = rng.uniform(0.35, 0.65, n_scenarios)
    effect = rng.uniform(-0.3, 0.3, n_scenarios)
    jitter = rng.uniform(-0.05, 0.05, (n_scenarios, prompts_per_scenario))
    for name, kind, shift in (("none", "none", 0.0), ("f", "feature", 1.0)):
        samples = []
        for s in range(n_scenarios):
            for q in range(prompts_per_scenario):
                rate = base[s] + jitter[s, q] + shift * effect[s]
                samples += [answer(s, q, rng.random() < rate) for _ in range(n_per_prompt)]
        n_dec = sum(x["label"] == "deceptive" for x in samples)
        rows.append(steering_row(name, kind, samples, n_per_prompt, n_deceptive=n_dec, n_prompts=0))
    return rows


def steering_calibration(
    impl,
    n_worlds: int,
    *,
    seed: int = 0,
    n_scenarios: int = 10,
    prompts_per_scenario: int = 3,
    n_per_prompt: int = 4,
) -> dict:
    """The steering test against no steering in null worlds whose effect varies by scenario: its
    false-positive rate, the null coverage of the difference CI and of the no-steering rate's CI."""
    rej, cov_diff, cov_rate = [], [], []
    for w in range(n_worlds):
        rows = steering_rows(
            np.random.default_rng([seed, 4, w]), n_scenarios, prompts_per_scenario, n_per_prompt
        )
        (p, (lo, hi)), *_ = impl.steering(rows)
        rej.append(p <= 0.05)
        cov_diff.append(lo <= 0 <= hi)
        rlo, rhi = impl.rate_ci(rows[0]["samples"])
        cov_rate.append(rlo <= 0.5 <= rhi)
    return {
        "n_worlds": n_worlds,
        "false_positive_rate_0.05": float(np.mean(rej)),
        "difference_ci_coverage": float(np.mean(cov_diff)),
        "rate_ci_coverage": float(np.mean(cov_rate)),
    }


def rare_steering_rows(
    rng: np.random.Generator,
    rate: float,
    steered_rate: float,
    *,
    n_scenarios: int = 10,
    n_per_prompt: int = 4,
    icc: float = 0.2,
):
    """A no-steering row and a steered row where deception is rare (the README run's regime): one prompt
    per scenario, scenario rates Beta-distributed with mean `rate` (no steering) or `steered_rate`
    (steered) and intra-scenario correlation `icc`, coupled through one quantile per scenario (a scenario
    that lies more lies more under both), and answer k of a prompt shares its random number across the
    conditions (sampled with the same seed). Truth: rates `rate`, `steered_rate`; their difference."""
    from scipy import stats

    u, draws = rng.random(n_scenarios), rng.random((n_scenarios, n_per_prompt))
    rows = []
    for name, kind, mean in (("none", "none", rate), ("f", "feature", steered_rate)):
        scenario_rate = stats.beta.ppf(u, mean * (1 - icc) / icc, (1 - mean) * (1 - icc) / icc)
        samples = [
            answer(s, 0, draws[s, k] < scenario_rate[s])
            for s in range(n_scenarios)
            for k in range(n_per_prompt)
        ]
        rows.append(steering_row(name, kind, samples, n_per_prompt, n_prompts=n_scenarios))
    return rows


def rare_steering_calibration(
    impl, n_worlds: int, rate: float, steered_rate: float, *, seed: int = 0, icc: float = 0.2
) -> dict:
    """Coverage of the no-steering rate's CI and of the difference CI (steered minus none) in worlds of
    `rare_steering_rows`, and how often the rate CI is [0, 0]."""
    cov_rate, cov_diff, zero = [], [], []
    for w in range(n_worlds):
        rows = rare_steering_rows(np.random.default_rng([seed, 8, w]), rate, steered_rate, icc=icc)
        rlo, rhi = impl.rate_ci(rows[0]["samples"])
        cov_rate.append(rlo <= rate <= rhi)
        zero.append(rhi == 0)
        (_, (lo, hi)), *_ = impl.steering(rows)
        cov_diff.append(lo <= steered_rate - rate <= hi)
    return {
        "n_worlds": n_worlds,
        "rate": rate,
        "steered_rate": steered_rate,
        "icc": icc,
        "rate_ci_coverage": float(np.mean(cov_rate)),
        "difference_ci_coverage": float(np.mean(cov_diff)),
        "rate_ci_is_0_0": float(np.mean(zero)),
    }


def lm_loss_calibration(n_worlds: int, *, seed: int = 0, n_groups: int = 24) -> dict:
    """Coverage of `stats.ratio_ci` for the LM-loss metrics' shape: per group, tokens ~ U(20, 200) and a
    summed loss whose per-token rate varies by group (gamma, shape 5, mean 1): truth 1."""
    from helpers.stats import ratio_ci

    cov = []
    for w in range(n_worlds):
        rng = np.random.default_rng([seed, 5, w])
        tokens = rng.integers(20, 200, n_groups).astype(float)
        loss = rng.normal(tokens * rng.gamma(5, 0.2, n_groups), np.sqrt(tokens) * 0.5)
        _, lo, hi = ratio_ci(loss, tokens)
        cov.append(lo <= 1.0 <= hi)
    return {"n_worlds": n_worlds, "n_groups": n_groups, "ci_coverage": float(np.mean(cov))}


def fire_through_example(acts: np.ndarray, rng: np.random.Generator) -> None:
    """Set a run of 1-4 tokens firing at 0.1-3 in a 32-token window, through the example token (24)."""
    length = int(rng.integers(1, 5))
    start = 24 - int(rng.integers(0, length))
    acts[start : start + length] = rng.uniform(0.1, 3, length)


def activating_window(window_record, i: int, tokens: list[str], acts) -> dict:
    """Activating scoring window `a{i}` as contexts.py cuts it (the example token at 24), built with
    `window_record` (ours, or the implementation under comparison)."""
    return window_record(
        tokens,
        acts,
        24,
        kind="activating",
        completion_id=f"a{i}",
        label=None,
        window_start=0,
        quantile=0,
    )


def synthetic_feature_windows(impl, rng: np.random.Generator, feature: int, n_windows: int = 12):
    """A feature's activating scoring windows as contexts.py cuts them (32 tokens, the example token at
    24): a run of 1-4 firing tokens through the example token, and in 30% of windows a second run."""
    score = []
    for i in range(n_windows):
        acts = np.zeros(32)
        fire_through_example(acts, rng)
        if rng.random() < 0.3:
            q = int(rng.integers(0, 20))
            acts[q : q + int(rng.integers(1, 3))] = 1.0
        tokens = [f" w{int(rng.integers(1000))}" for _ in range(32)]
        score.append(activating_window(impl.window_record, i, tokens, acts))
    return impl.FeatureContexts(feature, 1000, 50, 3.0, list(np.linspace(0.1, 3, 11)), [], score)


def fuzzing_calibration(impl, n_features: int, *, seed: int = 0) -> dict:
    """Readers that never see the explanation, on the fuzzing windows of synthetic features: AUROC of
    telling right marks from wrong ones by the number of marked spans, by where the first mark sits
    (tokens before it), and by both (whether the first mark is the example token's position)."""
    from sklearn.metrics import roc_auc_score

    truth, spans, before, tail = [], [], [], []
    for f in range(n_features):
        ctx = synthetic_feature_windows(impl, np.random.default_rng([seed, 6, f]), f)
        for w in impl.fuzzing_windows(ctx, 0) or []:
            truth.append(w["truth"])
            spans.append(-w["text"].count("<<"))  # fewer spans: more likely right (old wrong marks scatter)
            before.append(len(w["text"].split("<<")[0].split()))
            tail.append(-len(w["text"].rsplit(">>", 1)[1].split()))
    t = np.asarray(truth)
    return {
        "n_windows": int(len(t)),
        "reader_auroc_span_count": float(roc_auc_score(t, spans)),
        "reader_auroc_position_of_first_mark": float(roc_auc_score(t, before)),
        "reader_auroc_text_after_last_mark": float(roc_auc_score(t, tail)),
    }


def memorising_dictionary(X: np.ndarray, atoms: np.ndarray) -> np.ndarray:
    """A stand-in for an SAE trained many epochs on few rows: one latent per training row, firing by
    cosine similarity to it above 0.5 (it fires hardest on the rows it was trained on)."""
    mu = atoms.mean(0)
    A = atoms - mu
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    Z = X - mu
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    return np.maximum(Z @ A.T - 0.5, 0.0)


def conditioned_sae_calibration(impl, n_worlds: int, *, seed: int = 0) -> dict:
    """Null contrast-pair worlds: a `deceptive_only` dictionary (atoms = deceptive training rows) and a
    `mixed` one (all training rows), both probed on the rows `impl.reserved` keeps for analysis (None:
    all rows, as before the split). The mean difference in balanced accuracy (conditioned minus mixed)
    is zero when no dictionary saw its test rows, and positive when the conditioned one did."""
    diffs = []
    for w in range(n_worlds):
        W = dense_world(np.random.default_rng([seed, 7, w]), "contrast", n_groups=40, n_samples=4, d=16)
        records = [
            {"id": str(i), "prompt_id": p, "group": g}
            for i, (p, g) in enumerate(zip(W.prompts, W.groups, strict=True))
        ]
        keep = impl.reserved(records, w)
        test = (
            np.array([str(i) in keep for i in range(len(W.y))])
            if keep is not None
            else np.ones(len(W.y), bool)
        )
        train = ~test if keep is not None else test
        dec = memorising_dictionary(W.X, W.X[train & (W.y == 1)])
        mixed = memorising_dictionary(W.X, W.X[train])
        kw = dict(n_permutations=0, n_bootstrap=0, seed=w)
        ba = [
            impl.probe(F[test], W.y[test], W.groups[test], W.prompts[test], **kw)[3].balanced_accuracy
            for F in (dec, mixed)
        ]
        diffs.append(ba[0] - ba[1])
    d = np.asarray(diffs)
    return {
        "n_worlds": n_worlds,
        "mean_ba_conditioned_minus_mixed": float(d.mean()),
        "se": float(d.std(ddof=1) / np.sqrt(len(d))),
    }
