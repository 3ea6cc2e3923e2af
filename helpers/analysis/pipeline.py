"""Notebook 04 over a run folder: probes (raw activations vs SAE features), the features that separate
deceptive from honest completions, and their Gemini explanations (DESIGN.md §3).

- `probe_table` → `probes.json`: per layer a probe on the pooled raw activations with bag-of-words
  (surface wording) and random-direction controls; per SAE a probe on its features, its random-direction
  control, and `compare_paired` against the raw probe ("does this SAE beat the raw baseline?"). SAE
  features of a completion are the MEAN OVER ITS TOKENS OF PER-TOKEN SAE ACTIVATIONS (pooling="last":
  at its last token), not the SAE applied to the pooled vector, which is off the SAE's input
  distribution (smaller norm, many features superposed): thresholds / TopK would pick features no token has.
- `feature_table` → `features/{sae_id}.jsonl`: `features.select_and_report` on the same activations
  (chosen on one split of prompt groups, reported on the other), token firing rates per class, example
  windows (contexts.py); `label_features` adds explanations and scores (autointerp.py), atomically.

Only completions labelled honest or deceptive are used (y = 1 deceptive), grouped by `group` (the
scenario, or the fact of a contrast pair) for every split, fold and bootstrap, and permuted by
`prompt_id` (labels move between prompts, never between completions of one prompt).

Which rows (DESIGN.md §9): notebook 03 trains no SAE on the groups `completions.analysis_split`
reserves, and records that split in each SAE's metadata. At a layer with such SAEs every probe (raw,
bag-of-words, SAE) and every feature test uses exactly the reserved rows, so a `deceptive_only` SAE is
never probed on completions it was trained on, and the SAEs of every condition are ranked on the same
unseen rows. Each probes.json row and feature file says which rows it used (`rows`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from helpers.analysis import probes
from helpers.analysis.autointerp import autointerp
from helpers.analysis.contexts import (
    ContextConfig,
    Doc,
    EncodedChunks,
    FeatureContexts,
    build_contexts,
    check_sae_fits,
    docs_for,
)
from helpers.analysis.detection import (
    CONTROL_FPR,
    EvalSet,
    bag_of_words_scores,
    cv_scores,
    fit_scores,
    transfer_matrix,
    transfer_rows,
)
from helpers.analysis.features import (
    TooFewCompletions,
    select_and_report,
    split_by_group,
    token_firing_rates,
)
from helpers.analysis.scoring import score_summary
from helpers.collect.capture import load_pooled, load_pooled_prompt, pooled_layers
from helpers.collect.completions import analysis_split, read_completions
from helpers.collect.datasets import dataset_of, read_datasets
from helpers.collect.store import LayerStore
from helpers.gemini import GeminiClient
from helpers.model.load import load_tokenizer
from helpers.model.protocols import EncodingSAE, Tokenizer
from helpers.run import (
    SAE_METRICS,
    atomic_write_json,
    check_stage_settings,
    feature_controls_path,
    features_dir,
    features_path,
    jsonable,
    model_record,
    override_fields,
    probes_path,
    read_jsonl,
    read_run_json,
    sae_dir,
    set_aside,
    settings_hash,
    write_jsonl,
)
from helpers.saes.io import LoadedSAE, load_sae
from helpers.saes.random_control import VARIANTS as RANDOM_VARIANTS
from helpers.saes.random_control import random_sae_like
from helpers.stats import balanced_accuracy, check_labels, holm, weighted_auroc
from helpers.tables import value_ci

Pooling = Literal["mean", "last"]
SAE_POOLING = {
    "mean": "mean over the completion's tokens of per-token SAE activations",
    "last": "SAE activations at the completion's last token",
}
NOT_LABELLED = "not labelled yet (run label_features)"


@dataclass(frozen=True)
class ProbeTableSettings:
    """How `probe_table` pools, cross-validates and tests. A whole `settings=ProbeTableSettings(...)` or
    single fields as keywords (`n_folds=4`), which win over it (`with_overrides`)."""

    pooling: Pooling = "mean"
    """Per completion: the mean over its tokens, or its last token (`SAE_POOLING`)."""
    n_folds: int = 5
    """Grouped cross-validation folds."""
    n_permutations: int = 200
    """Label permutations for each full-statistics probe's p-value."""
    n_bootstrap: int = 200
    """Refitted cluster-bootstrap draws for the CIs."""
    n_directions: int = 20
    """Random directions of the random-direction control."""
    seed: int = 0
    """Seeds folds, permutations, draws, random directions and random SAEs."""
    control_fpr: float = CONTROL_FPR
    """False-positive rate on the control set that sets the transfer threshold (detection.py)."""
    random_variant: str = "frozen_encoder"
    """Which random-weight SAE is each SAE's control (`saes.random_control.VARIANTS`)."""
    calibration_tokens: int = 20_000
    """Tokens the random SAE is calibrated on (its L0)."""
    sweep_bootstrap: int | None = 50
    """Refitted draws of the layer sweep (None: no sweep)."""

    def __post_init__(self) -> None:
        if self.pooling not in SAE_POOLING:
            raise ValueError(f"pooling must be one of {sorted(SAE_POOLING)}, got {self.pooling!r}")

    def with_overrides(self, overrides: dict[str, Any]) -> ProbeTableSettings:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "probe table settings")


@dataclass(frozen=True)
class FeatureSettings:
    """How `feature_table` chooses and tests features. A whole `settings=FeatureSettings(...)` or single
    fields as keywords (`k=5`), which win over it (`with_overrides`)."""

    k: int = 20
    """Features chosen per SAE."""
    seed: int = 0
    """Seeds the split of prompt groups, the permutations, the control features and the windows."""
    test_fraction: float = 0.5
    """Share of the prompt groups the chosen features are tested on."""
    n_permutations: int = 2000
    """Label permutations per feature test."""
    n_controls: int = 2
    """Random live features given windows too (the autointerp baseline)."""

    def with_overrides(self, overrides: dict[str, Any]) -> FeatureSettings:
        """These settings with the fields named in `overrides` replaced (unknown names are refused)."""
        return override_fields(self, overrides, "feature settings")


def labelled_docs(
    run_dir: str | os.PathLike, store: LayerStore, keep: set[str] | None = None
) -> tuple[list[Doc], np.ndarray, np.ndarray, np.ndarray]:
    """(docs, y, groups, prompts) of the TRAINING datasets' completions labelled honest or deceptive
    that have activations in `store` (and are in `keep`, when given), in store order; prints what was
    left out. Features are chosen and tested where the probes are trained (eval sets are for transfer,
    never pooled in). One label class raises the probes' error."""
    records = read_completions(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}/completions.jsonl is missing or empty: run notebook 02 first")
    roles = dataset_roles(run_dir)
    records = [r for r in records if roles.get(dataset_of(r), "train") == "train"]
    if keep is not None:
        records = [r for r in records if r["id"] in keep]
    counts = Counter(r.get("label") or "unlabelled" for r in records)
    kept = [r for r in records if r.get("label") in ("honest", "deceptive")]
    docs = docs_for(store, kept)
    print(
        f"using {len(docs)} labelled completions with activations ({counts['honest']} honest, "
        f"{counts['deceptive']} deceptive labelled); left out {counts['ambiguous']} ambiguous, "
        f"{counts['unlabelled']} unlabelled, {len(kept) - len(docs)} without completion tokens"
    )
    no_group = [d.id for d in docs if d.record.get("group") is None]
    if no_group:
        print(f"note: {len(no_group)} completion(s) have no `group`; their prompt_id groups them instead")
    y = check_labels(np.array([d.record["label"] == "deceptive" for d in docs], int), len(docs))
    groups = np.array([str(d.record.get("group") or d.record["prompt_id"]) for d in docs])
    prompts = np.array([str(d.record["prompt_id"]) for d in docs])
    return docs, y, groups, prompts


