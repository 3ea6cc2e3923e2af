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
scenario, or the fact of a contrast pair) for every split, fold and bootstrap.
"""

from __future__ import annotations

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
from helpers.collect.completions import read_completions
from helpers.collect.store import LayerStore
from helpers.gemini import GeminiClient
from helpers.model.load import load_model
from helpers.run import (
    atomic_write_json,
    features_path,
    jsonable,
    probes_path,
    read_jsonl,
    read_run_json,
    write_jsonl,
)
from helpers.saes.io import LoadedSAE, load_sae
from helpers.stats import check_labels

Pooling = Literal["mean", "last"]
SAE_POOLING = {
    "mean": "mean over the completion's tokens of per-token SAE activations",
    "last": "SAE activations at the completion's last token",
}
NOT_LABELLED = "not labelled yet (run label_features)"


def sae_id_of(loaded: LoadedSAE) -> str:
    """The id in cfg.json metadata (written by train_grid), else the folder name."""
    return str((loaded.cfg.get("metadata") or {}).get("sae_id") or loaded.path.name)


def labelled_docs(run_dir: str | os.PathLike, store: LayerStore) -> tuple[list[Doc], np.ndarray, np.ndarray]:
    """(docs, y, groups) of the completions labelled honest or deceptive that have activations in
    `store`, in store order; prints what was left out. One label class raises the probes' error."""
    records = read_completions(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}/completions.jsonl is missing or empty: run notebook 02 first")
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
    return docs, y, groups


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


def _verdict(cmp: dict[str, Any]) -> str:
    if cmp["p_value"] < 0.05:
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
    n_bootstrap: int = 1000,
    n_directions: int = 20,
    seed: int = 0,
    batch_tokens: int = 1024,
) -> list[dict[str, Any]]:
    """Probe rows for `layers` and the SAEs in `sae_folders` (each must read one of `layers`); also
    written to `run_dir/probes.json`. Every probe of a layer uses the same completions and folds."""
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
        docs, y, groups = labelled_docs(run_dir, store)
        ids, mean, last = load_pooled(run_dir, layer)
        where = {cid: i for i, cid in enumerate(ids)}
        missing = [d.id for d in docs if d.id not in where]
        if missing:
            raise ValueError(f"{len(missing)} completions (e.g. {missing[0]!r}) are stored but not pooled at "
                             f"layer {layer}: rerun collect_activations to finish the pooled file")  # fmt: skip
        X = (mean if pooling == "mean" else last)[[where[d.id] for d in docs]].numpy()
        raw = probes.probe(X, y, groups, name=f"raw L{layer}", **common)
        rd = probes.random_direction_control(
            X, y, groups, n_directions=n_directions, n_folds=n_folds, seed=seed
        )
        rows.append(_row(layer, "raw", raw, pooling=pooling, random_direction=_random_summary(rd)))
        bar.update()
        key = tuple(d.id for d in docs)
        if key not in bow_cache:
            bow_cache[key] = probes.bag_of_words_probe([texts[d.id] for d in docs], y, groups, **common)
        rows.append(
            _row(layer, "bag_of_words", bow_cache[key], vs_raw=probes.compare_paired(bow_cache[key], raw))
        )
        for s in (s for s in saes if s.layer == layer):
            check_sae_fits(s.sae, store.d_model)
            Xs = sae_completion_acts(store, s.sae, docs, pooling=pooling, batch_tokens=batch_tokens)
            res = probes.probe(Xs, y, groups, name=sae_id_of(s), **common)
            rd = probes.random_direction_control(
                Xs, y, groups, n_directions=n_directions, n_folds=n_folds, seed=seed
            )
            cmp = probes.compare_paired(res, raw, seed=seed)
            rows.append(_row(layer, "sae", res, sae_id=sae_id_of(s), architecture=s.cfg.get("architecture"),
                             pooling=SAE_POOLING[pooling], random_direction=_random_summary(rd), vs_raw=cmp,
                             verdict=_verdict(cmp)))  # fmt: skip
            bar.update()
    bar.close()
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


