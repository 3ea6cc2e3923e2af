"""Figures of a run (notebook 05): interactive plotly figures saved as .html under `figures/`, and
matplotlib twins (`backend="matplotlib"`, saved as .png) of the key ones, with no kaleido needed.

Readable anywhere: a saved .html loads plotly.js from `figures/plotly.min.js` beside it (written once
per run folder: 4.8 MB with plotly 7.1) instead of a CDN, so it opens on Drive offline and in a zip;
inlining the library would cost those 4.8 MB in every figure file. In a notebook, `show(fig)` displays
the interactive figure and under it a static PNG drawn by matplotlib from the figure's own traces
(`static_figure`), which GitHub shows where plotly's JavaScript never runs (Colab has no kaleido).

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
PLOTLY_JS = "plotly.min.js"  # in figures/, beside the .html files that load it
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
    """Write a plotly figure as `figures/{name}.html` (plotly.js from `figures/plotly.min.js`, written
    beside it once: no network needed to open it) or a matplotlib figure as `figures/{name}.png`,
    atomically; returns the path."""
    if not re.fullmatch(r"[\w.+\-]+", name):  # '+': SAE ids of the corpus+behaviour condition
        raise ValueError(f"figure name {name!r} must be a plain file name (letters, digits, _ . + -)")
    folder = figures_dir(run_dir)
    if hasattr(fig, "to_html"):
        _write_plotly_js(folder)
        html_text = fig.to_html(include_plotlyjs=PLOTLY_JS)  # a relative <script src>: the file beside it
        return atomic_write_bytes(folder / f"{name}.html", html_text.encode())
    if hasattr(fig, "savefig"):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
        return atomic_write_bytes(folder / f"{name}.png", buf.getvalue())
    raise TypeError(f"save_figure takes a plotly or matplotlib figure, got {type(fig).__name__}")


def _write_plotly_js(folder: Path) -> Path:
    """`folder/plotly.min.js`: the installed plotly's bundle, written when missing or different."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs().encode()
    path = folder / PLOTLY_JS
    if not path.exists() or path.stat().st_size != len(js) or path.read_bytes() != js:
        atomic_write_bytes(path, js)
    return path


# --- static images of plotly figures (for notebooks read where no JavaScript runs) ------------------
MPL_SYMBOLS = {"circle": "o", "square": "s", "diamond": "D", "triangle-up": "^", "x": "x", "cross": "P"}
DASHES = {"dot": ":", "dash": "--", "dashdot": "-.", "longdash": "--", "solid": "-", None: "-"}


def _color(c: Any, default: str = "#444") -> Any:
    """A plotly colour ('#rrggbb', a name, 'rgb(r,g,b)', 'rgba(r,g,b,a)') as matplotlib takes it."""
    if c is None:
        return default
    m = re.fullmatch(r"rgba?\(([^)]*)\)", str(c).replace(" ", ""))
    if not m:
        return c
    v = [float(x) for x in m.group(1).split(",")]
    return (v[0] / 255, v[1] / 255, v[2] / 255, v[3] if len(v) > 3 else 1.0)


def _values(v: Any) -> list[Any]:
    return [] if v is None else list(np.asarray(v, dtype=object).tolist()) if not isinstance(v, list) else v


def error_bars(y: Any, lo: Any, hi: Any) -> np.ndarray:
    """matplotlib's [2, n] error-bar lengths (below, above) of estimates y with intervals [lo, hi]: a
    missing end draws no bar, and an end a rounding error past its estimate (an interval stored by an
    older release) draws none instead of failing ('yerr must not contain negative values')."""
    y, lo, hi = (np.asarray(v, dtype=float) for v in (y, lo, hi))
    below, above = np.where(np.isnan(lo), 0.0, y - lo), np.where(np.isnan(hi), 0.0, hi - y)
    return np.clip(np.nan_to_num(np.vstack([below, above])), 0.0, None)