def reserved_rows(
    run_dir: str | os.PathLike, saes: Sequence[LoadedSAE]
) -> tuple[set[str] | None, dict[str, Any]]:
    """The completion ids notebook 03 reserved from SAE training (the analysis split recorded in the
    SAEs' metadata) and a description for the output, or (None, "all rows") when no SAE records one.
    SAEs that record different splits cannot be compared on one set of rows: an error. A
    label-conditioned SAE trained before the split existed is announced: it saw the rows it is tested on."""
    splits = {
        json.dumps(m["analysis_split"], sort_keys=True)
        for s in saes
        if (m := s.cfg.get("metadata") or {}).get("analysis_split")
    }
    for s in saes:
        meta = s.cfg.get("metadata") or {}
        if not meta.get("analysis_split") and meta.get("condition") in ("deceptive_only", "honest_only"):
            print(
                f"WARNING: {s.sae_id} was trained before notebook 03 reserved analysis rows: it trained on "
                "rows chosen by their label, so its probe and features are tested on rows it saw and its "
                "numbers are inflated. Retrain it with notebook 03 (delete its folder) before comparing it."
            )
    if len(splits) > 1:
        raise ValueError(
            f"these SAEs reserved different analysis splits ({sorted(splits)}): retrain them with one "
            "notebook 03 run, or analyse them separately (SAE_FILTER)"
        )
    if not splits:
        return None, {"rows": "all labelled completions (no SAE here reserved an analysis split)"}
    split = json.loads(splits.pop())
    keep = set(analysis_split(read_completions(run_dir), split["fraction"], split["seed"])[1])
    return keep, {"rows": "analysis split: groups no SAE trained on", "analysis_split": split}


