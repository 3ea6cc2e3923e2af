"""Figures of a run (notebook 05): interactive plotly figures saved as .html under `figures/`, and
matplotlib twins (`backend="matplotlib"`, saved as .png) of the key ones, with no kaleido needed.

Every function reads the run folder (DESIGN.md §3) and returns a figure; `save_figure` writes it.
A missing input raises `MissingInput`, which names the notebook that writes it. Error bars are the
95% intervals stored by the step that computed them (probes: cluster bootstrap; features: bootstrap
of Cohen's d over prompt groups; steering: bootstrap over prompts). `save_all` draws whatever the
run has so far and says what is missing.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from helpers.run import (
    atomic_write_bytes,
    features_path,
    figures_dir,
    probes_path,
    read_jsonl,
    read_sae_metrics,
    saes_dir,
    steering_path,
)

SOURCES = {
    "probes.json": "notebook 04 (probes and features)",
    "features": "notebook 04 (probes and features: feature_table)",
    "saes": "notebook 03 (train SAEs)",
    "steering.jsonl": "notebook 05 (run_steering_experiment)",
}
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross")
MPL_MARKERS = ("o", "s", "D", "^", "x", "P")
PALETTE = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")


class MissingInput(FileNotFoundError):
    """An input of a figure is not in the run folder yet; the message names the notebook writing it."""


def _need(path: Path, source: str) -> Path:
    if not path.exists():
        raise MissingInput(f"{path} is missing: run {SOURCES[source]} with this run folder first")
    return path


def _num(v: Any) -> float:
    return np.nan if v is None else float(v)


def save_figure(fig: Any, run_dir: str | os.PathLike, name: str) -> Path:
    """Write a plotly figure as `figures/{name}.html` (plotly.js from its CDN, so files stay small) or a
    matplotlib figure as `figures/{name}.png`, atomically; returns the path."""
    if not re.fullmatch(r"[\w.+\-]+", name):  # '+': SAE ids of the corpus+behaviour condition
        raise ValueError(f"figure name {name!r} must be a plain file name (letters, digits, _ . + -)")
    folder = figures_dir(run_dir)
    if hasattr(fig, "to_html"):
        return atomic_write_bytes(folder / f"{name}.html", fig.to_html(include_plotlyjs="cdn").encode())
    if hasattr(fig, "savefig"):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
        return atomic_write_bytes(folder / f"{name}.png", buf.getvalue())
    raise TypeError(f"save_figure takes a plotly or matplotlib figure, got {type(fig).__name__}")


def _is_mpl(backend: str) -> bool:
    if backend not in ("plotly", "matplotlib"):
        raise ValueError(
            f"backend must be 'plotly' (interactive, .html) or 'matplotlib' (.png), got {backend!r}"
        )
    return backend == "matplotlib"


def _mpl(n_cols: int = 1, width: float = 6.0) -> tuple[Any, Any]:
    # A bare Figure (no pyplot): no global state and nothing left open; Jupyter still displays it.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_cols, 4.0))
    return fig, fig.subplots(1, n_cols, squeeze=False)[0]


# --- probes ---------------------------------------------------------------------------------------
def probe_series(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """probes.json rows grouped into lines: "raw", "bag of words", and one per SAE architecture and
    training condition (e.g. "topk (mixed)"), each a list of (layer, row) sorted by layer."""
    data = json.loads(_need(probes_path(run_dir), "probes.json").read_text())
    series: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for r in data["rows"] if isinstance(data, dict) else data:
        if r.get("layer") is None or "why" in r:  # multi-layer ensembles; rows that have no number
            continue
        if r.get("kind") in ("sae", "random_sae"):
            m = re.search(r"_L\d+_(.+)$", str(r.get("sae_id", "")))
            name = f"{r.get('architecture') or 'sae'}" + (f" ({m.group(1)})" if m else "")
            name = f"random {name}" if r["kind"] == "random_sae" else name
        else:
            name = str(r.get("kind", "raw")).replace("_", " ")
        series[name].append((int(r["layer"]), r))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in series.items()}


def probe_figure(run_dir: str | os.PathLike, *, backend: str = "plotly") -> Any:
    """Balanced accuracy and AUROC of the probes against layer: raw activations vs each SAE
    architecture (and the bag-of-words control), with 95% CI error bars; chance is 0.5."""
    series = probe_series(run_dir)
    panels = (("balanced_accuracy", "ba_ci", "balanced accuracy"), ("auroc", "auroc_ci", "AUROC"))
    if _is_mpl(backend):
        fig, axes = _mpl(2)
        for ax, (key, ci, title) in zip(axes, panels, strict=True):
            for i, (name, pts) in enumerate(series.items()):
                x, y, lo, hi = _xy_ci(pts, key, ci)
                ax.errorbar(x, y, yerr=[y - lo, hi - y], marker=MPL_MARKERS[i % 6], capsize=3, label=name)
            ax.axhline(0.5, color="grey", ls=":", lw=1)
            ax.set(xlabel="layer", ylabel=title, title=f"{title} by layer")
        axes[0].legend(fontsize=8)
        return fig
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[p[2] for p in panels])
    for col, (key, ci, _) in enumerate(panels, 1):
        for i, (name, pts) in enumerate(series.items()):
            x, y, lo, hi = _xy_ci(pts, key, ci)
            fig.add_scatter(x=x, y=y, mode="lines+markers", name=name, legendgroup=name, showlegend=col == 1,
                            line_color=PALETTE[i % 8], error_y=dict(type="data", symmetric=False, array=hi - y,
                            arrayminus=y - lo), row=1, col=col)  # fmt: skip
        fig.add_hline(y=0.5, line_dash="dot", line_color="grey", row=1, col=col)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="Probes for deception: raw residual vs SAE features (95% CI)")
    return fig


def _xy_ci(pts: list, key: str, ci: str) -> tuple[np.ndarray, ...]:
    x, y = np.array([p[0] for p in pts]), np.array([_num(p[1].get(key)) for p in pts])
    lo, hi = np.array([[_num(v) for v in (p[1].get(ci) or (None, None))] for p in pts]).reshape(-1, 2).T
    return x, y, np.where(np.isnan(lo), y, lo), np.where(np.isnan(hi), y, hi)  # no CI: no bar


def _probes(run_dir: str | os.PathLike) -> dict[str, Any]:
    data = json.loads(_need(probes_path(run_dir), "probes.json").read_text())
    if not isinstance(data, dict):
        raise MissingInput("probes.json predates the detection protocol: rerun notebook 04")
    return data


def transfer_figure(run_dir: str | os.PathLike, *, backend: str = "plotly") -> Any:
    """The train x eval transfer matrix of the raw probe, one heatmap per layer: AUROC of a probe trained
    on the row's dataset and scored on the column's (diagonal: grouped CV within the dataset)."""
    matrices = _probes(run_dir).get("transfer_matrix") or {}
    matrices = {k: m for k, m in matrices.items() if len(m["train"]) > 1}
    if not matrices:
        raise MissingInput("no transfer matrix: the run needs two labelled datasets (notebook 02's DATASETS)")
    layers = sorted(matrices, key=int)

    def grid(m: dict[str, Any]) -> np.ndarray:
        return np.array([[_num(v) for v in row] for row in m["auroc"]])

    if _is_mpl(backend):
        fig, axes = _mpl(len(layers), width=4.5)
        for ax, layer in zip(axes, layers, strict=True):
            m = matrices[layer]
            ax.imshow(grid(m), vmin=0.5, vmax=1.0, cmap="viridis")
            ax.set_xticks(range(len(m["eval"])), m["eval"], rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(len(m["train"])), m["train"], fontsize=8)
            for i, row in enumerate(grid(m)):
                for j, v in enumerate(row):
                    ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w")
            ax.set(title=f"layer {layer}: AUROC", xlabel="evaluated on", ylabel="trained on")
        return fig
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(layers), subplot_titles=[f"layer {k}" for k in layers])
    for col, layer in enumerate(layers, 1):
        m = matrices[layer]
        z = grid(m)
        text = [["-" if np.isnan(v) else f"{v:.2f}" for v in row] for row in z]
        fig.add_heatmap(z=z, x=m["eval"], y=m["train"], zmin=0.5, zmax=1.0, colorscale="Viridis", text=text,
                        texttemplate="%{text}", showscale=col == 1, row=1, col=col)  # fmt: skip
    fig.update_xaxes(title_text="evaluated on")
    fig.update_yaxes(title_text="trained on", col=1)
    fig.update_layout(
        title="Transfer: raw probe AUROC, trained on one dataset, scored on another (diagonal: CV)"
    )
    return fig


def layer_sweep_figure(run_dir: str | os.PathLike, *, backend: str = "plotly") -> Any:
    """Signal against relative depth (layer / (n_layers - 1); the layer when unknown): the grouped-CV AUROC
    within the training sets and the AUROC on each evaluation set, with 95% CIs; the peak marked."""
    sweep = _probes(run_dir).get("layer_sweep") or {}
    rows = sweep.get("rows") or []
    if not rows:
        raise MissingInput("no layer sweep in probes.json: rerun notebook 04 with SWEEP = True")
    depth = all(r.get("relative_depth") is not None for r in rows)
    x = np.array([r["relative_depth"] if depth else r["layer"] for r in rows], float)
    lines: dict[str, list[tuple[float, float, float]]] = {"CV within train sets": []}
    for r in rows:
        lo, hi = r.get("cv_auroc_ci") or (None, None)
        lines["CV within train sets"].append((_num(r.get("cv_auroc")), _num(lo), _num(hi)))
        for t in r["transfer"]:
            lo, hi = t["auroc_ci"] or (None, None)
            lines.setdefault(f"on {t['eval_set']}", []).append((_num(t["auroc"]), _num(lo), _num(hi)))
    xlabel = "relative depth (layer / (n_layers - 1))" if depth else "layer"
    peak = sweep.get("peak") or {}
    title = "Deception signal by depth (raw probes, 95% CI)"
    if peak:
        title += f"; peak at layer {peak['layer']}" + (f" ({peak['relative_depth']:.0%})" if depth else "")
    if _is_mpl(backend):
        fig, (ax,) = _mpl(1, width=7)
        for i, (name, pts) in enumerate(lines.items()):
            y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(x[: len(y)], y, yerr=[y - np.where(np.isnan(lo), y, lo), np.where(np.isnan(hi), y, hi) - y],
                        marker=MPL_MARKERS[i % 6], capsize=3, label=name)  # fmt: skip
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set(xlabel=xlabel, ylabel="AUROC", title=title)
        ax.legend(fontsize=8)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, pts) in enumerate(lines.items()):
        y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
        fig.add_scatter(x=x[: len(y)], y=y, mode="lines+markers", name=name, line_color=PALETTE[i % 8],
                        error_y=dict(type="data", symmetric=False, array=np.where(np.isnan(hi), y, hi) - y,
                        arrayminus=y - np.where(np.isnan(lo), y, lo)))  # fmt: skip
    fig.add_hline(y=0.5, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title="AUROC")
    return fig


# --- SAEs -----------------------------------------------------------------------------------------
def _leaderboard(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """architecture, condition, sae_id, L0 and explained variance of every SAE with a metrics.json."""
    rows = [
        {"sae_id": m["sae_id"], "architecture": m["architecture"], "condition": m["condition"],
         "l0": (m.get("activations") or {}).get("l0"),
         "explained_variance": (m.get("activations") or {}).get("explained_variance"),
         "loss_recovered": (m.get("lm") or {}).get("loss_recovered")}
        for m in read_sae_metrics(run_dir)
    ]  # fmt: skip
    if not rows:
        raise MissingInput(f"{saes_dir(run_dir)} holds no metrics.json: run {SOURCES['saes']} first")
    return rows


def leaderboard_figure(run_dir: str | os.PathLike, *, backend: str = "plotly") -> Any:
    """Explained variance against L0, one point per SAE: colour = architecture, marker = condition."""
    rows = _leaderboard(run_dir)
    archs = sorted({r["architecture"] for r in rows})
    conds = sorted({str(r["condition"]) for r in rows})
    groups = [(a, c) for a in archs for c in conds if any(r["architecture"] == a and str(r["condition"]) == c for r in rows)]  # fmt: skip
    if _is_mpl(backend):
        fig, (ax,) = _mpl(1, 7.0)
        for a, c in groups:
            pts = [r for r in rows if r["architecture"] == a and str(r["condition"]) == c]
            ax.scatter([r["l0"] for r in pts], [_num(r["explained_variance"]) for r in pts], label=f"{a} / {c}",
                       color=PALETTE[archs.index(a) % 8], marker=MPL_MARKERS[conds.index(c) % 6])  # fmt: skip
        ax.set(xlabel="L0 (active latents per token)", ylabel="explained variance", title="SAE leaderboard")
        ax.legend(fontsize=8)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    for a, c in groups:
        pts = [r for r in rows if r["architecture"] == a and str(r["condition"]) == c]
        fig.add_scatter(x=[r["l0"] for r in pts], y=[r["explained_variance"] for r in pts], mode="markers",
                        name=f"{a} / {c}", text=[r["sae_id"] for r in pts], marker=dict(size=11,
                        color=PALETTE[archs.index(a) % 8], symbol=SYMBOLS[conds.index(c) % 6]),
                        hovertemplate="%{text}<br>L0 %{x:.1f}<br>EV %{y:.3f}<extra></extra>")  # fmt: skip
    fig.update_layout(title="SAE leaderboard: reconstruction vs sparsity", xaxis_title="L0 (active latents per token)",
                      yaxis_title="explained variance", legend_title="architecture / condition")  # fmt: skip
    return fig


def sae_pareto_figure(run_dir: str | os.PathLike, *, backend: str = "plotly") -> Any:
    """The Pareto view of an L0 sweep: explained variance and the fraction of LM loss recovered (the CE
    score) against L0, one line per architecture / condition through its SAEs in order of L0. Up and to
    the left is better: compare lines at equal L0, never single points at different sparsities."""
    rows = _leaderboard(run_dir)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: _num(r["l0"])):
        groups[f"{r['architecture']} / {r['condition']}"].append(r)
    panels = (
        ("explained_variance", "explained variance (held out)"),
        ("loss_recovered", "LM loss recovered (CE score)"),
    )
    if _is_mpl(backend):
        fig, axes = _mpl(2)
        for ax, (key, title) in zip(axes, panels, strict=True):
            for i, (name, pts) in enumerate(groups.items()):
                ax.plot([r["l0"] for r in pts], [_num(r[key]) for r in pts], marker=MPL_MARKERS[i % 6], label=name,
                        color=PALETTE[i % 8])  # fmt: skip
            ax.set(xlabel="L0 (active latents per token)", ylabel=title, title=f"{title} vs L0")
        axes[0].legend(fontsize=8)
        return fig
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[p[1] for p in panels])
    for col, (key, _) in enumerate(panels, 1):
        for i, (name, pts) in enumerate(groups.items()):
            fig.add_scatter(x=[r["l0"] for r in pts], y=[r[key] for r in pts], mode="lines+markers", name=name,
                            legendgroup=name, showlegend=col == 1, line_color=PALETTE[i % 8],
                            text=[r["sae_id"] for r in pts], row=1, col=col,
                            hovertemplate="%{text}<br>L0 %{x:.1f}<br>%{y:.3f}<extra></extra>")  # fmt: skip
    fig.update_xaxes(title_text="L0 (active latents per token)")
    fig.update_layout(title="SAEs: reconstruction and LM loss against sparsity (up and left is better)")
    return fig


def firing_density_figure(run_dir: str | os.PathLike, sae_ids: Sequence[str] | None = None) -> Any:
    """Histogram of log10 firing frequency per latent (from each SAE's metrics.json); never-firing
    latents are counted in the legend. A bump near 0 (fires on every token) or many dead ones is a warning."""
    import plotly.graph_objects as go

    _need(saes_dir(run_dir), "saes")
    fig = go.Figure()
    for m in read_sae_metrics(run_dir):
        sid, hist = m["sae_id"], (m.get("activations") or {}).get("firing_histogram")
        if hist is None or (sae_ids is not None and sid not in sae_ids):
            continue
        edges = np.array(hist["log10_edges"], float)
        fig.add_bar(x=(edges[1:] + edges[:-1]) / 2, y=hist["counts"], name=f"{sid} ({hist.get('never', 0)} never fire)",
                    width=float(np.diff(edges).mean()), opacity=0.6)  # fmt: skip
    if not fig.data:
        raise MissingInput(
            f"no metrics.json with a firing histogram under {Path(run_dir) / 'saes'}: run {SOURCES['saes']}"
        )
    fig.update_layout(barmode="overlay", title="Latent firing density", xaxis_title="log10 firing frequency (per token)",
                      yaxis_title="latents")  # fmt: skip
    return fig


def feature_effects_figure(run_dir: str | os.PathLike, sae_id: str, *, top: int = 20) -> Any:
    """Cohen's d (deceptive minus honest, held-out split) of an SAE's top features with 95% CIs,
    labelled with their explanations when notebook 04 has them; filled = q < 0.05."""
    import plotly.graph_objects as go

    path = _need(features_path(run_dir, sae_id), "features")
    rows = read_jsonl(path)
    rows = sorted(rows, key=lambda r: -abs(_num(r.get("cohens_d")) if r.get("cohens_d") is not None else 0))[
        :top
    ]
    rows.reverse()  # largest at the top of a horizontal chart
    d = np.array([_num(r.get("cohens_d")) for r in rows])
    ci = np.array([[_num(x) for x in (r.get("d_ci") or [None, None])] for r in rows]).reshape(-1, 2)
    labels = [f"#{r['feature']}: {(r.get('explanation') or 'not explained')[:50]}" for r in rows]
    sig = [r.get("q_value") is not None and r["q_value"] < 0.05 for r in rows]
    fig = go.Figure(go.Scatter(
        x=d, y=labels, mode="markers", error_x=dict(type="data", symmetric=False, array=ci[:, 1] - d, arrayminus=d - ci[:, 0]),
        marker=dict(size=9, color=PALETTE[1], symbol=["circle" if s else "circle-open" for s in sig]),
        customdata=[[r.get("q_value"), r.get("mean_honest"), r.get("mean_deceptive")] for r in rows],
        hovertemplate="%{y}<br>d %{x:.2f}<br>q %{customdata[0]:.3g}<br>mean honest %{customdata[1]:.3g}"
                      "<br>mean deceptive %{customdata[2]:.3g}<extra></extra>"))  # fmt: skip
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=f"{sae_id}: top features by effect size (95% CI; filled: q < 0.05)",
                      xaxis_title="Cohen's d (deceptive - honest)", height=max(300, 28 * len(rows) + 120))  # fmt: skip
    return fig


# --- one feature over a text (activations from helpers.analysis.contexts.feature_activation_over_text) --
def token_heatmap(
    tokens: Sequence[str], activations: Sequence[float], *, width: int = 16, title: str = ""
) -> Any:
    """A plotly heatmap that reads like the text: `width` tokens per row, colour = activation."""
    import plotly.graph_objects as go

    if len(tokens) != len(activations):
        raise ValueError(f"{len(tokens)} tokens but {len(activations)} activations: pass one per token")
    n_rows = max(1, -(-len(tokens) // width))
    z = [[None] * width for _ in range(n_rows)]
    text = [[""] * width for _ in range(n_rows)]
    for i, (tok, a) in enumerate(zip(tokens, activations, strict=True)):
        z[i // width][i % width], text[i // width][i % width] = float(a), tok.replace("\n", "⏎")
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Reds", zmin=0,
                               hovertemplate="%{text}: %{z:.3f}<extra></extra>"))  # fmt: skip
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, height=120 + 40 * n_rows)
    return fig


def token_html(tokens: Sequence[str], activations: Sequence[float]) -> str:
    """The text as HTML with each token's background as red as its activation (hover shows the value);
    show it with IPython.display.HTML."""
    top = max([a for a in activations if a > 0], default=1.0)
    spans = [
        f'<span title="{a:.3f}" style="background: rgba(220,40,40,{max(a, 0) / top:.2f})">{html.escape(t)}</span>'
        for t, a in zip(tokens, activations, strict=True)
    ]
    return (
        f'<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.6">{"".join(spans)}</div>'
    )


# --- steering -------------------------------------------------------------------------------------
def steering_lines(rows: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float, float, float]]]:
    """Dose-response lines {name: [(strength, rate, lo, hi)]}: one per feature, one per control kind.
    Replicate controls at one strength (several random latents/directions) are averaged and their CI
    is the envelope of the replicates' CIs. The no-steering row is the line "none" at strength 0."""
    layers = {r["layer"] for r in rows if r["kind"] != "none"}
    points: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        name = (
            f"feature {r['sae_id']}/{r['feature']}" if r["kind"] == "feature" else r["kind"].replace("_", " ")
        )
        if len(layers) > 1 and r["kind"] != "none":
            name = f"L{r['layer']} {name}"
        points[name][float(r["strength"])].append(r["stats"])
    return {
        name: [(s, float(np.mean([st["deceptive_rate"] for st in g])), min(_num(st["rate_ci"][0]) for st in g),
                max(_num(st["rate_ci"][1]) for st in g)) for s, g in sorted(by_s.items())]
        for name, by_s in points.items()
    }  # fmt: skip


def steering_figure(run_dir_or_rows: Any, *, backend: str = "plotly") -> Any:
    """Deceptive rate against steering strength (units of the layer's typical residual norm), with 95%
    CIs, one line per feature and per control kind; no steering is the grey band."""
    rows = (
        run_dir_or_rows if isinstance(run_dir_or_rows, list) else read_jsonl(steering_path(run_dir_or_rows))
    )
    if not rows:
        raise MissingInput(f"no steering rows ({run_dir_or_rows if not isinstance(run_dir_or_rows, list) else 'empty list'}): "
                           f"run {SOURCES['steering.jsonl']} first")  # fmt: skip
    lines = steering_lines(rows)
    none = lines.pop("none", None)
    xlabel, title = "steering strength (x typical residual norm)", "Steering dose-response (95% CI)"
    if _is_mpl(backend):
        fig, (ax,) = _mpl(1, 7.0)
        for i, (name, pts) in enumerate(lines.items()):
            s, y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(s, y, yerr=[y - lo, hi - y], marker=MPL_MARKERS[i % 6], capsize=3, label=name)
        if none:
            ax.axhspan(none[0][2], none[0][3], color="grey", alpha=0.2)
            ax.axhline(none[0][1], color="grey", ls="--", label="no steering")
        ax.set(xlabel=xlabel, ylabel="deceptive rate", title=title, ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, pts) in enumerate(lines.items()):
        s, y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
        fig.add_scatter(x=s, y=y, mode="lines+markers", name=name, line_color=PALETTE[i % 8],
                        error_y=dict(type="data", symmetric=False, array=hi - y, arrayminus=y - lo))  # fmt: skip
    if none:
        fig.add_hrect(y0=none[0][2], y1=none[0][3], fillcolor="grey", opacity=0.2, line_width=0)
        fig.add_hline(y=none[0][1], line_dash="dash", line_color="grey", annotation_text="no steering")
    fig.update_layout(
        title=title, xaxis_title=xlabel, yaxis_title="deceptive rate", yaxis_range=[-0.02, 1.02]
    )
    return fig


def save_all(run_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """Draw and save every figure whose inputs exist (key ones also as .png); print what is missing."""
    makers: dict[str, Any] = {"probes": probe_figure, "transfer": transfer_figure, "layer_sweep": layer_sweep_figure,
                              "sae_leaderboard": leaderboard_figure, "firing_density": firing_density_figure,
                              "steering": steering_figure}  # fmt: skip
    for path in sorted(Path(run_dir).glob("features/*.jsonl")):
        makers[f"features_{path.stem}"] = lambda rd, sid=path.stem: feature_effects_figure(rd, sid)
    saved: dict[str, list[Path]] = {}
    for name, make in makers.items():
        try:
            saved[name] = [save_figure(make(run_dir), run_dir, name)]
            if name in ("probes", "transfer", "layer_sweep", "sae_leaderboard", "steering"):
                saved[name].append(save_figure(make(run_dir, backend="matplotlib"), run_dir, name))
        except MissingInput as err:
            print(f"{name}: skipped ({err})")
    return saved