def _err(e: dict[str, Any] | None, n: int) -> np.ndarray | None:
    """plotly's error_x / error_y (type "data") as matplotlib's [2, n] (minus, plus) or None."""
    if not e or e.get("visible") is False or e.get("array") is None:
        return None
    plus = np.array([_num(v) for v in _values(e["array"])], float)
    minus = plus if e.get("symmetric", True) is not False and e.get("arrayminus") is None else None
    minus = np.array([_num(v) for v in _values(e.get("arrayminus"))], float) if minus is None else minus
    return np.clip(np.nan_to_num(np.vstack([minus, plus])[:, :n]), 0.0, None)


class _Axis:
    """Positions of one plotly axis: numbers as they are, categories (strings) at 0, 1, 2, ..."""

    def __init__(self, order: Sequence[Any] | None = None) -> None:
        self.categories: list[str] = [str(c) for c in order or ()]  # the layout's categoryarray, if any

    def __call__(self, values: list[Any]) -> np.ndarray:
        if any(isinstance(v, str) for v in values):
            for v in values:
                if str(v) not in self.categories:
                    self.categories.append(str(v))
            return np.array([self.categories.index(str(v)) for v in values], float)
        return np.array([_num(v) for v in values], float)


def static_figure(fig: Any) -> Any:
    """A matplotlib Figure drawn from a plotly figure's traces and layout: scatter (lines, markers,
    error bars, open/closed symbols), bar and heatmap (with cell text) traces on their subplots, the
    hline/vline/hrect shapes, annotations, titles and axis titles: what `plots.py` makes. Another trace
    type is a ValueError naming it (a static copy that silently dropped a trace would mislead)."""
    from matplotlib import transforms
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    # the objects' own JSON (numpy arrays kept; to_dict base64-encodes them in plotly >= 6)
    data, layout = [t.to_plotly_json() for t in fig.data], fig.layout.to_plotly_json()
    unknown = sorted({t.get("type", "scatter") for t in data} - {"scatter", "bar", "heatmap"})
    if unknown:
        raise ValueError(f"static_figure draws scatter, bar and heatmap traces; this figure has {unknown}")
    out = Figure(figsize=(layout.get("width", 900) / 100, layout.get("height", 450) / 100))
    box = (0.08, 0.14, 0.70, 0.72)  # left, bottom, width, height of the plotting area (legend at the right)
    names = sorted(
        {(t.get("xaxis", "x"), t.get("yaxis", "y")) for t in data} | {("x", "y")},
        key=lambda p: (len(p[0]), p[0]),
    )
    names = [
        p
        for p in names
        if p != ("x", "y") or any(t.get("xaxis", "x") == "x" for t in data) or len(names) == 1
    ]
    axes, scales = {}, {}
    for xa, ya in names:
        xl, yl = layout.get("xaxis" + xa[1:], {}), layout.get("yaxis" + ya[1:], {})
        (x0, x1), (y0, y1) = xl.get("domain", (0, 1)), yl.get("domain", (0, 1))
        ax = out.add_axes(
            (box[0] + x0 * box[2], box[1] + y0 * box[3], (x1 - x0) * box[2] * 0.94, (y1 - y0) * box[3])
        )
        ax.set_xlabel((xl.get("title") or {}).get("text") or "", fontsize=9)
        ax.set_ylabel((yl.get("title") or {}).get("text") or "", fontsize=9)
        ax.tick_params(labelsize=8)
        axes[xa], axes[ya] = ax, ax
        scales[ax] = (_Axis(xl.get("categoryarray")), _Axis(yl.get("categoryarray")), xl, yl)
    legend: list[tuple[Any, str]] = []
    for i, t in enumerate(data):
        ax = axes[t.get("xaxis", "x")]
        sx, sy = scales[ax][:2]
        line_color, marker_color = (t.get("line") or {}).get("color"), (t.get("marker") or {}).get("color")
        per_point = isinstance(marker_color, list)
        color = _color(None if per_point else line_color or marker_color, PALETTE[i % 8])
        kind = t.get("type", "scatter")
        if kind == "heatmap":
            z = np.array([[_num(v) for v in row] for row in t["z"]], float)
            scale = t.get("colorscale") or [[0, "#440154"], [1, "#fde725"]]
            if isinstance(scale, str):
                import plotly.colors

                scale = plotly.colors.get_colorscale(scale)
            cmap = LinearSegmentedColormap.from_list("plotly", [(float(p), _color(c)) for p, c in scale])
            im = ax.imshow(
                z, cmap=cmap, vmin=t.get("zmin"), vmax=t.get("zmax"), aspect="auto", origin="lower"
            )
            xs, ys = _values(t.get("x")), _values(t.get("y"))
            if xs:
                ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30, ha="right")
            if ys:
                ax.set_yticks(range(len(ys)), [str(v) for v in ys])
            if t.get("text") is not None and t.get("texttemplate"):
                for r, row in enumerate(t["text"]):
                    for c, txt in enumerate(row):
                        ax.text(c, r, str(txt), ha="center", va="center", fontsize=7)
            if t.get("showscale", True) is not False:
                out.colorbar(im, ax=ax, fraction=0.05)
            continue
        if kind == "bar":
            x, y = sx(_values(t.get("x"))), sy(_values(t.get("y")))
            bars = ax.bar(x, y, width=t.get("width") or 0.8, color=color, alpha=t.get("opacity", 1.0))
            legend.append((bars, t.get("name") or ""))
            continue
        x, y = sx(_values(t.get("x"))), sy(_values(t.get("y")))
        mode = t.get("mode") or ("lines+markers" if len(x) < 20 else "lines")
        xerr, yerr = _err(t.get("error_x"), len(x)), _err(t.get("error_y"), len(y))
        line = ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=color, capsize=3, lw=1)
        if "lines" in mode:
            line = ax.plot(x, y, color=color, ls=DASHES.get((t.get("line") or {}).get("dash"), "-"))[0]
        if "markers" in mode:
            symbols = (t.get("marker") or {}).get("symbol") or "circle"
            symbols = symbols if isinstance(symbols, list) else [symbols] * len(x)
            for sym in dict.fromkeys(symbols):
                k = np.array([s == sym for s in symbols])
                base = str(sym).replace("-open", "")
                line = ax.scatter(
                    x[k],
                    y[k],
                    marker=MPL_SYMBOLS.get(base, "o"),
                    s=30,
                    edgecolors=color,
                    facecolors="none" if str(sym).endswith("-open") else color,
                )
        if t.get("showlegend", True) is not False and t.get("name"):
            legend.append((line, t["name"]))
    for ax, (sx, sy, xl, yl) in scales.items():
        for s, setter in ((sx, ax.set_xticks), (sy, ax.set_yticks)):
            if s.categories:
                setter(
                    range(len(s.categories)),
                    [c if len(c) <= 60 else f"{c[:24]}…{c[-35:]}" for c in s.categories],
                    fontsize=7,
                )
        if yl.get("range"):
            ax.set_ylim(*yl["range"])
        if yl.get("autorange") == "reversed":
            ax.invert_yaxis()
        for al, hide in ((xl, ax.set_xticks), (yl, ax.set_yticks)):
            if al.get("showticklabels") is False:
                hide([])

    def ref_axes(ref: str) -> Any:
        return axes.get(str(ref).split()[0], axes.get("x"))

    for sh in layout.get("shapes", []):
        ax = ref_axes(
            sh.get("xref", "x") if str(sh.get("xref", "x")).startswith("x") else sh.get("yref", "y")
        )
        style = {
            "color": _color((sh.get("line") or {}).get("color"), "grey"),
            "lw": 1,
            "ls": DASHES.get((sh.get("line") or {}).get("dash"), "-"),
        }
        x_dom, y_dom = "domain" in str(sh.get("xref")), "domain" in str(sh.get("yref"))
        if sh.get("type") == "rect" and x_dom:
            ax.axhspan(
                sh["y0"],
                sh["y1"],
                sh["x0"],
                sh["x1"],
                color=_color(sh.get("fillcolor"), "grey"),
                alpha=sh.get("opacity", 0.2),
                lw=0,
            )
        elif sh.get("type") == "line" and x_dom and sh["y0"] == sh["y1"]:
            ax.axhline(sh["y0"], sh["x0"], sh["x1"], **style)
        elif sh.get("type") == "line" and y_dom and sh["x0"] == sh["x1"]:
            ax.axvline(sh["x0"], sh["y0"], sh["y1"], **style)
        else:
            ax.plot([sh["x0"], sh["x1"]], [sh["y0"], sh["y1"]], **style)
    for a in layout.get("annotations", []):
        if a.get("xref") == "paper" and a.get("yref") == "paper":
            out.text(
                box[0] + a["x"] * box[2],
                box[1] + a["y"] * box[3] + 0.01,
                a.get("text", ""),
                ha="center",
                va="bottom",
                fontsize=9,
            )
            continue
        ax = ref_axes(a.get("xref", "x"))
        tx = ax.transAxes if "domain" in str(a.get("xref")) else ax.transData
        ty = ax.transAxes if "domain" in str(a.get("yref")) else ax.transData
        ax.text(
            a["x"],
            a["y"],
            a.get("text", ""),
            transform=transforms.blended_transform_factory(tx, ty),
            ha=a.get("xanchor", "center").replace("auto", "center"),
            va="bottom",
            fontsize=8,
        )
    title = (layout.get("title") or {}).get("text")
    if title:
        out.suptitle(title, fontsize=10)
    if legend:
        out.legend(
            [h for h, _ in legend], [n for _, n in legend], loc="center right", fontsize=7, frameon=False
        )
    return out


