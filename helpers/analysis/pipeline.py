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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.analysis import probes
from helpers.analysis.autointerp import autointerp
from helpers.analysis.contexts import (
    ContextConfig,
    Doc,
    FeatureContexts,
    build_contexts,
    check_sae_fits,
    docs_for,
    iter_token_acts,
)
from helpers.analysis.features import select_and_report, token_firing_rates
from helpers.analysis.scoring import score_summary
from helpers.collect.capture import load_pooled
from helpers.collect.completions import analysis_split, read_completions
from helpers.collect.store import LayerStore
from helpers.gemini import GeminiClient
from helpers.model.load import load_model
from helpers.run import (
    atomic_write_json,
    feature_controls_path,
    features_path,
    jsonable,
    probes_path,
    read_jsonl,
    read_run_json,
    write_jsonl,
)
from helpers.saes.io import LoadedSAE, load_sae
from helpers.stats import check_labels, holm

Pooling = Literal["mean", "last"]
SAE_POOLING = {
    "mean": "mean over the completion's tokens of per-token SAE activations",
    "last": "SAE activations at the completion's last token",
}
NOT_LABELLED = "not labelled yet (run label_features)"


def sae_id_of(loaded: LoadedSAE) -> str:
    """The id in cfg.json metadata (written by train_grid), else the folder name."""
    return str((loaded.cfg.get("metadata") or {}).get("sae_id") or loaded.path.name)


def labelled_docs(
    run_dir: str | os.PathLike, store: LayerStore, keep: set[str] | None = None
) -> tuple[list[Doc], np.ndarray, np.ndarray, np.ndarray]:
    """(docs, y, groups, prompts) of the completions labelled honest or deceptive that have activations
    in `store` (and are in `keep`, when given), in store order; prints what was left out. One label
    class raises the probes' error."""
    records = read_completions(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}/completions.jsonl is missing or empty: run notebook 02 first")
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
    splits = {json.dumps(m["analysis_split"], sort_keys=True)
              for s in saes if (m := s.cfg.get("metadata") or {}).get("analysis_split")}  # fmt: skip
    for s in saes:
        meta = s.cfg.get("metadata") or {}
        if not meta.get("analysis_split") and meta.get("condition") in ("deceptive_only", "honest_only"):
            print(f"WARNING: {sae_id_of(s)} was trained before notebook 03 reserved analysis rows: it trained on "
                  "rows chosen by their label, so its probe and features are tested on rows it saw and its "
                  "numbers are inflated. Retrain it with notebook 03 (delete its folder) before comparing it.")  # fmt: skip
    if len(splits) > 1:
        raise ValueError(
            f"these SAEs reserved different analysis splits ({sorted(splits)}): retrain them with one notebook 03 "
            "run, or analyse them separately (SAE_FILTER)"
        )
    if not splits:
        return None, {"rows": "all labelled completions (no SAE here reserved an analysis split)"}
    split = json.loads(splits.pop())
    keep = set(analysis_split(read_completions(run_dir), split["fraction"], split["seed"])[1])
    return keep, {"rows": "analysis split: groups no SAE trained on", "analysis_split": split}


def _pooled_sae_acts(
    store: LayerStore, sae: Any, docs: Sequence[Doc], pooling: Pooling, out: np.ndarray, batch_tokens: int
) -> Iterator[torch.Tensor]:
    """Fills out [n_docs, d_sae] with each completion's SAE activations pooled over its tokens, and
    yields every batch's per-token activations [n, d_sae] (for token statistics) on the way."""
    row = 0
    for chunk, acts, _ in iter_token_acts(store, sae, docs, batch_tokens=batch_tokens):
        lengths = torch.tensor([d.n for d in chunk], device=acts.device)
        if pooling == "mean":
            seg = torch.repeat_interleave(torch.arange(len(chunk), device=acts.device), lengths)
            pooled = torch.zeros(len(chunk), acts.shape[1], device=acts.device).index_add_(0, seg, acts)
            pooled /= lengths[:, None]
        else:
            pooled = acts[lengths.cumsum(0) - 1]
        out[row : row + len(chunk)] = pooled.cpu().numpy()
        row += len(chunk)
        yield acts