def _complete(rows: list[dict[str, Any]], k: int, seed: int) -> bool:
    """Written by feature_table with this k and seed (the write is atomic: all rows or none)."""
    sel = [(r.get("selection") or {}, "contexts" in r) for r in rows]
    return bool(rows) and all(ok and (s.get("k"), s.get("seed")) == (k, seed) for s, ok in sel)


def feature_table(
    run_dir: str | os.PathLike,
    sae_folder: str | os.PathLike,
    *,
    k: int = 20,
    seed: int = 0,
    tokenizer: Any = None,
    test_fraction: float = 0.5,
    n_bootstrap: int = 1000,
    context_config: ContextConfig | None = None,
    batch_tokens: int = 1024,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """The top-k features of one SAE by held-out effect size, with firing rates and example windows;
    written to `run_dir/features/{sae_id}.jsonl`. Token firing rates (fraction of honest / deceptive
    tokens > 0) are descriptive, over all labelled completions; the windows come from every stored
    completion, labelled or not. A complete file made with the same k and seed is reused
    (explanations included) unless `overwrite`."""
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
    docs, y, groups = labelled_docs(run_dir, store)
    means = np.zeros((len(docs), int(sae.d_sae)), np.float32)
    token_labels = np.repeat(y, [d.n for d in docs])
    stream = _pooled_sae_acts(store, sae, docs, "mean", means, batch_tokens)
    rate_honest, rate_deceptive = token_firing_rates(stream, token_labels)
    rows = select_and_report(
        means, y, groups, k=k, test_fraction=test_fraction, n_bootstrap=n_bootstrap, seed=seed
    )
    cfg = context_config or ContextConfig(seed=seed, batch_tokens=batch_tokens)
    contexts = build_contexts(store, sae, read_completions(run_dir), [r["feature"] for r in rows],
                              tokenizer if tokenizer is not None else load_tokenizer(run_dir), cfg)  # fmt: skip
    selection = {"k": k, "seed": seed, "test_fraction": test_fraction, "per_completion": SAE_POOLING["mean"]}
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
    results = autointerp(contexts, client, features_per_request=features_per_request, seed=seed)
    for r in chosen:
        r.update({key: v for key, v in results[r["feature"]].items() if key != "feature"})
    for r in rows[n_label:]:
        if r.get("explanation") is None:
            r["explanation_source"] = f"not labelled (outside the top n_label={n_label})"
    write_jsonl(path, rows)
    print(f"{sae_id}: {score_summary(results)}")
    return rows


def probe_summary(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One short display row per probe of `probe_table`: balanced accuracy and AUROC with their CIs,
    the permutation p-value, and (for SAEs) the verdict against the raw-activation probe."""

    def ci(value: float, bounds: Sequence[float]) -> str:
        return f"{value:.2f} [{bounds[0]:.2f}, {bounds[1]:.2f}]"

    return [
        {
            "layer": str(r["layer"]),
            "probe": r.get("sae_id") or r["kind"],
            "balanced acc [95% CI]": ci(r["balanced_accuracy"], r["ba_ci"]),
            "AUROC [95% CI]": ci(r["auroc"], r["auroc_ci"]),
            "perm. p": f"{r['p_value']:.3f}",
            "vs raw": r.get("verdict", ""),
        }
        for r in rows
    ]


def feature_summary(rows: list[dict[str, Any]], n: int = 8) -> list[dict[str, str]]:
    """Short display rows for the top `n` features of `feature_table` (blank where a value is missing,
    e.g. a CI that too few held-out groups could not give)."""

    def fmt(value: Any, spec: str) -> str:
        return "" if value is None else format(value, spec)

    return [
        {
            "feature": str(r["feature"]),
            "d (held out)": fmt(r.get("cohens_d"), "+.2f"),
            "d 95% CI": ""
            if not r.get("d_ci") or None in r["d_ci"]
            else f"[{r['d_ci'][0]:+.2f}, {r['d_ci'][1]:+.2f}]",
            "q": fmt(r.get("q_value"), ".3g"),
            "fires honest": fmt(r.get("firing_rate_honest"), ".2f"),
            "fires deceptive": fmt(r.get("firing_rate_deceptive"), ".2f"),
        }
        for r in rows[:n]
    ]