def png_bytes(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib figure (or a plotly one, through `static_figure`) as PNG bytes."""
    buf = io.BytesIO()
    (fig if hasattr(fig, "savefig") else static_figure(fig)).savefig(
        buf, format="png", dpi=dpi, bbox_inches="tight"
    )
    return buf.getvalue()


def show(fig: Any) -> None:
    """Show a figure in a notebook so that it reads anywhere: a plotly figure interactive and, under
    it, as a static PNG (`static_figure`; GitHub and other viewers without plotly's JavaScript show
    only that); a matplotlib figure as its PNG. Use it instead of `fig.show()`. A plotly trace type that
    `static_figure` does not draw gets the interactive figure only, and a line saying so."""
    from IPython.display import Image, display

    if hasattr(fig, "savefig"):
        display(Image(data=png_bytes(fig, dpi=150)))
    elif hasattr(fig, "to_dict"):
        display(fig)
        try:
            png = png_bytes(fig)
        except ValueError as err:  # a trace type static_figure does not draw: said, not hidden
            print(f"(no static copy of this figure: {err})")
            return
        display(Image(data=png))
    else:
        raise TypeError(f"plots.show takes a plotly or matplotlib figure, got {type(fig).__name__}")


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
                ax.errorbar(
                    x, y, yerr=error_bars(y, lo, hi), marker=MPL_MARKERS[i % 6], capsize=3, label=name
                )
            ax.axhline(0.5, color="grey", ls=":", lw=1)
            ax.set(xlabel="layer", ylabel=title, title=f"{title} by layer")
        axes[0].legend(fontsize=8)
        return fig
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[p[2] for p in panels])
    for col, (key, ci, _) in enumerate(panels, 1):
        for i, (name, pts) in enumerate(series.items()):
            x, y, lo, hi = _xy_ci(pts, key, ci)
            fig.add_scatter(
                x=x,
                y=y,
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=col == 1,
                line_color=PALETTE[i % 8],
                error_y=dict(type="data", symmetric=False, array=hi - y, arrayminus=y - lo),
                row=1,
                col=col,
            )
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
        fig.add_heatmap(
            z=z,
            x=m["eval"],
            y=m["train"],
            zmin=0.5,
            zmax=1.0,
            colorscale="Viridis",
            text=text,
            texttemplate="%{text}",
            showscale=col == 1,
            row=1,
            col=col,
        )
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
            ax.errorbar(
                x[: len(y)], y, yerr=error_bars(y, lo, hi), marker=MPL_MARKERS[i % 6], capsize=3, label=name
            )
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set(xlabel=xlabel, ylabel="AUROC", title=title)
        ax.legend(fontsize=8)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, pts) in enumerate(lines.items()):
        y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
        fig.add_scatter(
            x=x[: len(y)],
            y=y,
            mode="lines+markers",
            name=name,
            line_color=PALETTE[i % 8],
            error_y=dict(
                type="data",
                symmetric=False,
                array=np.where(np.isnan(hi), y, hi) - y,
                arrayminus=y - np.where(np.isnan(lo), y, lo),
            ),
        )
    fig.add_hline(y=0.5, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title="AUROC")
    return fig


# --- SAEs -----------------------------------------------------------------------------------------
def _leaderboard(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """architecture, condition, sae_id, L0 and explained variance of every SAE with a metrics.json."""
    rows = [
        {
            "sae_id": m["sae_id"],
            "architecture": m["architecture"],
            "condition": m["condition"],
            "l0": (m.get("activations") or {}).get("l0"),
            "explained_variance": (m.get("activations") or {}).get("explained_variance"),
            "loss_recovered": (m.get("lm") or {}).get("loss_recovered"),
        }
        for m in read_sae_metrics(run_dir)
    ]
    if not rows:
        raise MissingInput(f"{saes_dir(run_dir)} holds no metrics.json: run {SOURCES['saes']} first")
    return rows


def leaderboard_figure(run_dir: str | os.PathLike, *, backend: str = "plotly") -> Any:
    """Explained variance against L0, one point per SAE: colour = architecture, marker = condition."""
    rows = _leaderboard(run_dir)
    archs = sorted({r["architecture"] for r in rows})
    conds = sorted({str(r["condition"]) for r in rows})
    groups = [
        (a, c)
        for a in archs
        for c in conds
        if any(r["architecture"] == a and str(r["condition"]) == c for r in rows)
    ]
    if _is_mpl(backend):
        fig, (ax,) = _mpl(1, 7.0)
        for a, c in groups:
            pts = [r for r in rows if r["architecture"] == a and str(r["condition"]) == c]
            ax.scatter(
                [r["l0"] for r in pts],
                [_num(r["explained_variance"]) for r in pts],
                label=f"{a} / {c}",
                color=PALETTE[archs.index(a) % 8],
                marker=MPL_MARKERS[conds.index(c) % 6],
            )
        ax.set(xlabel="L0 (active latents per token)", ylabel="explained variance", title="SAE leaderboard")
        ax.legend(fontsize=8)
        return fig
    import plotly.graph_objects as go

    fig = go.Figure()
    for a, c in groups:
        pts = [r for r in rows if r["architecture"] == a and str(r["condition"]) == c]
        fig.add_scatter(
            x=[r["l0"] for r in pts],
            y=[r["explained_variance"] for r in pts],
            mode="markers",
            name=f"{a} / {c}",
            text=[r["sae_id"] for r in pts],
            marker=dict(size=11, color=PALETTE[archs.index(a) % 8], symbol=SYMBOLS[conds.index(c) % 6]),
            hovertemplate="%{text}<br>L0 %{x:.1f}<br>EV %{y:.3f}<extra></extra>",
        )
    fig.update_layout(
        title="SAE leaderboard: reconstruction vs sparsity",
        xaxis_title="L0 (active latents per token)",
        yaxis_title="explained variance",
        legend_title="architecture / condition",
    )
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
                ax.plot(
                    [r["l0"] for r in pts],
                    [_num(r[key]) for r in pts],
                    marker=MPL_MARKERS[i % 6],
                    label=name,
                    color=PALETTE[i % 8],
                )
            ax.set(xlabel="L0 (active latents per token)", ylabel=title, title=f"{title} vs L0")
        axes[0].legend(fontsize=8)
        return fig
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[p[1] for p in panels])
    for col, (key, _) in enumerate(panels, 1):
        for i, (name, pts) in enumerate(groups.items()):
            fig.add_scatter(
                x=[r["l0"] for r in pts],
                y=[r[key] for r in pts],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=col == 1,
                line_color=PALETTE[i % 8],
                text=[r["sae_id"] for r in pts],
                row=1,
                col=col,
                hovertemplate="%{text}<br>L0 %{x:.1f}<br>%{y:.3f}<extra></extra>",
            )
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
        fig.add_bar(
            x=(edges[1:] + edges[:-1]) / 2,
            y=hist["counts"],
            name=f"{sid} ({hist.get('never', 0)} never fire)",
            width=float(np.diff(edges).mean()),
            opacity=0.6,
        )
    if not fig.data:
        raise MissingInput(
            f"no metrics.json with a firing histogram under {Path(run_dir) / 'saes'}: run {SOURCES['saes']}"
        )
    fig.update_layout(
        barmode="overlay",
        title="Latent firing density",
        xaxis_title="log10 firing frequency (per token)",
        yaxis_title="latents",
    )
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
    fig = go.Figure(
        go.Scatter(
            x=d,
            y=labels,
            mode="markers",
            error_x=dict(type="data", symmetric=False, array=ci[:, 1] - d, arrayminus=d - ci[:, 0]),
            marker=dict(size=9, color=PALETTE[1], symbol=["circle" if s else "circle-open" for s in sig]),
            customdata=[[r.get("q_value"), r.get("mean_honest"), r.get("mean_deceptive")] for r in rows],
            hovertemplate="%{y}<br>d %{x:.2f}<br>q %{customdata[0]:.3g}<br>mean honest %{customdata[1]:.3g}"
            "<br>mean deceptive %{customdata[2]:.3g}<extra></extra>",
        )
    )
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.update_layout(
        title=f"{sae_id}: top features by effect size (95% CI; filled: q < 0.05)",
        xaxis_title="Cohen's d (deceptive - honest)",
        height=max(300, 28 * len(rows) + 120),
    )
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
    fig = go.Figure(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            colorscale="Reds",
            zmin=0,
            hovertemplate="%{text}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, height=120 + 40 * n_rows)
    return fig


def token_html(tokens: Sequence[str], activations: Sequence[float]) -> str:
    """The text as HTML with each token's background as red as its activation (hover shows the value);
    show it with IPython.display.HTML."""
    top = max([a for a in activations if a > 0], default=1.0)
    spans = [
        f'<span title="{a:.3f}" style="background: rgba(220,40,40,{max(a, 0) / top:.2f})">'
        f"{html.escape(t)}</span>"
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
        name: [
            (
                s,
                float(np.mean([st["deceptive_rate"] for st in g])),
                min(_num(st["rate_ci"][0]) for st in g),
                max(_num(st["rate_ci"][1]) for st in g),
            )
            for s, g in sorted(by_s.items())
        ]
        for name, by_s in points.items()
    }


def steering_figure(run_dir_or_rows: Any, *, backend: str = "plotly") -> Any:
    """Deceptive rate against steering strength (units of the layer's typical residual norm), with 95%
    CIs, one line per feature and per control kind; no steering is the grey band."""
    rows = (
        run_dir_or_rows if isinstance(run_dir_or_rows, list) else read_jsonl(steering_path(run_dir_or_rows))
    )
    if not rows:
        raise MissingInput(
            "no steering rows "
            f"({run_dir_or_rows if not isinstance(run_dir_or_rows, list) else 'empty list'}): "
            f"run {SOURCES['steering.jsonl']} first"
        )
    lines = steering_lines(rows)
    none = lines.pop("none", None)
    xlabel, title = "steering strength (x typical residual norm)", "Steering dose-response (95% CI)"
    if _is_mpl(backend):
        fig, (ax,) = _mpl(1, 7.0)
        for i, (name, pts) in enumerate(lines.items()):
            s, y, lo, hi = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(s, y, yerr=error_bars(y, lo, hi), marker=MPL_MARKERS[i % 6], capsize=3, label=name)
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
        fig.add_scatter(
            x=s,
            y=y,
            mode="lines+markers",
            name=name,
            line_color=PALETTE[i % 8],
            error_y=dict(type="data", symmetric=False, array=hi - y, arrayminus=y - lo),
        )
    if none:
        fig.add_hrect(y0=none[0][2], y1=none[0][3], fillcolor="grey", opacity=0.2, line_width=0)
        fig.add_hline(y=none[0][1], line_dash="dash", line_color="grey", annotation_text="no steering")
    fig.update_layout(
        title=title, xaxis_title=xlabel, yaxis_title="deceptive rate", yaxis_range=[-0.02, 1.02]
    )
    return fig


def control_comparison_figure(results: Sequence[dict[str, Any]], *, alpha: float = 0.05) -> Any:
    """Each steered condition against each control (`steer.compare_to_controls`' results): the difference
    in deceptive rate in points with its 95% CI, one marker colour per control, filled where q < alpha.
    Zero is no effect; a bar across zero is a null at this sample size."""
    import plotly.graph_objects as go

    if not results:
        raise MissingInput(
            f"no comparisons to draw: run {SOURCES['steering.jsonl']} with feature conditions first"
        )
    conditions = list(dict.fromkeys(o["condition"] for o in results))
    fig = go.Figure()
    for i, control in enumerate(dict.fromkeys(o["control"] for o in results)):
        rows = [o for o in results if o["control"] == control]
        d = np.array([100 * o["difference"] for o in rows])
        lo, hi = (np.array([100 * o["difference_ci"][k] for o in rows]) for k in (0, 1))
        fig.add_scatter(
            x=d,
            y=[o["condition"] for o in rows],
            mode="markers",
            name=f"vs {control.replace('_', ' ')}",
            marker=dict(
                size=9,
                color=PALETTE[i % 8],
                symbol=["circle" if o["q_value"] < alpha else "circle-open" for o in rows],
            ),
            error_x=dict(type="data", symmetric=False, array=hi - d, arrayminus=d - lo),
            customdata=[[o["q_value"]] for o in rows],
            hovertemplate="%{y}<br>%{x:+.0f} points<br>q %{customdata[0]:.2g}<extra></extra>",
        )
    fig.add_vline(x=0, line_dash="dot", line_color="grey")
    fig.update_yaxes(categoryorder="array", categoryarray=conditions[::-1])
    fig.update_layout(
        title=f"Steering vs controls: difference in deceptive rate (95% CI; filled: q < {alpha})",
        xaxis_title="difference in deceptive rate (points)",
        height=max(300, 30 * len(conditions) + 140),
    )
    return fig


def save_all(run_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """Draw and save every figure whose inputs exist (key ones also as .png); print what is missing."""
    makers: dict[str, Any] = {
        "probes": probe_figure,
        "transfer": transfer_figure,
        "layer_sweep": layer_sweep_figure,
        "sae_leaderboard": leaderboard_figure,
        "firing_density": firing_density_figure,
        "steering": steering_figure,
    }
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