def sae_completion_acts(
    store: LayerStore, sae: Any, docs: Sequence[Doc], *, pooling: Pooling = "mean", batch_tokens: int = 1024
) -> np.ndarray:
    """[n_docs, d_sae] float32: per completion, its per-token SAE activations pooled (module doc)."""
    if pooling not in SAE_POOLING:
        raise ValueError(f"pooling must be one of {sorted(SAE_POOLING)}, got {pooling!r}")
    out = np.zeros((len(docs), int(sae.d_sae)), np.float32)
    for _ in _pooled_sae_acts(store, sae, docs, pooling, out, batch_tokens):
        pass
    return out


def _row(layer: int, kind: str, result: probes.ProbeResult, **extra: Any) -> dict[str, Any]:
    return {"layer": layer, "kind": kind, **result.to_dict(), **extra}


def _random_summary(control: dict[str, Any]) -> dict[str, Any]:
    return {k: control[k] for k in ("name", "n_directions", "ba_mean", "ba_quantiles", "ba_max")}


def _verdict(cmp: dict[str, Any], alpha: float = 0.05) -> str:
    if cmp["p_holm"] < alpha:
        return "SAE beats raw" if cmp["mean_difference"] > 0 else "raw beats SAE"
    return "no significant difference"


def probe_table(
    run_dir: str | os.PathLike,
    layers: Sequence[int],
    sae_folders: Sequence[str | os.PathLike] = (),
    *,
    pooling: Pooling = "mean",
    n_folds: int = 5,
    n_permutations: int = 200,
    n_bootstrap: int = 200,
    n_directions: int = 20,
    seed: int = 0,
    batch_tokens: int = 1024,
) -> list[dict[str, Any]]:
    """Probe rows for `layers` and the SAEs in `sae_folders` (each must read one of `layers`); also
    written to `run_dir/probes.json`. Every probe of a layer uses the same completions and folds: the
    analysis split when the layer's SAEs reserved one (module doc). The raw-vs-SAE tests of the whole
    table are Holm-corrected together (`p_holm`; the verdict uses it)."""
    if pooling not in SAE_POOLING:
        raise ValueError(f"pooling must be one of {sorted(SAE_POOLING)}, got {pooling!r}")
    run_dir, layers = Path(run_dir), [int(layer) for layer in layers]
    saes = [load_sae(f) for f in sae_folders]
    for s in saes:
        if s.layer not in layers:
            raise ValueError(
                f"SAE {sae_id_of(s)} reads layer {s.layer}, which is not in layers={layers}: add it"
            )
    texts = {r["id"]: r.get("completion") or "" for r in read_completions(run_dir)}
    common = dict(n_folds=n_folds, seed=seed, n_permutations=n_permutations, n_bootstrap=n_bootstrap)
    rows: list[dict[str, Any]] = []
    bow_cache: dict[tuple[str, ...], probes.ProbeResult] = {}
    bar = tqdm(total=len(layers) + len(saes), desc="probes (layers, then their SAEs)", unit="probe")
    for layer in layers:
        store = LayerStore(run_dir, layer)
        layer_saes = [s for s in saes if s.layer == layer]
        keep, used = reserved_rows(run_dir, layer_saes)
        docs, y, groups, prompts = labelled_docs(run_dir, store, keep)
        used = {**used, "n": len(docs), "n_groups": len(set(groups)), "n_prompts": len(set(prompts))}
        print(f"layer {layer}: {used['rows']}: {used['n']} completions, {used['n_groups']} groups")
        ids, mean, last = load_pooled(run_dir, layer)
        where = {cid: i for i, cid in enumerate(ids)}
        missing = [d.id for d in docs if d.id not in where]
        if missing:
            raise ValueError(f"{len(missing)} completions (e.g. {missing[0]!r}) are stored but not pooled at "
                             f"layer {layer}: rerun collect_activations to finish the pooled file")  # fmt: skip
        X = (mean if pooling == "mean" else last)[[where[d.id] for d in docs]].numpy()
        raw = probes.probe(X, y, groups, prompts=prompts, name=f"raw L{layer}", **common)
        rd = probes.random_direction_control(
            X, y, groups, n_directions=n_directions, n_folds=n_folds, seed=seed
        )
        rows.append(_row(layer, "raw", raw, pooling=pooling, random_direction=_random_summary(rd), rows=used))
        bar.update()
        key = tuple(d.id for d in docs)
        if key not in bow_cache:
            bow_cache[key] = probes.bag_of_words_probe(
                [texts[d.id] for d in docs], y, groups, prompts=prompts, **common
            )
        rows.append(_row(layer, "bag_of_words", bow_cache[key], vs_raw=probes.compare_paired(bow_cache[key], raw),
                         rows=used))  # fmt: skip
        for s in layer_saes:
            check_sae_fits(s.sae, store.d_model)
            Xs = sae_completion_acts(store, s.sae, docs, pooling=pooling, batch_tokens=batch_tokens)
            res = probes.probe(Xs, y, groups, prompts=prompts, name=sae_id_of(s), **common)
            rd = probes.random_direction_control(
                Xs, y, groups, n_directions=n_directions, n_folds=n_folds, seed=seed
            )
            rows.append(_row(layer, "sae", res, sae_id=sae_id_of(s), architecture=s.cfg.get("architecture"),
                             condition=(s.cfg.get("metadata") or {}).get("condition"), pooling=SAE_POOLING[pooling],
                             random_direction=_random_summary(rd), vs_raw=probes.compare_paired(res, raw), rows=used))  # fmt: skip
            bar.update()
    bar.close()
    tests = [r["vs_raw"] for r in rows if r["kind"] == "sae"]
    for cmp, adjusted in zip(tests, holm([c["p_value"] for c in tests]), strict=True):
        cmp["p_holm"], cmp["multiplicity"] = float(adjusted), f"Holm over the {len(tests)} SAE-vs-raw tests"
    for r in rows:
        if r["kind"] == "sae":
            r["verdict"] = _verdict(r["vs_raw"])
    atomic_write_json(
        probes_path(run_dir),
        {"pooling": pooling, "sae_features": SAE_POOLING[pooling], **common, "rows": rows},
    )
    return rows


