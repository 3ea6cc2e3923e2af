"""What notebook 06 shows, as HTML strings and display rows: the searchable feature table, a feature
page, the prompt analyser's per-token heatmap and the live-tracking table. Plain HTML (inline SVG for
the histogram, coloured spans for tokens), so it renders in a cell's output, in an ipywidgets 7 `HTML`
widget and inside widget callbacks in Colab, where plotly figures fail (REFERENCE.md "Colab").
The static explorer (static/index.html) draws the same records in the browser.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from helpers.explore.live import NO_FEATURE_FIRES, TokenStep
from helpers.explore.meter import DeceptionMeter
from helpers.plots import token_html
from helpers.tables import value_ci

SORTS = {
    "firing rate": "firing_rate",
    "|d| (notebook 04)": "cohens_d",
    "deceptive - honest rate": "rate_gap",
    "corpus rate": "rate_corpus",
    "max activation": "max_activation",
    "feature": "feature",
}
TABLE_COLUMNS = (
    "feature",
    "firing_rate",
    "rate_honest",
    "rate_deceptive",
    "rate_corpus",
    "cohens_d",
    "tag",
    "top_logit",
    "explanation",
)
"""The columns notebook 06 prints of `select_features` rows (`rate_corpus`: '-' without a corpus)."""
TAGS = (
    "all",
    "analysed",
    "deception",
    "unclear",
    "not deception",
    "top feature, not explained",
    "not analysed",
)


def select_features(
    table: dict[str, list[Any]],
    query: str = "",
    *,
    tag: str = "all",
    sort: str = "firing rate",
    hide_dead: bool = True,
    n: int = 20,
) -> list[dict[str, Any]]:
    """Rows of the feature table matching `query` (in the explanation or top logit token; "#12" or "12"
    finds feature 12) and `tag`, sorted by `sort` (a key of SORTS, largest first), the first `n`."""
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {list(SORTS)}, got {sort!r}")
    if tag not in TAGS:
        raise ValueError(f"tag must be one of {list(TAGS)}, got {tag!r}")
    q = query.strip().lower()
    fid = int(q.lstrip("#")) if q.lstrip("#").isdigit() else None
    rows = []
    for i, f in enumerate(table["feature"]):
        row = {k: v[i] for k, v in table.items()}
        if fid is not None:
            if f != fid:
                continue
        elif q and q not in f"{row.get('explanation') or ''} {row.get('top_logit') or ''}".lower():
            continue
        if hide_dead and fid is None and not row["firing_rate"] and not row.get("rate_corpus"):
            continue
        if (tag == "analysed" and row["tag"] == "not analysed") or (
            tag not in ("all", "analysed") and row["tag"] != tag
        ):
            continue
        row["rate_gap"] = (row["rate_deceptive"] or 0) - (row["rate_honest"] or 0)
        rows.append(row)
    key = SORTS[sort]

    def order(r: dict[str, Any]) -> tuple[bool, float]:
        v = r.get(key)
        v = abs(v) if key == "cohens_d" and v is not None else v
        return (v is None, -(v or 0) if key != "feature" else v)

    return sorted(rows, key=order)[:n]


def default_feature(table: dict[str, list[Any]]) -> int:
    """The feature to open first: notebook 04's top feature by held-out |d|, else the most frequent; feature
    0 when no feature ever fired (its page says so, and the SAE's notes say why), so Run all goes on."""
    analysed = [r for r in select_features(table, sort="|d| (notebook 04)", n=1) if r["cohens_d"] is not None]
    rows = analysed or select_features(table, sort="firing rate", n=1)
    return int(rows[0]["feature"]) if rows else 0


def _f(x: Any, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.3g}%"


def table_html(rows: Sequence[dict[str, Any]]) -> str:
    """An HTML table of `select_features` rows (a `corpus` column when the SAE's corpus was scanned)."""
    corpus = any("rate_corpus" in r for r in rows)
    head = [
        "feature",
        "fires",
        "honest",
        "deceptive",
        *(["corpus"] if corpus else []),
        "max act.",
        "d",
        "q",
        "tag",
        "top logit",
        "explanation",
    ]
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{c}</td>"
            for c in (
                f"#{r['feature']}",
                _pct(r["firing_rate"]),
                _pct(r["rate_honest"]),
                _pct(r["rate_deceptive"]),
                *([_pct(r.get("rate_corpus"))] if corpus else []),
                _f(r["max_activation"]),
                _f(r["cohens_d"], "+.2f"),
                _f(r["q_value"]),
                html.escape(r["tag"]),
                f"<code>{html.escape(repr(r.get('top_logit') or ''))}</code>",
                html.escape(r.get("explanation") or "–"),
            )
        )
        + "</tr>"
        for r in rows
    )
    ths = "".join(f"<th style='text-align:left'>{h}</th>" for h in head)
    return f"<table style='border-collapse:collapse; font-size:13px'><tr>{ths}</tr>{body}</table>"


