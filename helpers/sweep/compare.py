"""The cross-model comparison: one table from the sweep's run folders, its figures and a summary.

Nothing is recomputed: every number is read from the files notebook 04 (`probes.json`,
`features/{sae_id}.jsonl`) and notebook 03 (`saes/*/metrics.json`) wrote in each model's run folder,
through their readers (`run.read_probes`, `run.read_jsonl`, `run.read_sae_metrics`). One row per
model × layer: the relative depth, the raw probe (AUROC, balanced accuracy, their CIs), recall at the
control set's 1%-FPR threshold on each eval set, the layer's best SAE probe (by AUROC) with its paired
difference to raw and the p-value Holm-adjusted over every SAE-vs-raw test of the whole sweep, that
SAE's random-weight control, its quality (explained variance, L0, CE-loss score), the largest held-out
feature |d| of the layer with its CI, and the model's multi-layer ensembles. A model that failed or was
too big has one row with its error.

Figures (plotly): signal vs relative depth (one line per model), SAE minus raw per model and
architecture, and the best raw AUROC against parameter count with a least-squares trend in log10
parameters, its 95% confidence band and slope CI (the "AUROC per 10× parameters" of Nordby, Pais,
Parrack 2026). With fewer than 3 models there is no CI (2 points fit any line), and the figure says so.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from helpers.plots import save_figure
from helpers.run import (
    atomic_write_bytes,
    atomic_write_json,
    features_path,
    model_record,
    read_jsonl,
    read_probes,
    read_sae_metrics,
)
from helpers.stats import holm
from helpers.sweep.plan import params_text, relative_depth
from helpers.tables import value_ci

TABLE = "comparison"
COLUMNS = [
    "model",
    "spec",
    "status",
    "n_params",
    "n_layers",
    "layer",
    "relative_depth",
    "raw_auroc",
    "raw_auroc_lo",
    "raw_auroc_hi",
    "raw_ba",
    "raw_ba_lo",
    "raw_ba_hi",
    "raw_n",
    "raw_n_groups",
    "recall_at_fpr",
    "best_sae",
    "sae_architecture",
    "sae_auroc",
    "sae_ba",
    "sae_minus_raw_ba",
    "sae_minus_raw_ba_lo",
    "sae_minus_raw_ba_hi",
    "sae_minus_raw_auroc",
    "sae_vs_raw_p",
    "sae_vs_raw_p_holm_sweep",
    "random_sae_auroc",
    "random_sae_ba",
    "sae_explained_variance",
    "sae_l0",
    "sae_ce_loss_score",
    "max_feature_d",
    "max_feature_d_lo",
    "max_feature_d_hi",
    "max_feature_sae",
    "ensemble_concat_auroc",
    "ensemble_concat_auroc_lo",
    "ensemble_concat_auroc_hi",
    "ensemble_mean_auroc",
    "error",
]


def _ci(pair: Any) -> tuple[Any, Any]:
    return tuple(pair) if isinstance(pair, list | tuple) and len(pair) == 2 else (None, None)


def _rows_of(probes: dict[str, Any], kind: str, layer: int | None = None) -> list[dict[str, Any]]:
    return [r for r in probes.get("rows", []) if r["kind"] == kind and (layer is None or r["layer"] == layer)]


def _recall(probes: dict[str, Any], layer: int) -> str | None:
    """Raw probe's recall at the control threshold per eval set, 'set: 0.83 [0.71, 0.92]'; None without a
    control set."""
    out = []
    for t in probes.get("transfer", []):
        if (
            t.get("kind") == "raw"
            and t.get("layer") == layer
            and t.get("control_set")
            and t.get("recall") is not None
        ):
            out.append(f"{t['eval_set']}: {value_ci(t['recall'], t.get('recall_ci'))}")
    return "; ".join(out) or None


def _max_feature(run_dir: Path, sae_ids: list[str]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for sid in sae_ids:
        for f in read_jsonl(features_path(run_dir, sid)):
            d = f.get("cohens_d")
            if d is not None and (not best or abs(d) > abs(best["max_feature_d"])):
                lo, hi = _ci(f.get("d_ci"))
                best = {
                    "max_feature_d": d,
                    "max_feature_d_lo": lo,
                    "max_feature_d_hi": hi,
                    "max_feature_sae": sid,
                }
    return best


def model_rows(key: str, entry: dict[str, Any], n_params: int | None) -> list[dict[str, Any]]:
    """The rows of one model of the sweep (`entry`: its sweep.json record), read from its run folder."""
    base = {"model": key, "spec": entry.get("spec"), "status": entry.get("status"), "n_params": n_params}
    run_dir = Path(entry.get("run_dir", ""))
    probes_file = run_dir / "probes.json"
    if entry.get("status") != "done" or not probes_file.exists():
        return [{**base, "error": entry.get("error") or f"no probes.json yet (status {entry.get('status')})"}]
    n_layers = model_record(run_dir, required=False).get("n_layers")
    probes = read_probes(run_dir)
    metrics = {m["sae_id"]: m for m in read_sae_metrics(run_dir)}
    concat = next(iter(_rows_of(probes, "ensemble_concat")), {})
    mean = next(iter(_rows_of(probes, "ensemble_mean")), {})
    c_lo, c_hi = _ci(concat.get("auroc_ci"))
    out = []
    for raw in _rows_of(probes, "raw"):
        layer = raw["layer"]
        a_lo, a_hi = _ci(raw.get("auroc_ci"))
        b_lo, b_hi = _ci(raw.get("ba_ci"))
        row = {
            **base,
            "n_layers": n_layers,
            "layer": layer,
            "relative_depth": relative_depth(layer, n_layers),
            "raw_auroc": raw.get("auroc"),
            "raw_auroc_lo": a_lo,
            "raw_auroc_hi": a_hi,
            "raw_ba": raw.get("balanced_accuracy"),
            "raw_ba_lo": b_lo,
            "raw_ba_hi": b_hi,
            "raw_n": raw.get("n"),
            "raw_n_groups": raw.get("n_groups"),
            "recall_at_fpr": _recall(probes, layer),
            "ensemble_concat_auroc": concat.get("auroc"),
            "ensemble_concat_auroc_lo": c_lo,
            "ensemble_concat_auroc_hi": c_hi,
            "ensemble_mean_auroc": mean.get("auroc"),
        }
        saes = [r for r in _rows_of(probes, "sae", layer) if r.get("auroc") is not None]
        if saes:
            best = max(saes, key=lambda r: r["auroc"])
            cmp = best.get("vs_raw") or {}
            d_lo, d_hi = _ci(cmp.get("ba_difference_ci"))
            rand = next(
                (r for r in _rows_of(probes, "random_sae", layer) if r.get("sae_id") == best["sae_id"]), {}
            )
            m = metrics.get(best["sae_id"], {})
            act, lm = m.get("activations", {}), m.get("lm", {})
            row.update(
                best_sae=best["sae_id"],
                sae_architecture=best.get("architecture"),
                sae_auroc=best["auroc"],
                sae_ba=best.get("balanced_accuracy"),
                sae_minus_raw_ba=cmp.get("ba_difference"),
                sae_minus_raw_ba_lo=d_lo,
                sae_minus_raw_ba_hi=d_hi,
                sae_minus_raw_auroc=cmp.get("auroc_difference"),
                sae_vs_raw_p=cmp.get("p_value"),
                random_sae_auroc=rand.get("auroc"),
                random_sae_ba=rand.get("balanced_accuracy"),
                sae_explained_variance=act.get("explained_variance"),
                sae_l0=act.get("l0"),
                sae_ce_loss_score=lm.get("ce_loss_score", lm.get("loss_recovered")),
            )
        row.update(_max_feature(run_dir, [r["sae_id"] for r in _rows_of(probes, "sae", layer)]))
        out.append(row)
    return out


def sae_differences(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every SAE-vs-raw paired test of the sweep (model, layer, SAE, architecture, BA difference and CI,
    p), with `p_holm_sweep`: Holm over all of them (each run's own Holm covers its own tests only)."""
    tests = []
    for key, entry in sweep.get("models", {}).items():
        run_dir = Path(entry.get("run_dir", ""))
        if entry.get("status") != "done" or not (run_dir / "probes.json").exists():
            continue
        n_layers = model_record(run_dir, required=False).get("n_layers")
        for r in _rows_of(read_probes(run_dir), "sae"):
            cmp = r.get("vs_raw") or {}
            if cmp.get("p_value") is None:
                continue
            lo, hi = _ci(cmp.get("ba_difference_ci"))
            tests.append(
                {
                    "model": key,
                    "layer": r["layer"],
                    "relative_depth": relative_depth(r["layer"], n_layers),
                    "sae_id": r["sae_id"],
                    "architecture": r.get("architecture"),
                    "condition": r.get("condition"),
                    "ba_difference": cmp.get("ba_difference"),
                    "ba_difference_lo": lo,
                    "ba_difference_hi": hi,
                    "p_value": cmp["p_value"],
                }
            )
    for t, adj in zip(tests, holm([t["p_value"] for t in tests]), strict=True):
        t["p_holm_sweep"] = float(adj)
    return tests