def _pool(
    chunk: list[Doc], acts: torch.Tensor, pooling: Pooling, top_m: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """One run of whole completions' device work: (pooled [len(chunk), d_sae], per-token firing [n, d_sae]
    bool), both on the host."""
    if top_m is not None:
        top = torch.topk(acts, min(top_m, acts.shape[1]), dim=1)
        acts = torch.zeros_like(acts).scatter_(1, top.indices, top.values)
    lengths = torch.tensor([d.n for d in chunk], device=acts.device)
    if pooling == "mean":
        seg = torch.repeat_interleave(torch.arange(len(chunk), device=acts.device), lengths)
        pooled = torch.zeros(len(chunk), acts.shape[1], device=acts.device).index_add_(0, seg, acts)
        pooled /= lengths[:, None]
    else:
        pooled = acts[lengths.cumsum(0) - 1]
    return pooled.cpu().numpy(), (acts > 0).cpu().numpy()


def _pooled_sae_acts(
    store: LayerStore,
    sae: EncodingSAE,
    docs: Sequence[Doc],
    pooling: Pooling,
    out: np.ndarray,
    batch_tokens: int,
    top_m: int | None = None,
) -> Iterator[np.ndarray]:
    """Fills out [n_docs, d_sae] with each completion's SAE activations pooled over its tokens, and
    yields every batch's per-token firing [n, d_sae] (bool, on the host: for token statistics) on the way.
    With `top_m`, each token's activations are first cut to its m largest (SAEs compared at one L0). CUDA
    out of memory, in the encoder or in the pooling: the batch halves and the run is done again, nothing of
    it kept (`EncodedChunks.attempt`)."""
    row = 0
    stream = EncodedChunks(store, sae, docs, batch_tokens, pre=False)
    for chunk, acts, _ in stream:
        got = stream.attempt(_pool, chunk, acts, pooling, top_m)
        del acts
        if got is None:
            continue
        pooled, fired = got
        out[row : row + len(chunk)] = pooled
        row += len(chunk)
        yield fired


def sae_completion_acts(
    store: LayerStore,
    sae: EncodingSAE,
    docs: Sequence[Doc],
    *,
    pooling: Pooling = "mean",
    batch_tokens: int = 1024,
    top_m: int | None = None,
) -> np.ndarray:
    """[n_docs, d_sae] float32: per completion, its per-token SAE activations pooled (module doc)."""
    return _sae_features(store, sae, docs, pooling, batch_tokens, top_m)[0]


def _sae_features(
    store: LayerStore,
    sae: EncodingSAE,
    docs: Sequence[Doc],
    pooling: Pooling,
    batch_tokens: int,
    top_m: int | None = None,
) -> tuple[np.ndarray, float]:
    """(pooled features [n_docs, d_sae] float32, mean L0 over the docs' tokens) in one pass."""
    if pooling not in SAE_POOLING:
        raise ValueError(f"pooling must be one of {sorted(SAE_POOLING)}, got {pooling!r}")
    out = np.zeros((len(docs), int(sae.d_sae)), np.float32)
    fired = sum(
        float((a > 0).sum()) for a in _pooled_sae_acts(store, sae, docs, pooling, out, batch_tokens, top_m)
    )
    return out, fired / max(1, sum(d.n for d in docs))


def _converted_once(X: np.ndarray) -> Any:
    """SAE features X [n_docs, d_sae] as CSR where `probes.design_input` makes them CSR (the CPU path),
    once for the probe, its random-direction control and the transfer fit, which would each convert
    them (~45 ms a conversion at d32 scale); else X as it is (its float64 copy would double what is
    held while the SAE's rows are computed)."""
    converted = probes.design_input(X)
    return converted if sp.issparse(converted) else X


def _row(layer: int | None, kind: str, result: probes.ProbeResult, **extra: Any) -> dict[str, Any]:
    return {"layer": layer, "kind": kind, **result.to_dict(), **extra}


def _random_summary(control: dict[str, Any]) -> dict[str, Any]:
    return {k: control[k] for k in ("name", "n_directions", "ba_mean", "ba_quantiles", "ba_max")}


def _verdict(cmp: dict[str, Any], alpha: float = 0.05) -> str:
    if cmp["p_holm"] < alpha:
        return "SAE beats raw" if cmp["mean_difference"] > 0 else "raw beats SAE"
    return "no significant difference"


def dataset_roles(run_dir: str | os.PathLike) -> dict[str, str]:
    """{dataset name: role} from datasets.json ({} for a run without one: every dataset trains)."""
    return {e["name"]: e.get("role", "train") for e in read_datasets(run_dir)}


class LayerRows(NamedTuple):
    """The completions one layer's probes use: labelled rows of the train and eval sets (restricted to
    the analysis split when the layer's SAEs reserved one) and every row of the control set (its
    answers are benign by construction, never judged and never trained on by a label-chosen SAE)."""

    docs: list[Doc]
    y: np.ndarray  # [n] 1 deceptive, 0 honest, -1 control (not labelled)
    groups: np.ndarray
    prompts: np.ndarray
    sets: list[EvalSet]  # one per dataset, in datasets.json order
    train: np.ndarray  # row indices of the train sets: the grouped-CV rows


def layer_rows(
    run_dir: str | os.PathLike, store: LayerStore, keep: set[str] | None, roles: dict[str, str]
) -> LayerRows:
    """The rows of `store` each probe of this layer uses (LayerRows), with what was left out printed."""
    records = read_completions(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}/completions.jsonl is missing or empty: run notebook 02 first")
    docs = docs_for(store, [r for r in records if _probed(r, roles, keep)])
    y, groups, prompts, sets, train = _labels_and_sets([d.record for d in docs], roles)
    parts = [
        f"{s.name} ({s.role}): {s.n}" + ("" if s.y is None else f", {int(s.y.sum())} deceptive") for s in sets
    ]
    print("rows by dataset: " + "; ".join(parts))
    if not len(train):
        raise ValueError(
            "no labelled completions of a training dataset at this layer: datasets.json gives roles "
            f"{roles}; a probe needs a dataset with role 'train' (notebook 02's DATASETS)"
        )
    check_labels(y[train], len(train))
    return LayerRows(docs, y, groups, prompts, sets, train)


def _probed(record: dict[str, Any], roles: dict[str, str], keep: set[str] | None) -> bool:
    """Whether the probes use a completion: every control answer (benign by construction, never judged
    and never trained on by a label-chosen SAE), else labelled honest / deceptive and in `keep`."""
    if roles.get(dataset_of(record), "train") == "control":
        return True
    return record.get("label") in ("honest", "deceptive") and (keep is None or record["id"] in keep)


def _labels_and_sets(
    records: Sequence[dict[str, Any]], roles: dict[str, str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[EvalSet], np.ndarray]:
    """(y, groups, prompts, sets, train) of the probed `records` in their order: y 1 deceptive, 0 honest,
    -1 control; one EvalSet per dataset (datasets.json order); train = row indices of the train sets."""
    of = np.array([dataset_of(r) for r in records])
    role_of = {n: roles.get(n, "train") for n in dict.fromkeys([*roles, *of])}
    y = np.array(
        [
            -1 if role_of[n] == "control" else int(r["label"] == "deceptive")
            for r, n in zip(records, of, strict=True)
        ]
    )
    groups = np.array([str(r.get("group") or r["prompt_id"]) for r in records])
    prompts = np.array([str(r["prompt_id"]) for r in records])
    sets = [
        EvalSet(n, role, idx, None if role == "control" else y[idx], groups[idx])
        for n, role in role_of.items()
        if len(idx := np.flatnonzero(of == n))
    ]
    train = np.flatnonzero((y >= 0) & np.isin(of, [s.name for s in sets if s.role == "train"]))
    return y, groups, prompts, sets, train


def _probe_rows_ids(lr: LayerRows, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return lr.y[idx], lr.groups[idx], lr.prompts[idx]


def _calibration_tokens(store: LayerStore, docs: Sequence[Doc], limit: int, seed: int) -> torch.Tensor:
    """Up to `limit` completion tokens of `docs` (whole completions in a seeded order): the tokens a
    random-SAE control is calibrated on, so its L0 is matched where the probes read."""
    order = np.random.default_rng([seed, 13]).permutation(len(docs))
    parts, total = [], 0
    for i in order:
        d = docs[i]
        parts.append(store.tokens_of(d.id)[d.skip :])
        total += d.n
        if total >= limit:
            break
    return torch.from_numpy(np.concatenate(parts)[:limit].astype(np.float32))


def probe_table(
    run_dir: str | os.PathLike,
    layers: Sequence[int],
    sae_folders: Sequence[str | os.PathLike] = (),
    *,
    settings: ProbeTableSettings | None = None,
    batch_tokens: int = 1024,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Probe rows for `layers` and the SAEs in `sae_folders` (each must read one of `layers`); everything
    is written to `run_dir/probes.json`.

    `rows` (returned): per layer, grouped-CV probes on the TRAINING datasets' rows: raw activations (with
    the full statistics: permutation p, refitted bootstrap CIs, random directions), bag-of-words, the
    prompt-only probe (the prompt's last token: does the probe read the instruction?), and per SAE its
    features (full statistics, `vs_raw`) and its random-weight control (`saes.random_control`, same
    class, width and L0 on these tokens; `vs_trained`); then the multi-layer ensembles (mean of the
    layers' probe scores, and one probe on the concatenated layers). The raw-vs-SAE tests are
    Holm-corrected together (`p_holm`; the verdict uses it).
    `transfer`: every reader trained on the train sets and applied to each eval set, with recall at the
    control set's `control_fpr` threshold (detection.py). `transfer_matrix`: per layer, raw probes
    trained on each labelled dataset and scored on each. `sae_vs_sae`: per layer, every pair of SAEs at
    the L0 of the sparsest one on the probed tokens (paired test, Holm over all pairs). `layer_sweep`:
    `layer_sweep` with `sweep_bootstrap` refitted draws (None: no sweep). A layer whose training rows hold
    one class (or none) gets a raw row saying why (`why`; its SAEs are skipped with it) and the others
    go on. `settings` (default `ProbeTableSettings()`), or any of its fields as keywords; `batch_tokens`
    bounds the tokens the SAE encodes at once."""
    st = (settings or ProbeTableSettings()).with_overrides(overrides)
    pooling, n_folds, seed, n_directions = st.pooling, st.n_folds, st.seed, st.n_directions
    control_fpr, random_variant = st.control_fpr, st.random_variant
    run_dir, layers = Path(run_dir), [int(layer) for layer in layers]
    saes = [load_sae(f) for f in sae_folders]
    for s in saes:
        if s.layer not in layers:
            raise ValueError(f"SAE {s.sae_id} reads layer {s.layer}, which is not in layers={layers}: add it")
    roles = dataset_roles(run_dir)
    texts = {r["id"]: r.get("completion") or "" for r in read_completions(run_dir)}
    common = dict(n_folds=n_folds, seed=seed, n_permutations=st.n_permutations, n_bootstrap=st.n_bootstrap)
    light = dict(n_folds=n_folds, seed=seed, n_permutations=0, n_bootstrap=0)
    rows: list[dict[str, Any]] = []
    transfer: list[dict[str, Any]] = []
    matrices: dict[str, Any] = {}
    pairs: list[dict[str, Any]] = []
    per_layer: dict[int, tuple[LayerRows, np.ndarray]] = {}
    bow_cache: dict[tuple[str, ...], probes.ProbeResult] = {}
    bar = tqdm(total=len(layers) + 2 * len(saes), desc="probes (layers, SAEs, random SAEs)", unit="probe")
    for layer in layers:
        store = LayerStore(run_dir, layer)
        layer_saes = [s for s in saes if s.layer == layer]
        keep, used = reserved_rows(run_dir, layer_saes)
        try:
            lr = layer_rows(run_dir, store, keep, roles)
        except ValueError as err:  # one class (or none) to train on here: a row saying why, the rest go on
            saes_here = f"; so are its SAEs ({', '.join(s.sae_id for s in layer_saes)})" if layer_saes else ""
            why = f"layer {layer} skipped: {err}{saes_here}"
            print(why)
            rows.append({"layer": layer, "kind": "raw", "why": why, "rows": used})
            bar.update(1 + 2 * len(layer_saes))
            continue
        tr = lr.train
        y, groups, prompts = _probe_rows_ids(lr, tr)
        train_sets = [s.name for s in lr.sets if s.role == "train"]
        used = {
            **used,
            "datasets": train_sets,
            "n": len(tr),
            "n_groups": len(set(groups)),
            "n_prompts": len(set(prompts)),
        }
        print(f"layer {layer}: {used['rows']}: {used['n']} training completions, {used['n_groups']} groups")
        ids, mean, last = load_pooled(run_dir, layer)
        where = {cid: i for i, cid in enumerate(ids)}
        missing = [d.id for d in lr.docs if d.id not in where]
        if missing:
            raise ValueError(
                f"{len(missing)} completions (e.g. {missing[0]!r}) are stored but not pooled at "
                f"layer {layer}: rerun collect_activations to finish the pooled file"
            )
        order = [where[d.id] for d in lr.docs]
        X_all = (mean if pooling == "mean" else last)[order].numpy().astype(np.float64)
        per_layer[layer] = (lr, X_all)

        def fitted(X: np.ndarray) -> Any:
            return lambda t_idx, y_t, targets: fit_scores(X, t_idx, y_t, targets)

        def reader(kind: str, layer: int = layer, **extra: Any) -> dict[str, Any]:
            return {"layer": layer, "kind": kind, **extra}

        raw = probes.probe(X_all[tr], y, groups, prompts=prompts, name=f"raw L{layer}", **common)
        rd = probes.random_direction_control(
            X_all[tr], y, groups, n_directions=n_directions, n_folds=n_folds, seed=seed
        )
        rows.append(_row(layer, "raw", raw, pooling=pooling, random_direction=_random_summary(rd), rows=used))
        transfer += transfer_rows(fitted(X_all), lr.sets, reader("raw"), fpr=control_fpr)
        matrices[str(layer)] = transfer_matrix(X_all, lr.sets, n_folds=n_folds, seed=seed)
        bar.update()
        key = tuple(lr.docs[i].id for i in tr)
        all_texts = [texts[d.id] for d in lr.docs]
        if key not in bow_cache:
            try:
                bow_cache[key] = probes.bag_of_words_probe(
                    [all_texts[i] for i in tr], y, groups, prompts=prompts, **common
                )
            except ValueError as err:  # scikit-learn's vectoriser: no word or pair in two answers of a fold
                if "no terms remain" not in str(err) and "empty vocabulary" not in str(err):
                    raise
                bow_cache[key] = (
                    "no bag-of-words probe: the training answers of a fold share no word or word pair "
                    "(answers without words, e.g. from a random or untrained model), so there is no wording "
                    "to read"
                )
        if isinstance(bow_cache[key], str):
            rows.append({"layer": layer, "kind": "bag_of_words", "why": bow_cache[key]})
        else:
            rows.append(
                _row(
                    layer,
                    "bag_of_words",
                    bow_cache[key],
                    rows=used,
                    vs_raw=probes.compare_paired(bow_cache[key], raw),
                )
            )
            transfer += transfer_rows(
                lambda t_idx, y_t, targets, words=all_texts: bag_of_words_scores(words, t_idx, y_t, targets),
                lr.sets,
                reader("bag_of_words"),
                fpr=control_fpr,
            )
        prompt_vectors = load_pooled_prompt(run_dir, layer)
        if prompt_vectors is None:
            rows.append(
                {
                    "layer": layer,
                    "kind": "prompt_only",
                    "why": "this run's pooled vectors predate prompt "
                    "vectors: rerun notebook 02's collection step to add them",
                }
            )
        else:
            p_where = {cid: i for i, cid in enumerate(prompt_vectors[0])}
            X_prompt = prompt_vectors[1][[p_where[d.id] for d in lr.docs]].numpy().astype(np.float64)
            res = probes.probe(
                X_prompt[tr], y, groups, prompts=prompts, name=f"prompt-only L{layer}", **light
            )
            rows.append(
                _row(
                    layer,
                    "prompt_only",
                    res,
                    vs_raw=probes.compare_paired(res, raw),
                    rows=used,
                    reads="the residual at the prompt's last token, before the answer",
                )
            )
            transfer += transfer_rows(fitted(X_prompt), lr.sets, reader("prompt_only"), fpr=control_fpr)
        sae_feats: dict[str, tuple[Any, probes.ProbeResult, float]] = {}
        for s in layer_saes:
            check_sae_fits(s.sae, store.d_model)
            sid = s.sae_id
            Xs, l0 = _sae_features(store, s.sae, lr.docs, pooling, batch_tokens)
            Xs = _converted_once(Xs)
            res = probes.probe(Xs[tr], y, groups, prompts=prompts, name=sid, **common)
            sae_feats[sid] = (s, res, l0)
            rd = probes.random_direction_control(
                Xs[tr], y, groups, n_directions=n_directions, n_folds=n_folds, seed=seed
            )
            meta = s.cfg.get("metadata") or {}
            info = {
                "sae_id": sid,
                "architecture": s.cfg.get("architecture"),
                "condition": meta.get("condition"),
                "l0_probed_tokens": l0,
            }
            rows.append(
                _row(
                    layer,
                    "sae",
                    res,
                    **info,
                    pooling=SAE_POOLING[pooling],
                    random_direction=_random_summary(rd),
                    vs_raw=probes.compare_paired(res, raw),
                    rows=used,
                )
            )
            transfer += transfer_rows(fitted(Xs), lr.sets, reader("sae", **info), fpr=control_fpr)
            bar.update()
            calib = _calibration_tokens(store, lr.docs, st.calibration_tokens, seed)
            rand = random_sae_like(s.sae, calib, variant=random_variant, seed=seed)
            Xr, rand_l0 = _sae_features(store, rand, lr.docs, pooling, batch_tokens)
            Xr = _converted_once(Xr)
            rres = probes.probe(Xr[tr], y, groups, prompts=prompts, name=f"random {sid}", **light)
            rinfo = {
                "sae_id": sid,
                "architecture": info["architecture"],
                "condition": info["condition"],
                "variant": random_variant,
                "variant_description": RANDOM_VARIANTS[random_variant],
                "l0_probed_tokens": rand_l0,
            }
            rows.append(
                _row(
                    layer, "random_sae", rres, **rinfo, vs_trained=probes.compare_paired(res, rres), rows=used
                )
            )
            transfer += transfer_rows(fitted(Xr), lr.sets, reader("random_sae", **rinfo), fpr=control_fpr)
            bar.update()
        pairs += _sae_pairs(store, sae_feats, lr, tr, pooling, batch_tokens, layer, light)
    bar.close()
    rows += _ensemble_rows(
        per_layer, transfer, control_fpr, n_folds=n_folds, seed=seed, n_bootstrap=st.n_bootstrap
    )
    tests = [r["vs_raw"] for r in rows if r["kind"] == "sae"]
    for cmp, adjusted in zip(tests, holm([c["p_value"] for c in tests]), strict=True):
        cmp["p_holm"], cmp["multiplicity"] = float(adjusted), f"Holm over the {len(tests)} SAE-vs-raw tests"
    for r in rows:
        if r["kind"] == "sae":
            r["verdict"] = _verdict(r["vs_raw"])
    sweep = None
    if st.sweep_bootstrap is not None:
        sweep = layer_sweep(
            run_dir,
            pooling=pooling,
            n_folds=n_folds,
            seed=seed,
            n_bootstrap=st.sweep_bootstrap,
            control_fpr=control_fpr,
        )
    for cmp, adjusted in zip(pairs, holm([c["p_value"] for c in pairs]), strict=True):
        cmp["p_holm"], cmp["multiplicity"] = float(adjusted), f"Holm over the {len(pairs)} SAE-vs-SAE tests"
    atomic_write_json(
        probes_path(run_dir),
        {
            "pooling": pooling,
            "sae_features": SAE_POOLING[pooling],
            **common,
            "datasets": read_datasets(run_dir),
            "control_fpr": control_fpr,
            "rows": rows,
            "transfer": transfer,
            "transfer_matrix": matrices,
            "sae_vs_sae": pairs,
            "layer_sweep": sweep,
        },
    )
    return rows


def _sae_pairs(
    store: LayerStore,
    feats: dict[str, tuple[Any, probes.ProbeResult, float]],
    lr: LayerRows,
    tr: np.ndarray,
    pooling: Pooling,
    batch_tokens: int,
    layer: int,
    light: dict[str, Any],
) -> list[dict[str, Any]]:
    """Every pair of this layer's SAEs compared at one L0: each SAE's per-token activations cut to the
    sparsest SAE's mean L0 on the probed tokens (rounded), probed with the same folds, then the paired
    test of probes.compare_paired (Holm is applied over the whole table by the caller)."""
    if len(feats) < 2:
        return []
    m = max(1, round(min(l0 for *_, l0 in feats.values())))
    y, groups, prompts = _probe_rows_ids(lr, tr)
    results = {}
    for sid, (s, res, l0) in feats.items():
        if l0 > m * 1.05 and pooling == "mean":  # else its own probe's folds already stand at this L0
            X = sae_completion_acts(store, s.sae, lr.docs, batch_tokens=batch_tokens, top_m=m)
            res = probes.probe(X[tr], y, groups, prompts=prompts, name=sid, **light)
        results[sid] = (res, l0)
    out = []
    ids = list(results)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            cmp = probes.compare_paired(results[a][0], results[b][0])
            out.append(
                {
                    **cmp,
                    "layer": layer,
                    "matched_l0": m,
                    "l0_before": [results[a][1], results[b][1]],
                    "how": "each token's SAE activations cut to its m largest, m = the sparsest SAE's mean "
                    "L0 on the probed tokens"
                    + ("" if pooling == "mean" else " (not applied: pooling='last')"),
                    "balanced_accuracy": [results[a][0].balanced_accuracy, results[b][0].balanced_accuracy],
                }
            )
    return out


def _ensemble_rows(
    per_layer: dict[int, tuple[LayerRows, np.ndarray]],
    transfer: list[dict[str, Any]],
    fpr: float,
    *,
    n_folds: int,
    seed: int,
    n_bootstrap: int,
) -> list[dict[str, Any]]:
    """The multi-layer raw-activation ensembles (Nordby, Pais, Parrack 2026) on the completions every
    layer has: the mean of the per-layer probes' scores, and one probe on the concatenated layers;
    grouped-CV rows returned, transfer rows appended to `transfer`."""
    if len(per_layer) < 2:
        return []
    layers = sorted(per_layer)
    common_ids = set.intersection(*({d.id for d in lr.docs} for lr, _ in per_layer.values()))
    first = per_layer[layers[0]][0]
    keep = np.array([i for i, d in enumerate(first.docs) if d.id in common_ids])
    idx_of = {layer: {d.id: i for i, d in enumerate(lr.docs)} for layer, (lr, _) in per_layer.items()}
    Xs = [per_layer[layer][1][[idx_of[layer][first.docs[i].id] for i in keep]] for layer in layers]
    lr = LayerRows(
        [first.docs[i] for i in keep],
        first.y[keep],
        first.groups[keep],
        first.prompts[keep],
        [],
        np.zeros(0, int),
    )
    pos = {old: new for new, old in enumerate(keep)}
    sets = [
        EvalSet(s.name, s.role, np.array([pos[i] for i in s.idx if i in pos], int), None, s.groups)
        for s in first.sets
    ]
    sets = [
        EvalSet(s.name, s.role, s.idx, None if s.role == "control" else lr.y[s.idx], lr.groups[s.idx])
        for s in sets
    ]
    tr = np.flatnonzero(
        (lr.y >= 0)
        & np.isin([dataset_of(d.record) for d in lr.docs], [s.name for s in sets if s.role == "train"])
    )
    y, groups, prompts = lr.y[tr], lr.groups[tr], lr.prompts[tr]
    name = "+".join(f"L{layer}" for layer in layers)
    used = {"rows": "completions every layer has", "n": len(tr), "n_groups": len(set(groups))}
    concat = np.hstack(Xs)
    # A quarter of the bootstrap draws (at least 50): the concatenated design is as costly as a raw
    # probe's, and this row is a baseline beside them, not a headline (bench/probe_cost.py --protocol).
    res = probes.probe(
        concat[tr],
        y,
        groups,
        prompts=prompts,
        name=f"concat {name}",
        n_folds=n_folds,
        seed=seed,
        n_permutations=0,
        n_bootstrap=min(n_bootstrap, max(50, n_bootstrap // 4)),
    )
    oof = np.mean([cv_scores(X[tr], y, groups, n_folds=n_folds, seed=seed) for X in Xs], axis=0)
    mean_row = {
        "layer": None,
        "kind": "ensemble_mean",
        "name": f"mean of {name}",
        "layers": layers,
        "auroc": float(weighted_auroc(oof, y)[0]),
        "auroc_ci": [None, None],
        "n": len(tr),
        "n_groups": len(set(groups)),
        "balanced_accuracy": float(balanced_accuracy(1 / (1 + np.exp(-oof)), y)),
        "ba_ci": [None, None],
        "ci_method": "none: an interval on fixed out-of-fold scores ignores the refits "
        "(0.87 coverage in null worlds); see the transfer rows and the concatenated ensemble",
        "rows": used,
    }
    transfer += transfer_rows(
        lambda t_idx, y_t, targets: [
            np.mean(z, axis=0) for z in zip(*(fit_scores(X, t_idx, y_t, targets) for X in Xs), strict=True)
        ],
        sets,
        {"layer": None, "layers": layers, "kind": "ensemble_mean"},
        fpr=fpr,
    )
    transfer += transfer_rows(
        lambda t_idx, y_t, targets: fit_scores(concat, t_idx, y_t, targets),
        sets,
        {"layer": None, "layers": layers, "kind": "ensemble_concat"},
        fpr=fpr,
    )
    return [mean_row, _row(None, "ensemble_concat", res, layers=layers, rows=used)]


def layer_sweep(
    run_dir: str | os.PathLike,
    *,
    pooling: Pooling = "mean",
    n_folds: int = 5,
    seed: int = 0,
    n_bootstrap: int = 50,
    control_fpr: float = CONTROL_FPR,
) -> dict[str, Any]:
    """Signal against depth: at every layer with pooled vectors (notebook 02 pools every layer up to 16
    and an even stride beyond), a raw probe on the training datasets' labelled completions (grouped CV,
    `n_bootstrap` refitted draws for its CI, no permutations: this is the cheap overview) and, where
    the run has evaluation sets, the same probe trained on the train sets and scored on each (AUROC with
    its clustered CI, recall at the control threshold). Uses every labelled completion (no SAE is
    involved). `peak`: the layer with the highest mean eval AUROC (CV AUROC without eval sets)."""
    run_dir = Path(run_dir)
    roles = dataset_roles(run_dir)
    n_layers = model_record(run_dir, required=False).get("n_layers")
    records = read_completions(run_dir)
    out_rows = []
    layers = pooled_layers(run_dir)
    for layer in tqdm(layers, desc="layer sweep", unit="layer"):
        ids, mean, last = load_pooled(run_dir, layer)
        where = {cid: i for i, cid in enumerate(ids)}
        chosen = [r for r in records if r["id"] in where and _probed(r, roles, None)]
        y, groups, prompts, sets, tr = _labels_and_sets(chosen, roles)
        X = (mean if pooling == "mean" else last)[[where[r["id"]] for r in chosen]].numpy().astype(np.float64)
        row: dict[str, Any] = {
            "layer": layer,
            "relative_depth": layer / (n_layers - 1) if n_layers else None,
            "n_train": len(tr),
        }
        try:
            res = probes.probe(
                X[tr],
                y[tr],
                groups[tr],
                prompts=prompts[tr],
                name=f"raw L{layer}",
                n_folds=n_folds,
                seed=seed,
                n_permutations=0,
                n_bootstrap=n_bootstrap,
            )
            row |= {
                "cv_auroc": res.auroc,
                "cv_auroc_ci": list(res.auroc_ci),
                "cv_balanced_accuracy": res.balanced_accuracy,
                "cv_ba_ci": list(res.ba_ci),
            }
        except ValueError as err:
            row["why"] = str(err)
        row["transfer"] = [
            {k: t[k] for k in ("eval_set", "auroc", "auroc_ci", "recall", "recall_ci", "n", "why")}
            for t in transfer_rows(
                lambda t_idx, y_t, targets, X=X: fit_scores(X, t_idx, y_t, targets),
                sets,
                {"layer": layer},
                fpr=control_fpr,
            )
        ]
        out_rows.append(jsonable(row))

    def signal(r: dict[str, Any]) -> float:
        evals = [t["auroc"] for t in r["transfer"] if t["auroc"] is not None]
        value = np.mean(evals) if evals else r.get("cv_auroc")
        return -1.0 if value is None else float(value)

    peak = max(out_rows, key=signal) if out_rows else None
    return {
        "layers": layers,
        "n_layers": n_layers,
        "rows": out_rows,
        "peak": None
        if peak is None
        else {
            "layer": peak["layer"],
            "relative_depth": peak["relative_depth"],
            "signal": signal(peak),
        },
        "signal": "mean AUROC over the eval sets (train on the train sets)"
        if any(r["transfer"] for r in out_rows)
        else "grouped-CV AUROC within the train sets",
        "n_bootstrap": n_bootstrap,
    }


FEATURE_TEST = "held-out, one-sided, prompt-level permutations, on the training datasets"
"""Recorded in every feature file: a file written by an older test is recomputed, not reused."""


def _complete(rows: list[dict[str, Any]], k: int, seed: int) -> bool:
    """Written by feature_table with this k, seed and test (the write is atomic: all rows or none)."""
    sel = [(r.get("selection") or {}, "contexts" in r) for r in rows]
    want = (k, seed, FEATURE_TEST)
    return bool(rows) and all(ok and (s.get("k"), s.get("seed"), s.get("test")) == want for s, ok in sel)


def control_features(means: np.ndarray, exclude: Sequence[int], n: int, seed: int) -> list[int]:
    """`n` features drawn at random (seeded) among those that fire on some of these completions, none of
    `exclude`: unrelated features, whose explanations make the autointerp baseline."""
    live = np.flatnonzero((np.asarray(means) > 0).any(0))
    pool = np.setdiff1d(live, np.asarray(list(exclude), int))
    rng = np.random.default_rng([seed, 11])
    return sorted(int(f) for f in rng.choice(pool, size=min(n, len(pool)), replace=False))


def feature_table(
    run_dir: str | os.PathLike,
    sae_folder: str | os.PathLike,
    *,
    settings: FeatureSettings | None = None,
    tokenizer: Tokenizer = None,
    context_config: ContextConfig | None = None,
    batch_tokens: int = 1024,
    overwrite: bool = False,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """The top-k features of one SAE chosen on one half of the prompt groups and tested on the other
    (features.select_and_report), with firing rates and example windows; written to
    `run_dir/features/{sae_id}.jsonl`. Both halves come from the analysis split the SAE never trained
    on (module doc), and so do the token firing rates (fraction of honest / deceptive tokens > 0,
    descriptive); the example windows come from every stored completion, labelled or not (the labels
    never choose or show a window). A complete file made with the same k, seed and test is reused
    (explanations included) unless `overwrite`. `n_controls` random live features get windows too, in
    `features/{sae_id}.controls.json`: their explanations are label_features' baseline. `settings`
    (default `FeatureSettings()`), or any of its fields as keywords."""
    st = (settings or FeatureSettings()).with_overrides(overrides)
    k, seed, test_fraction = st.k, st.seed, st.test_fraction
    run_dir, loaded = Path(run_dir), load_sae(sae_folder)
    sae, sae_id = loaded.sae, loaded.sae_id
    path = features_path(run_dir, sae_id)
    if path.exists() and not overwrite:
        rows = read_jsonl(path)
        if _complete(rows, k, seed):
            print(f"{path.name}: complete, reused (overwrite=True recomputes it)")
            return rows
    store = LayerStore(run_dir, loaded.layer)
    check_sae_fits(sae, store.d_model)
    keep, used = reserved_rows(run_dir, [loaded])
    docs, y, groups, prompts = labelled_docs(run_dir, store, keep)
    used = {
        **used,
        "datasets": sorted({dataset_of(d.record) for d in docs}),
        "n": len(docs),
        "n_groups": len(set(groups)),
    }
    try:  # before the SAE pass, naming the SAE: notebook 04 loops over several
        split_by_group(groups, test_fraction, seed, y=y)
    except TooFewCompletions as err:
        raise TooFewCompletions(
            f"feature_table of SAE {sae_id} ({len(docs)} analysis completions): {err}"
        ) from err
    means = np.zeros((len(docs), int(sae.d_sae)), np.float32)
    token_labels = np.repeat(y, [d.n for d in docs])
    stream = _pooled_sae_acts(store, sae, docs, "mean", means, batch_tokens)
    rate_honest, rate_deceptive = token_firing_rates(stream, token_labels)
    rows = select_and_report(
        means,
        y,
        groups,
        prompts=prompts,
        k=k,
        test_fraction=test_fraction,
        n_permutations=st.n_permutations,
        seed=seed,
    )
    controls = control_features(means, [r["feature"] for r in rows], st.n_controls, seed)
    cfg = context_config or ContextConfig(seed=seed, batch_tokens=batch_tokens)
    contexts = build_contexts(
        store,
        sae,
        read_completions(run_dir),
        [r["feature"] for r in rows] + controls,
        tokenizer if tokenizer is not None else load_tokenizer(run_dir),
        cfg,
    )
    atomic_write_json(
        feature_controls_path(run_dir, sae_id),
        {
            "why": "random live features of this SAE: their explanations are the autointerp baseline",
            "seed": seed,
            "contexts": [contexts[f].to_dict() for f in controls],
        },
    )
    selection = {
        "k": k,
        "seed": seed,
        "test_fraction": test_fraction,
        "per_completion": SAE_POOLING["mean"],
        "test": FEATURE_TEST,
        **used,
    }
    for r in rows:
        f = r["feature"]
        r.update(
            sae_id=sae_id,
            layer=loaded.layer,
            selection=selection,
            token_firing_rate_honest=float(rate_honest[f]),
            token_firing_rate_deceptive=float(rate_deceptive[f]),
            contexts={key: v for key, v in contexts[f].to_dict().items() if key != "feature"},
            explanation=None,
            explanation_source=NOT_LABELLED,
            deception_related=None,
            kind=None,
            detection=None,
            detection_baseline=None,
            fuzzing=None,
            fuzzing_baseline=None,
        )
    write_jsonl(path, rows)
    return [jsonable(r) for r in rows]  # as the file holds them (lists, None for nan)


def feature_tables(
    run_dir: str | os.PathLike, sae_folders: Sequence[str | os.PathLike], **kwargs: Any
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """feature_table for each SAE; an SAE whose analysis rows hold too few completions of a label is
    skipped with the reason, and the others go on. Returns ({sae_id: rows}, one status row per SAE:
    "done" with its counts, or "skipped" with the reason) for the notebook's table."""
    tables: dict[str, list[dict[str, Any]]] = {}
    status = []
    for folder in sae_folders:
        name = Path(folder).name
        try:
            rows = feature_table(run_dir, folder, **kwargs)
        except TooFewCompletions as err:
            print(f"skipping {name}: {err}")
            status.append(
                {"sae_id": name, "status": "skipped", "features": 0, "completions": None, "reason": str(err)}
            )
            continue
        tables[name] = rows
        sel = rows[0]["selection"] if rows else {}
        status.append(
            {
                "sae_id": name,
                "status": "done",
                "features": len(rows),
                "completions": sel.get("n"),
                "reason": "",
            }
        )
    return tables, status


ANALYSIS_STAGE = "04_autolabel_features"
"""Notebook 04's stage in run.json (its settings: `analysis_settings`)."""


def analysis_settings(
    run_dir: str | os.PathLike, sae_folders: Sequence[str | os.PathLike], params: dict[str, Any]
) -> dict[str, Any]:
    """What determines notebook 04's outputs: its parameters, each SAE's settings hash (from its
    metrics.json: an SAE trained again gives another) and a hash of the labelled completions."""
    saes = {}
    for folder in sae_folders:
        path = Path(folder) / SAE_METRICS
        m = json.loads(path.read_text()) if path.exists() else {}
        saes[Path(folder).name] = m.get("settings_hash") or settings_hash(
            (m.get("training") or {}).get("config")
        )
    rows = read_completions(run_dir)
    labels = settings_hash(sorted((r["id"], str(r.get("label")), dataset_of(r)) for r in rows))
    return {"params": params, "saes": saes, "completions": {"n": len(rows), "labels_hash": labels}}


def check_analysis(run_dir: str | os.PathLike, settings: dict[str, Any], *, overwrite: bool = False) -> bool:
    """Notebook 04's settings against those of the probes and features already in the run folder: the
    same (or only more SAEs) go on; others stop before anything is written, naming what differs, unless
    `overwrite`. Returns whether the features must be recomputed (pass it to feature_table)."""
    has_outputs = probes_path(run_dir).exists() or any(features_dir(run_dir).glob("*.jsonl"))
    before = ((read_run_json(run_dir).get("settings") or {}).get(ANALYSIS_STAGE) or {}).get("values") or {}
    kept = {k: v for k, v in (before.get("saes") or {}).items() if Path(sae_dir(run_dir, k)).exists()}
    settings = {
        **settings,
        "saes": {**kept, **settings["saes"]},
    }  # SAEs left out by SAE_FILTER stay as they are
    decision = check_stage_settings(
        run_dir,
        ANALYSIS_STAGE,
        settings,
        overwrite=overwrite,
        add=True,
        addable=("saes.*",),
        has_outputs=has_outputs,
        overwrite_does="recompute the probes and every SAE's features and explanations "
        "with the new settings (Gemini answers are cached: nothing is paid twice)",
    )
    if decision == "overwrite":  # the old probes and features go to replaced/, not lost
        set_aside(run_dir, ANALYSIS_STAGE, [probes_path(run_dir), features_dir(run_dir)])
    return decision == "overwrite"


def label_features(
    run_dir: str | os.PathLike,
    sae_id: str,
    client: GeminiClient | None,
    *,
    n_label: int = 8,
    features_per_request: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Explain and score (autointerp.py) the `n_label` top-ranked features of `features/{sae_id}.jsonl`,
    rewritten atomically. No client (no key): marked unavailable. Quota stop: rerun, answers are cached."""
    path = features_path(run_dir, sae_id)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run feature_table for this SAE first")
    rows = sorted(read_jsonl(path), key=lambda r: r["rank"])
    chosen = rows[:n_label]
    contexts = [FeatureContexts.from_dict({"feature": r["feature"], **r["contexts"]}) for r in chosen]
    control_file = feature_controls_path(run_dir, sae_id)
    controls = (
        [FeatureContexts.from_dict(c) for c in json.loads(control_file.read_text())["contexts"]]
        if control_file.exists()
        else []
    )
    if not controls:
        print(
            f"{sae_id}: no random control features (rerun feature_table): the baseline borrows the next top "
            "feature's explanation"
        )
    results = autointerp(
        contexts, client, features_per_request=features_per_request, seed=seed, controls=controls
    )
    for r in chosen:
        r.update({key: v for key, v in results[r["feature"]].items() if key != "feature"})
    for r in rows[n_label:]:
        if r.get("explanation") is None:
            r["explanation_source"] = f"not labelled (outside the top n_label={n_label})"
    write_jsonl(path, rows)
    print(f"{sae_id}: {_score_line(score_summary(results))}")
    return rows


def _score_line(summary: dict[str, Any]) -> str:
    """One line of scoring.score_summary: per method, features scored, mean balanced accuracy against the
    baseline's, and how many are above chance."""
    parts = []
    for m in ("detection", "fuzzing"):
        n = summary[f"{m}_n_scored"]
        if not n:
            parts.append(f"{m}: none scored")
            continue
        parts.append(
            f"{m}: {n} scored, balanced accuracy {summary[f'{m}_balanced_accuracy']:.2f} vs baseline "
            f"{_fmt(summary[f'{m}_baseline_balanced_accuracy'], '.2f') or '-'}, "
            f"{summary[f'{m}_n_above_chance']} above chance"
        )
    return "; ".join(parts)


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec)


def probe_summary(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One short display row per probe of `probe_table` (grouped CV on the training datasets): balanced
    accuracy and AUROC with their CIs, the permutation p-value, and the comparison each kind is made
    for: an SAE against the raw probe (verdict, Holm p), its random-weight control against the SAE, the
    prompt-only probe against the raw one. A row that could not be computed says why."""
    out = []
    for r in rows:
        name = r.get("sae_id") or r.get("name") or r["kind"]
        if r["kind"] == "random_sae":
            name = f"random {r['sae_id']}"
        if r["kind"] == "prompt_only":
            name = "prompt only"
        if "why" in r:
            out.append(
                {"layer": str(r["layer"]), "probe": name, "rows": "", "balanced acc [95% CI]": r["why"]}
            )
            continue
        cmp = ""
        if r.get("verdict"):
            cmp = f"vs raw: {r['verdict']} (Holm p {r['vs_raw']['p_holm']:.3g})"
        elif r["kind"] == "random_sae":
            cmp = (
                f"trained - random: {r['vs_trained']['mean_difference']:+.2f} "
                f"(p {r['vs_trained']['p_value']:.3g})"
            )
        elif r["kind"] == "prompt_only":
            cmp = f"answer - prompt: {-r['vs_raw']['mean_difference']:+.2f} (p {r['vs_raw']['p_value']:.3g})"
        out.append(
            {
                "layer": str(r["layer"])
                if r["layer"] is not None
                else "+".join(map(str, r.get("layers", []))),
                "probe": name,
                "rows": str((r.get("rows") or {}).get("n", r.get("n"))),
                "balanced acc [95% CI]": value_ci(r.get("balanced_accuracy"), r.get("ba_ci")),
                "AUROC [95% CI]": value_ci(r.get("auroc"), r.get("auroc_ci")),
                "perm. p": _fmt(r.get("p_value"), ".3f"),
                "comparison": cmp,
            }
        )
    return out


def transfer_summary(probes_json: dict[str, Any]) -> list[dict[str, str]]:
    """One display row per reader x evaluation set of probes.json's `transfer`: trained on the train
    sets, scored on another dataset: AUROC, recall and balanced accuracy at the control set's threshold,
    each with its 95% CI, and the threshold's real resolution; a missing number shows its reason."""
    out = []
    for t in probes_json.get("transfer") or []:
        thr = t.get("threshold") or {}
        kind = {"sae": t.get("sae_id"), "random_sae": f"random {t.get('sae_id')}"}.get(t["kind"], t["kind"])
        res = ""
        if thr:
            res = f"{thr['control_exceed']}/{thr['n_control']} control above (FPR <= {thr['fpr_upper']:.3f})"
            res += " TOO FEW for 1%" if thr["too_small"] else ""
        out.append(
            {
                "layer": str(t["layer"])
                if t.get("layer") is not None
                else "+".join(map(str, t.get("layers", []))),
                "probe": str(kind),
                "train -> eval": f"{'+'.join(t['train_sets'])} -> {t['eval_set']}",
                "n (groups)": f"{t['n']} ({t['n_groups']})",
                "AUROC [95% CI]": value_ci(t["auroc"], t["auroc_ci"]),
                f"recall @ {probes_json.get('control_fpr', CONTROL_FPR):.0%} FPR": value_ci(
                    t["recall"], t["recall_ci"]
                ),
                "BA @ threshold": value_ci(t["ba_at_threshold"], t["ba_ci"]),
                "control threshold": res or "; ".join(t["why"]),
            }
        )
    return out


def sweep_summary(probes_json: dict[str, Any]) -> list[dict[str, str]]:
    """One display row per layer of the layer sweep: relative depth, the grouped-CV AUROC within the
    train sets and the AUROC on each eval set, with 95% CIs."""
    sweep = probes_json.get("layer_sweep") or {}
    out = []
    for r in sweep.get("rows") or []:
        row = {
            "layer": str(r["layer"]),
            "depth": _fmt(r.get("relative_depth"), ".0%"),
            "CV AUROC (train sets)": value_ci(r.get("cv_auroc"), r.get("cv_auroc_ci")),
        }
        for t in r["transfer"]:
            row[f"AUROC on {t['eval_set']}"] = value_ci(t["auroc"], t["auroc_ci"])
        out.append(row)
    return out


def sae_pair_summary(probes_json: dict[str, Any]) -> list[dict[str, str]]:
    """SAE-vs-SAE paired tests at matched L0 (probes.json `sae_vs_sae`), one row per pair."""
    return [
        {
            "layer": str(c["layer"]),
            "a": c["a"],
            "b": c["b"],
            "matched L0": str(c["matched_l0"]),
            "BA a / b": f"{c['balanced_accuracy'][0]:.2f} / {c['balanced_accuracy'][1]:.2f}",
            "a - b (folds)": f"{c['mean_difference']:+.3f}",
            "Holm p": f"{c['p_holm']:.3g}",
        }
        for c in probes_json.get("sae_vs_sae") or []
    ]


def feature_summary(rows: list[dict[str, Any]], n: int = 8) -> list[dict[str, str]]:
    """Short display rows for the top `n` features of `feature_table`: held-out d with its CI, the
    one-sided p in the direction the selection half chose and its q over the top k (blank where a value
    is missing, e.g. a CI that too few held-out groups could not give)."""
    return [
        {
            "feature": str(r["feature"]),
            "chosen as": str(r.get("direction") or ""),
            "d (held out)": _fmt(r.get("cohens_d"), "+.2f"),
            "d 95% CI": ""
            if not r.get("d_ci") or None in r["d_ci"]
            else f"[{r['d_ci'][0]:+.2f}, {r['d_ci'][1]:+.2f}]",
            "p (one-sided)": _fmt(r.get("p_value"), ".3g"),
            "q": _fmt(r.get("q_value"), ".3g"),
            "fires honest": _fmt(r.get("firing_rate_honest"), ".2f"),
            "fires deceptive": _fmt(r.get("firing_rate_deceptive"), ".2f"),
        }
        for r in rows[:n]
    ]