def load_tokenizer(run_dir: str | os.PathLike) -> Any:
    """The tokenizer of the run's model: from the converted / downloaded folder run.json names when it is
    still there (cheap), else through load_model (announced: it loads the weights too)."""
    from transformers import AutoTokenizer

    model = read_run_json(run_dir).get("model") or {}
    if not model.get("spec"):
        raise FileNotFoundError(f"{Path(run_dir) / 'run.json'} names no model: pass tokenizer=lm.tokenizer")
    if model.get("path") and Path(model["path"]).is_dir():
        print(f"loading the tokenizer of {model['spec']} from {model['path']}")
        return AutoTokenizer.from_pretrained(model["path"])
    print(f"loading {model['spec']} on the CPU for its tokenizer (pass tokenizer=lm.tokenizer to skip this)")
    return load_model(model["spec"], revision=model.get("revision"), device="cpu").tokenizer


FEATURE_TEST = "held-out, one-sided, prompt-level permutations"
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
    k: int = 20,
    seed: int = 0,
    tokenizer: Any = None,
    test_fraction: float = 0.5,
    n_permutations: int = 2000,
    n_controls: int = 2,
    context_config: ContextConfig | None = None,
    batch_tokens: int = 1024,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """The top-k features of one SAE chosen on one half of the prompt groups and tested on the other
    (features.select_and_report), with firing rates and example windows; written to
    `run_dir/features/{sae_id}.jsonl`. Both halves come from the analysis split the SAE never trained
    on (module doc), and so do the token firing rates (fraction of honest / deceptive tokens > 0,
    descriptive); the example windows come from every stored completion, labelled or not (the labels
    never choose or show a window). A complete file made with the same k, seed and test is reused
    (explanations included) unless `overwrite`. `n_controls` random live features get windows too, in
    `features/{sae_id}.controls.json`: their explanations are label_features' baseline."""
    run_dir, loaded = Path(run_dir), load_sae(sae_folder)
    sae, sae_id = loaded.sae, sae_id_of(loaded)
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
    used = {**used, "n": len(docs), "n_groups": len(set(groups))}
    means = np.zeros((len(docs), int(sae.d_sae)), np.float32)
    token_labels = np.repeat(y, [d.n for d in docs])
    stream = _pooled_sae_acts(store, sae, docs, "mean", means, batch_tokens)
    rate_honest, rate_deceptive = token_firing_rates(stream, token_labels)
    rows = select_and_report(means, y, groups, prompts=prompts, k=k, test_fraction=test_fraction,
                             n_permutations=n_permutations, seed=seed)  # fmt: skip
    controls = control_features(means, [r["feature"] for r in rows], n_controls, seed)
    cfg = context_config or ContextConfig(seed=seed, batch_tokens=batch_tokens)
    contexts = build_contexts(store, sae, read_completions(run_dir), [r["feature"] for r in rows] + controls,
                              tokenizer if tokenizer is not None else load_tokenizer(run_dir), cfg)  # fmt: skip
    atomic_write_json(feature_controls_path(run_dir, sae_id),
                      {"why": "random live features of this SAE: their explanations are the autointerp baseline",
                       "seed": seed, "contexts": [contexts[f].to_dict() for f in controls]})  # fmt: skip
    selection = {"k": k, "seed": seed, "test_fraction": test_fraction, "per_completion": SAE_POOLING["mean"],
                 "test": FEATURE_TEST, **used}  # fmt: skip
    for r in rows:
        f = r["feature"]
        r.update(sae_id=sae_id, layer=loaded.layer, selection=selection,
                 token_firing_rate_honest=float(rate_honest[f]), token_firing_rate_deceptive=float(rate_deceptive[f]),
                 contexts={key: v for key, v in contexts[f].to_dict().items() if key != "feature"},
                 explanation=None, explanation_source=NOT_LABELLED, deception_related=None, kind=None,
                 detection=None, detection_baseline=None, fuzzing=None, fuzzing_baseline=None)  # fmt: skip
    write_jsonl(path, rows)
    return [jsonable(r) for r in rows]  # as the file holds them (lists, None for nan)


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
    controls = [FeatureContexts.from_dict(c) for c in json.loads(control_file.read_text())["contexts"]] if control_file.exists() else []  # fmt: skip
    if not controls:
        print(
            f"{sae_id}: no random control features (rerun feature_table): the baseline borrows the next top feature's explanation"
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
        parts.append(f"{m}: {n} scored, balanced accuracy {summary[f'{m}_balanced_accuracy']:.2f} vs baseline "
                     f"{_fmt(summary[f'{m}_baseline_balanced_accuracy'], '.2f') or '-'}, "
                     f"{summary[f'{m}_n_above_chance']} above chance")  # fmt: skip
    return "; ".join(parts)


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None or value != value else format(value, spec)


def probe_summary(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One short display row per probe of `probe_table`: balanced accuracy and AUROC with their CIs,
    the permutation p-value, and (for SAEs) the verdict against the raw-activation probe with its
    Holm-corrected p."""

    def ci(value: float, bounds: Sequence[float | None]) -> str:
        inside = "" if None in bounds else f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"
        return f"{value:.2f}{inside}"

    return [
        {
            "layer": str(r["layer"]),
            "probe": r.get("sae_id") or r["kind"],
            "rows": str((r.get("rows") or {}).get("n", r["n"])),
            "balanced acc [95% CI]": ci(r["balanced_accuracy"], r["ba_ci"]),
            "AUROC [95% CI]": ci(r["auroc"], r["auroc_ci"]),
            "perm. p": _fmt(r.get("p_value"), ".3f"),
            "vs raw (Holm p)": f"{r['verdict']} ({r['vs_raw']['p_holm']:.3g})" if r.get("verdict") else "",
        }
        for r in rows
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