def comparison_table(
    sweep: dict[str, Any], plan: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """All rows of the sweep in `COLUMNS` order; `plan` ({key: plan row}) gives parameter counts."""
    tests = {(t["model"], t["sae_id"]): t["p_holm_sweep"] for t in sae_differences(sweep)}
    rows = []
    for key, entry in sweep.get("models", {}).items():
        model = (
            model_record(entry["run_dir"], required=False) if Path(entry.get("run_dir", "")).is_dir() else {}
        )
        n_params = model.get("n_params") or (plan or {}).get(key, {}).get("n_params")
        for row in model_rows(key, entry, n_params):
            if row.get("best_sae"):
                row["sae_vs_raw_p_holm_sweep"] = tests.get((key, row["best_sae"]))
            rows.append({c: row.get(c) for c in COLUMNS})
    return rows


def write_comparison(
    sweep_dir: Path, rows: list[dict[str, Any]], tests: list[dict[str, Any]]
) -> dict[str, Path]:
    """`comparison.csv`, `comparison.json` (rows and every SAE-vs-raw test) in the sweep folder."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return {
        "csv": atomic_write_bytes(Path(sweep_dir) / f"{TABLE}.csv", buf.getvalue().encode()),
        "json": atomic_write_json(
            Path(sweep_dir) / f"{TABLE}.json", {"rows": rows, "sae_vs_raw_tests": tests}
        ),
    }


def peak_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finished model's layer with the highest raw AUROC."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("raw_auroc") is not None and (
            r["model"] not in best or r["raw_auroc"] > best[r["model"]]["raw_auroc"]
        ):
            best[r["model"]] = r
    return list(best.values())


def scale_trend(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least squares of peak raw AUROC on log10(parameters): slope (AUROC per 10× parameters) with its 95%
    t interval, and the fitted line with its 95% confidence band on a grid; no interval below 3 models."""
    pts = [(math.log10(r["n_params"]), r["raw_auroc"]) for r in peak_rows(rows) if r.get("n_params")]
    out: dict[str, Any] = {"n_models": len(pts), "points": pts}
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return {**out, "why": "a trend needs at least two models of different sizes"}
    x, y = np.array(pts).T
    n, xm = len(x), x.mean()
    sxx = ((x - xm) ** 2).sum()
    slope = float(((x - xm) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * xm)
    grid = np.linspace(x.min(), x.max(), 25)
    out.update(slope=slope, intercept=intercept, grid=grid.tolist(), fit=(intercept + slope * grid).tolist())
    if n < 3:
        return {**out, "why": "no interval from 2 models (a line fits any 2 points)"}
    resid = y - (intercept + slope * x)
    s = math.sqrt((resid**2).sum() / (n - 2))
    t = float(sps.t.ppf(0.975, n - 2))
    half = t * s * np.sqrt(1 / n + (grid - xm) ** 2 / sxx)
    se = s / math.sqrt(sxx)
    out.update(
        slope_ci=[slope - t * se, slope + t * se],
        band_lo=(out["fit"] - half).tolist(),
        band_hi=(np.array(out["fit"]) + half).tolist(),
    )
    return out


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def _value_and_ci(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Each row's `key` as an array (None as NaN) and plotly's asymmetric error bars from its `key`_lo and
    `key`_hi."""
    y, lo, hi = (
        np.array([np.nan if r[k] is None else r[k] for r in rows], float)
        for k in (key, f"{key}_lo", f"{key}_hi")
    )
    return y, {"type": "data", "symmetric": False, "array": hi - y, "arrayminus": y - lo}


def depth_figure(rows: list[dict[str, Any]]) -> Any:
    """Raw-probe AUROC (with its CI) against relative depth, one line per model."""
    go = _go()
    fig = go.Figure()
    for model in dict.fromkeys(r["model"] for r in rows if r.get("raw_auroc") is not None):
        pts = sorted(
            (r for r in rows if r["model"] == model and r.get("raw_auroc") is not None),
            key=lambda r: r["relative_depth"],
        )
        y, error_y = _value_and_ci(pts, "raw_auroc")
        fig.add_trace(
            go.Scatter(
                x=[r["relative_depth"] for r in pts],
                y=y,
                name=model,
                mode="lines+markers",
                error_y=error_y,
            )
        )
    fig.update_layout(
        title="Deception signal vs depth (raw-activation probe, 95% CI)",
        xaxis_title="relative depth (layer + 1) / n_layers",
        yaxis_title="AUROC",
    )
    return fig


def sae_minus_raw_figure(tests: list[dict[str, Any]]) -> Any:
    """Each SAE's balanced-accuracy difference to the raw probe at its layer (95% CI), per model, one colour
    per architecture; below 0 the SAE's features lose signal."""
    go = _go()
    fig = go.Figure()
    for arch in dict.fromkeys(t["architecture"] for t in tests):
        ts = [t for t in tests if t["architecture"] == arch]
        y, error_y = _value_and_ci(ts, "ba_difference")
        # One marker per SAE with its CI, architectures side by side within a model (scattermode "group");
        # plain scatter traces, so plots.show can draw the static copy too.
        fig.add_trace(
            go.Scatter(
                x=[t["model"] for t in ts],
                y=y,
                mode="markers",
                name=arch,
                marker={"size": 9},
                hovertext=[f"{t['sae_id']} p_holm={t['p_holm_sweep']:.3g}" for t in ts],
                error_y=error_y,
            )
        )
    fig.add_hline(y=0, line_dash="dot")
    fig.update_layout(
        scattermode="group",
        title="SAE probe minus raw probe (balanced accuracy), per model and architecture",
        yaxis_title="BA difference (SAE − raw)",
    )
    return fig


def scale_figure(trend: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    """Peak raw AUROC per model against parameter count (log axis), the fitted trend and its 95% band."""
    go = _go()
    fig = go.Figure()
    peaks = [r for r in peak_rows(rows) if r.get("n_params")]
    fig.add_trace(
        go.Scatter(
            x=[r["n_params"] for r in peaks],
            y=[r["raw_auroc"] for r in peaks],
            mode="markers+text",
            text=[r["model"] for r in peaks],
            textposition="top center",
            name="peak layer",
        )
    )
    title = "Peak raw-probe AUROC vs parameters"
    if "fit" in trend:
        xs = [10**g for g in trend["grid"]]
        fig.add_trace(go.Scatter(x=xs, y=trend["fit"], mode="lines", name="least squares in log10(params)"))
        if "band_lo" in trend:
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=trend["band_hi"] + trend["band_lo"][::-1],
                    fill="toself",
                    line={"width": 0},
                    opacity=0.2,
                    name="95% band",
                )
            )
            lo, hi = trend["slope_ci"]
            title += f": {trend['slope']:+.3f} AUROC per 10× [{lo:+.3f}, {hi:+.3f}]"
        else:
            title += f": {trend['slope']:+.3f} AUROC per 10× ({trend['why']})"
    else:
        title += f" ({trend['why']})"
    fig.update_layout(title=title, xaxis_type="log", xaxis_title="parameters", yaxis_title="AUROC")
    return fig


def _f(v: Any, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


SUMMARY_COLUMNS = (
    "model",
    "params",
    "peak layer (depth)",
    "raw AUROC [95% CI]",
    "raw BA",
    "recall @ FPR",
    "best SAE − raw BA [CI] (p Holm, sweep)",
    "random SAE AUROC",
    "ensemble AUROC",
    "max feature d",
)
"""The summary table's columns: one row per model, at its peak layer."""


def _table_row(cells: Any) -> str:
    return "| " + " | ".join(f"{cell}" for cell in cells) + " |"


def summary_markdown(sweep: dict[str, Any], rows: list[dict[str, Any]], trend: dict[str, Any]) -> str:
    """The sweep in a few lines and one table per model's peak layer, ready to paste."""
    study = sweep.get("study", {})
    lines = [
        f"## Deception probes across models: sweep `{sweep.get('name')}`",
        "",
        f"Study: datasets {', '.join(d.get('name') or d['data'] for d in study.get('datasets', []))}; "
        f"{study.get('n_per_prompt')} completions per prompt, {study.get('max_new_tokens')} new "
        f"tokens; relative depths {study.get('depths')}; SAEs "
        f"{', '.join(study.get('architectures', []))} × {', '.join(study.get('conditions', []))}, "
        f"expansion {study.get('expansion')}, L0 {study.get('l0')}, {study.get('train_tokens'):,} "
        f"training tokens; {study.get('n_folds')}-fold grouped CV, {study.get('n_bootstrap')} "
        f"bootstrap refits, recall at {study.get('control_fpr')} FPR on the control set.",
        "",
        _table_row(SUMMARY_COLUMNS),
        "|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    for r in peak_rows(rows):
        params = params_text(r.get("n_params"))
        sae = (
            f"{_f(r['sae_minus_raw_ba'], '+.3f')} [{_f(r['sae_minus_raw_ba_lo'], '+.3f')}, "
            f"{_f(r['sae_minus_raw_ba_hi'], '+.3f')}] (p {_f(r['sae_vs_raw_p_holm_sweep'], '.2g')})"
            if r.get("best_sae")
            else "no SAE"
        )
        raw_auroc = f"{_f(r['raw_auroc'])} [{_f(r['raw_auroc_lo'])}, {_f(r['raw_auroc_hi'])}]"
        cells = (
            r["model"],
            params,
            f"{r['layer']} ({r['relative_depth']:.0%})",
            raw_auroc,
            _f(r["raw_ba"]),
            r.get("recall_at_fpr") or "–",
            sae,
            _f(r.get("random_sae_auroc")),
            _f(r.get("ensemble_concat_auroc")),
            _f(r.get("max_feature_d"), ".2f"),
        )
        lines.append(_table_row(cells))
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        lines.append(f"\n- {r['model']} ({r['spec']}): {r['status']}: {r['error']}")
    if "slope" in trend:
        ci = (
            f" [{trend['slope_ci'][0]:+.3f}, {trend['slope_ci'][1]:+.3f}]"
            if "slope_ci" in trend
            else f" ({trend['why']})"
        )
        lines.append(
            f"\nPeak AUROC vs size: {trend['slope']:+.3f} AUROC per 10× parameters{ci}, "
            f"{trend['n_models']} models (Nordby, Pais, Parrack 2026 report about +0.05)."
        )
    return "\n".join(lines) + "\n"


def compare(
    sweep_dir: Path, sweep: dict[str, Any], plan: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Write the table (CSV, JSON), the three figures (`sweep_dir/figures/`) and `summary.md`; return them."""
    sweep_dir = Path(sweep_dir)
    rows, tests = comparison_table(sweep, plan), sae_differences(sweep)
    paths = write_comparison(sweep_dir, rows, tests)
    trend = scale_trend(rows)
    atomic_write_json(sweep_dir / "scale_trend.json", trend)
    figures = {
        "depth": depth_figure(rows),
        "sae_minus_raw": sae_minus_raw_figure(tests),
        "scale": scale_figure(trend, rows),
    }
    for name, fig in figures.items():
        paths[name] = save_figure(fig, sweep_dir, f"sweep_{name}")
    text = summary_markdown(sweep, rows, trend)
    paths["summary"] = atomic_write_bytes(sweep_dir / "summary.md", text.encode())
    return {"rows": rows, "tests": tests, "trend": trend, "figures": figures, "summary": text, "paths": paths}