def histogram_svg(hist: dict[str, Any], width: int = 360, height: int = 120, colour: str = "#d63027") -> str:
    """Bars of a page's histogram ({min, max, counts}: equal-width bins from min, 0 in data of an older
    release, to max)."""
    counts, top = hist["counts"], max(hist["counts"] + [1])
    n, left, bottom = len(counts), 30, 18
    bw = (width - left - 4) / max(n, 1)
    bars = "".join(
        f'<rect x="{left + i * bw:.1f}" y="{height - bottom - (height - bottom - 6) * c / top:.1f}" '
        f'width="{max(bw - 1, 1):.1f}" height="{(height - bottom - 6) * c / top:.1f}" '
        f'fill="{colour}" fill-opacity="0.75"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    low, high = _f(hist.get("min") or 0), _f(hist["max"])
    return (
        f'<svg width="{width}" height="{height}" style="font: 10px sans-serif">{bars}'
        f'<text x="{left}" y="{height - 4}">{low}</text>'
        f'<text x="{width - 4}" y="{height - 4}" text-anchor="end">{high}</text>'
        f'<text x="{left - 3}" y="10" text-anchor="end">{top}</text></svg>'
    )


def example_html(ex: dict[str, Any], scale: float) -> str:
    """A window: each token as red as its activation, the example token outlined; a corpus window
    (`sequence_id`) is labelled with its sequence and position."""
    spans = "".join(
        f'<span title="{a:.3g}" style="background: rgba(214,48,39,{min(1.0, max(a, 0) / (scale or 1)):.2f});'
        f'{"outline: 2px solid #222;" if i == ex["center"] else ""}">{html.escape(t)}</span>'
        for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"], strict=True))
    )
    where = (
        f"corpus {ex['sequence_id']} @{ex['position']}"
        if "sequence_id" in ex
        else str(ex.get("label") or "unlabelled")
    )
    meta = f"{_f(ex['activation'])} · {html.escape(where)}"
    return (
        f'<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.8">'
        f'<span style="color:#666; font-size: 11px">{meta} </span>{spans}</div>'
    )


def feature_html(page: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    """One feature's page (the static explorer's, condensed) as HTML."""
    a = page.get("analysis") or {}
    expl = html.escape(
        a.get("explanation")
        or a.get("explanation_source")
        or (
            "not explained"
            if page.get("analysis")
            else "not among notebook 04's top features: no explanation"
        )
    )
    stats = [
        ("fires on", f"{_pct(page['firing_rate'])} of completion tokens ({page['n_firing']})"),
        ("honest / deceptive", f"{_pct(page['rates']['honest'])} / {_pct(page['rates']['deceptive'])}"),
        ("mean when firing / max", f"{_f(page['mean_when_firing'])} / {_f(page['max_activation'])}"),
    ]
    corpus = page.get("corpus")
    if corpus:
        stats.append(
            (
                "reference corpus",
                f"{_pct(corpus['firing_rate'])} of {corpus['n_tokens']:,} corpus tokens "
                f"({corpus['n_firing']}), max {_f(corpus['max_activation'])}",
            )
        )
    if page.get("analysis"):
        stats += [
            ("Cohen's d, held out [95% CI]", value_ci(a.get("cohens_d"), a.get("d_ci"), "+.2f")),
            ("q · AUROC", f"{_f(a.get('q_value'))} · {_f(a.get('auroc'))}"),
        ]
        for m in ("detection", "fuzzing"):
            s = a.get(m)
            stats.append((m, "–" if not s else f"BA {s['balanced_accuracy']:.2f} · AUROC {s['auroc']:.2f}"))
    parts = [
        f"<h3>{html.escape(page['sae_id'])} · feature #{page['feature']} · {html.escape(page['tag'])}</h3>",
        f"<p>{expl}</p><table>"
        + "".join(f"<tr><td style='color:#666'>{k}</td><td>{v}</td></tr>" for k, v in stats)
        + "</table>",
    ]
    if page["n_firing"]:
        parts.append(
            "<b>activation histogram</b> (completion tokens, from the smallest nonzero activation)<br>"
            + histogram_svg(page["histogram"])
        )
    elif not (corpus or {}).get("n_firing"):
        parts.append(
            "<p style='color:#a60'>This feature never fired on the scanned tokens: no histogram, windows or "
            "co-activation; its decoder views (logit effects, similar features) still apply.</p>"
        )
    if corpus and corpus["n_firing"]:
        parts.append(
            "<br><b>reference corpus</b> (its own histogram)<br>" + histogram_svg(corpus["histogram"])
        )
    if page.get("logits"):
        pos = ", ".join(
            f"<code>{html.escape(repr(t))}</code> {v:+.2f}" for t, v in page["logits"]["positive"][:8]
        )
        neg = ", ".join(
            f"<code>{html.escape(repr(t))}</code> {v:+.2f}" for t, v in page["logits"]["negative"][:8]
        )
        parts.append(f"<p><b>logits raised</b>: {pos}<br><b>lowered</b>: {neg}</p>")
    if page.get("logit_histogram"):
        parts.append(
            "<b>logit weights over the vocabulary</b><br>"
            + histogram_svg(page["logit_histogram"], colour="#2952a3")
        )
    co = page.get("coactive")
    if co and co["neighbours"]:
        pairs = ", ".join(
            f"#{g} (Jaccard {j:.2g}, fires with it {100 * p:.0f}%)" for g, j, p in co["neighbours"]
        )
        parts.append(f"<p><b>co-activating features</b> (from {co['sample']} sampled firings): {pairs}</p>")
    sim = ", ".join(f"#{j} ({c:.2f})" for j, c in page["similar"])
    parts.append(f"<p><b>similar features (decoder cosine)</b>: {sim}</p>")
    for sid, pairs in (page.get("similar_other") or {}).items():
        parts.append(
            f"<p style='color:#666'>{html.escape(sid)}: "
            + ", ".join(f"#{j} ({c:.2f})" for j, c in pairs)
            + "</p>"
        )
    scale = page["max_activation"] or 1.0
    parts.append("<b>top activations</b> (one per completion; outlined: the example token)")
    parts += [example_html(ex, scale) for ex in page["top"]] or ["<p>none</p>"]
    for g in reversed(page["quantiles"]):
        count = f" · {g['count']} firings" if "count" in g else ""
        parts.append(
            f"<p style='color:#666; margin-bottom:0'>activations {_f(g['lo'])}–{_f(g['hi'])}{count}</p>"
        )
        parts += [example_html(ex, scale) for ex in g["examples"]]
    if corpus:
        parts.append("<p><b>Top activations in the reference corpus</b> (one per sequence)</p>")
        c_scale = corpus["max_activation"] or 1.0
        parts += [example_html(ex, c_scale) for ex in corpus["top"]] or [
            "<p>no text: the corpus was stored without token ids</p>"
            if corpus["n_firing"]
            else "<p>never fired on the corpus</p>"
        ]
    if info and info.get("notes"):
        parts.append("".join(f"<p style='color:#a60'>{html.escape(n)}</p>" for n in info["notes"]))
    return "<div>" + "".join(parts) + "</div>"


def analyser_html(
    tokens: Sequence[str], features: Sequence[int], acts: np.ndarray, labels: dict[int, str] | None = None
) -> str:
    """One line of the text per feature, each token as red as that feature's activation on it."""
    labels = labels or {}
    if len(tokens) and not len(features):
        return f"<p>{NO_FEATURE_FIRES}</p>"
    lines = []
    for j, f in enumerate(features):
        col = acts[:, j]
        head = f"#{f} (max {col.max():.3g})" + (f": {html.escape(labels[f][:80])}" if labels.get(f) else "")
        lines.append(
            f"<div style='color:#666; font-size:12px; margin-top:6px'>{head}</div>"
            + token_html(tokens, col.tolist())
        )
    return "".join(lines) or "<p>no tokens</p>"


def live_html(
    steps: Sequence[TokenStep], meter: DeceptionMeter | None = None, labels: dict[int, str] | None = None
) -> str:
    """The live-tracking table: per generated token, the features firing on it (strongest first) and the
    deception meter (this token alone, and the answer so far), with the meter's caveat under it."""
    labels = labels or {}
    rows = []
    for s in steps:
        feats = ", ".join(
            f"#{f} {a:.2g}" + (f" <i>{html.escape(labels[f][:40])}</i>" if labels.get(f) else "")
            for f, a in s.features
        )
        bar = (
            meter.bar_html(s.meter_running, s.meter)
            if meter is not None and s.meter_running is not None
            else ""
        )
        cells = (f"<code>{html.escape(repr(s.text))}</code>", s.n_firing, feats, bar)
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    columns = ("token", "firing", "top features (activation)", "deception meter: answer so far")
    head = "<tr>" + "".join(f"<th>{column}</th>" for column in columns) + "</tr>"
    text = "".join(s.text for s in steps)
    caveat = (
        f"<p style='color:#666; font-size:12px'>{html.escape(meter.caveat)}</p>" if meter is not None else ""
    )
    table = f"<table style='font-size:13px'>{head}{''.join(rows)}</table>"
    return f"<p><b>answer</b>: {html.escape(text)}</p>{table}{caveat}"


def show_live(
    steps: Any, meter: DeceptionMeter | None = None, labels: dict[int, str] | None = None
) -> list[TokenStep]:
    """Display the live-tracking table in the cell's output and update it as each step of `steps` (from
    `track_generation`) arrives; returns the steps. Works in Colab and Jupyter (a display handle)."""
    from IPython.display import HTML, display

    handle = display(HTML("<p>generating...</p>"), display_id=True)
    done: list[TokenStep] = []
    for step in steps:
        done.append(step)
        handle.update(HTML(live_html(done, meter, labels)))
    handle.update(HTML(live_html(done, meter, labels)))
    return done
