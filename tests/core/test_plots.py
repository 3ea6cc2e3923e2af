"""Figures drawn from a small run folder built here in the shapes notebooks 03-05 write."""

from __future__ import annotations

import json
import re

import nbformat
import numpy as np
import pytest
from matplotlib.collections import LineCollection, PathCollection

from helpers import plots
from helpers.steer.pipeline import read_steering

EDGES = [x / 4 for x in range(-28, 1)]


def probe_row(layer, kind, ba, auroc, **extra):
    return {
        "layer": layer,
        "kind": kind,
        "name": f"{kind} L{layer}",
        "balanced_accuracy": ba,
        "ba_ci": [ba - 0.05, ba + 0.04],
        "auroc": auroc,
        "auroc_ci": None if auroc is None else [auroc - 0.06, auroc + 0.03],
        "p_value": 0.01,
        "n": 40,
        "unused_extra_key": {"a": 1},
        **extra,
    }


def steering_row(name, kind, strength, rate, lo, hi, feature=None):
    return {
        "name": name,
        "kind": kind,
        "layer": 3,
        "strength": strength,
        "feature": feature,
        "sae_id": "m_topk_L3_mixed",
        "stats": {"deceptive_rate": rate, "rate_ci": [lo, hi], "n": 8},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    rows = [probe_row(layer, "raw", 0.70 + 0.01 * layer, 0.75) for layer in (3, 6)]
    rows += [probe_row(layer, "bag_of_words", 0.55, 0.56, vs_raw={}) for layer in (3, 6)]
    for arch, ba in (("topk", 0.66), ("jumprelu", 0.68)):
        rows += [
            probe_row(layer, "sae", ba, 0.7, sae_id=f"m_{arch}_L{layer}_mixed", architecture=arch)
            for layer in (3, 6)
        ]
    rows.append(probe_row(6, "sae", 0.61, None, sae_id="m_topk_L6_deceptive_only", architecture="topk"))
    (root / "probes.json").write_text(json.dumps({"pooling": "mean", "rows": rows}))
    for i, (arch, cond) in enumerate((("topk", "mixed"), ("jumprelu", "mixed"), ("topk", "honest_only"))):
        sid = f"m_{arch}_L3_{cond}"
        counts = [0] * 28
        counts[20 + i] = 30
        metrics = {
            "sae_id": sid,
            "architecture": arch,
            "layer": 3,
            "condition": cond,
            "activations": {
                "explained_variance": 0.7 + 0.05 * i,
                "l0": 16.0 + 8 * i,
                "dead_fraction": 0.1,
                "dense_fraction": 0.0,
                "mse": 0.1,
                "firing_histogram": {"log10_edges": EDGES, "counts": counts, "never": 2 + i},
            },
        }
        (root / "saes" / sid).mkdir(parents=True)
        (root / "saes" / sid / "metrics.json").write_text(json.dumps(metrics))
    feats = [
        {
            "feature": f,
            "rank": r + 1,
            "cohens_d": d,
            "d_ci": [d - 0.3, d + 0.2],
            "q_value": q,
            "mean_honest": 0.1,
            "mean_deceptive": 0.4,
            "explanation": e,
            "other": [1, 2],
        }
        for r, (f, d, q, e) in enumerate(
            [(11, 1.2, 0.001, "says <lie>"), (7, -0.8, 0.2, None), (3, 0.1, 0.9, None)]
        )
    ]
    (root / "features").mkdir()
    (root / "features" / "m_topk_L3_mixed.jsonl").write_text("".join(json.dumps(f) + "\n" for f in feats))
    steer = [steering_row("none", "none", 0.0, 0.3, 0.2, 0.4)]
    for s, rate in ((-4.0, 0.1), (4.0, 0.6)):
        steer.append(steering_row(f"f {s}", "feature", s, rate, rate - 0.1, rate + 0.1, feature=11))
        steer += [
            steering_row(f"rd{k} {s}", "random_direction", s, 0.3 + 0.02 * k, 0.2 + k * 0.05, 0.4 + k * 0.05)
            for k in range(2)
        ]
    (root / "steering.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steer))
    return root


def test_probe_figure_has_one_line_per_source_with_cis(run):
    fig = plots.probe_figure(run)
    ba = {t.name: t for t in fig.data if t.xaxis == "x"}
    assert set(ba) == {"raw", "bag of words", "topk (mixed)", "jumprelu (mixed)", "topk (deceptive_only)"}
    np.testing.assert_allclose(ba["raw"].x, [3, 6])
    np.testing.assert_allclose(ba["raw"].y, [0.73, 0.76])
    np.testing.assert_allclose(ba["raw"].error_y.array, [0.04, 0.04])
    np.testing.assert_allclose(ba["raw"].error_y.arrayminus, [0.05, 0.05])
    auroc = {t.name: t for t in fig.data if t.xaxis == "x2"}
    assert (
        np.isnan(auroc["topk (deceptive_only)"].y[0]) and auroc["topk (deceptive_only)"].error_y.array[0] != 1
    )
    mpl = plots.probe_figure(run, backend="matplotlib")
    assert [len(ax.containers) for ax in mpl.axes] == [5, 5]


def test_leaderboard_and_firing_density(run):
    fig = plots.leaderboard_figure(run)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"topk / mixed", "jumprelu / mixed", "topk / honest_only"}
    assert by_name["jumprelu / mixed"].x == (24.0,) and by_name["jumprelu / mixed"].y == (0.75,)
    assert by_name["topk / mixed"].marker.color == by_name["topk / honest_only"].marker.color
    assert by_name["topk / mixed"].marker.symbol != by_name["topk / honest_only"].marker.symbol
    assert len(plots.leaderboard_figure(run, backend="matplotlib").axes[0].collections) == 3
    dens = plots.firing_density_figure(run)
    bars = {t.name.split(" ")[0]: t for t in dens.data}
    assert len(bars) == 3 and bars["m_jumprelu_L3_mixed"].name.endswith("(3 never fire)")
    topk = bars["m_topk_L3_mixed"]
    assert topk.x[int(np.argmax(topk.y))] == pytest.approx((EDGES[20] + EDGES[21]) / 2)
    assert len(plots.firing_density_figure(run, sae_ids=["m_topk_L3_mixed"]).data) == 1


def test_feature_effects_sorted_with_cis_and_explanations(run):
    fig = plots.feature_effects_figure(run, "m_topk_L3_mixed", top=2)
    (t,) = fig.data
    assert list(t.y) == ["#7: not explained", "#11: says <lie>"]  # largest |d| on top (last)
    np.testing.assert_allclose(t.x, [-0.8, 1.2])
    np.testing.assert_allclose(t.error_x.arrayminus, [0.3, 0.3])
    assert list(t.marker.symbol) == ["circle-open", "circle"]  # filled only where q < 0.05


def test_steering_dose_response(run):
    lines = plots.steering_lines(read_steering(run))
    assert lines["feature m_topk_L3_mixed/11"] == [(-4.0, 0.1, 0.0, 0.2), (4.0, 0.6, 0.5, 0.7)]
    # two random directions per strength: mean rate, CI = envelope of theirs
    assert lines["random direction"][0] == pytest.approx((-4.0, 0.31, 0.2, 0.45))
    fig = plots.steering_figure(run)
    assert [t.name for t in fig.data] == ["feature m_topk_L3_mixed/11", "random direction"]
    assert any(getattr(s, "y0", None) == 0.2 for s in fig.layout.shapes), "no-steering CI band missing"
    mpl = plots.steering_figure(run, backend="matplotlib")
    assert len(mpl.axes[0].containers) == 2


def test_steering_figure_draws_an_interval_a_rounding_error_past_its_rate():
    # A rate of 0 whose stored Wilson interval starts at 5.6e-17 (as steering.jsonl rows of the demo held)
    # stopped notebook 05's save_all: matplotlib refuses negative error-bar lengths.
    rows = [
        steering_row(f"f {s}", "feature", s, 0.0, 5.551115123125783e-17, 0.86, feature=3) for s in (-1.0, 1.0)
    ]
    mpl = plots.steering_figure(rows, backend="matplotlib")
    assert len(mpl.axes[0].containers) == 1
    np.testing.assert_allclose(
        plots.error_bars([0.0, 0.5], [1e-17, np.nan], [0.8, 0.6]), [[0, 0], [0.8, 0.1]]
    )


def test_save_figure_and_save_all(run):
    html_path = plots.save_figure(plots.probe_figure(run), run, "probes_test")
    assert html_path == run / "figures" / "probes_test.html" and "plotly" in html_path.read_text()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in html_path.read_text()
    png = plots.save_figure(plots.probe_figure(run, backend="matplotlib"), run, "probes_test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = plots.save_all(run)
    assert set(saved) == {
        "probes",
        "sae_leaderboard",
        "firing_density",
        "steering",
        "features_m_topk_L3_mixed",
    }
    assert {p.suffix for p in saved["steering"]} == {".html", ".png"}
    plus = plots.save_figure(plots.probe_figure(run), run, "features_m_topk_L3_corpus+behaviour")
    assert plus.name == "features_m_topk_L3_corpus+behaviour.html", "the corpus+behaviour condition's SAE ids"
    with pytest.raises(ValueError, match="plain file name"):
        plots.save_figure(plots.probe_figure(run), run, "../escape")
    with pytest.raises(ValueError, match="backend"):
        plots.probe_figure(run, backend="svg")


def test_missing_inputs_name_the_notebook(tmp_path, capsys):
    for make, where in (
        (plots.probe_figure, "notebook 04"),
        (plots.leaderboard_figure, "notebook 03"),
        (plots.firing_density_figure, "notebook 03"),
        (plots.steering_figure, "notebook 05"),
        (lambda rd: plots.feature_effects_figure(rd, "x"), "notebook 04"),
    ):
        with pytest.raises(plots.MissingInput, match=where):
            make(tmp_path)
    assert plots.save_all(tmp_path) == {}
    assert capsys.readouterr().out.count("skipped") == 6


def test_transfer_and_layer_sweep_figures(tmp_path):
    m = {"train": ["facts", "scenes"], "eval": ["facts", "scenes"], "auroc": [[0.95, 0.7], [None, 0.9]]}
    t = {"eval_set": "scenes", "auroc": 0.7, "auroc_ci": [0.6, 0.8]}
    sweep = {
        "rows": [
            {
                "layer": k,
                "relative_depth": k / 4,
                "cv_auroc": 0.6 + k / 20,
                "cv_auroc_ci": [0.5, 0.9],
                "transfer": [t],
            }
            for k in range(5)
        ],
        "peak": {"layer": 4, "relative_depth": 1.0},
    }
    (tmp_path / "probes.json").write_text(
        json.dumps({"rows": [], "transfer_matrix": {"3": m}, "layer_sweep": sweep})
    )
    fig = plots.transfer_figure(tmp_path)
    heat = fig.data[0]
    assert list(heat.y) == ["facts", "scenes"] and np.isnan(heat.z[1][0]) and heat.text[1][0] == "-"
    assert len(plots.transfer_figure(tmp_path, backend="matplotlib").axes[0].images) == 1
    fig = plots.layer_sweep_figure(tmp_path)
    assert [d.name for d in fig.data] == ["CV within train sets", "on scenes"]
    assert (
        list(fig.data[0].x) == [0, 0.25, 0.5, 0.75, 1.0] and "peak at layer 4 (100%)" in fig.layout.title.text
    )
    assert len(plots.layer_sweep_figure(tmp_path, backend="matplotlib").axes[0].containers) == 2


def test_token_heatmap_and_html():
    # the activations come from helpers.analysis.contexts.feature_activation_over_text (tested there)
    fig = plots.token_heatmap(["a", "<b>", "c"], [0.0, 2.0, 1.0], width=2)
    assert [list(r) for r in fig.data[0].z] == [[0.0, 2.0], [1.0, None]] and list(fig.data[0].text[0]) == [
        "a",
        "<b>",
    ]
    page = plots.token_html(["a", "<b>"], [0.0, 2.0])
    assert "&lt;b&gt;" in page and "rgba(220,40,40,1.00)" in page and "rgba(220,40,40,0.00)" in page
    with pytest.raises(ValueError, match="one per token"):
        plots.token_heatmap(["a"], [1.0, 2.0])


def test_saved_figures_open_offline_with_plotly_js_beside_them(run):
    from plotly.offline import get_plotlyjs

    first = plots.save_figure(plots.steering_figure(run), run, "offline_a")
    js = run / "figures" / "plotly.min.js"
    assert js.read_bytes() == get_plotlyjs().encode()
    written = js.stat().st_mtime_ns
    second = plots.save_figure(plots.probe_figure(run), run, "offline_b")
    assert js.stat().st_mtime_ns == written, "the bundle is written once per run folder, not per figure"
    for path in (first, second):
        page = path.read_text()
        assert path.stat().st_size < 100_000, "the library is not inlined in every figure"
        assert not re.findall(r"(?:src|href)=[\"']?(?:https?:)?//", page), "no network reference"
        assert re.findall(r"<script[^>]*src=\"([^\"]+)\"", page) == ["plotly.min.js"]
    js.write_bytes(b"// an older plotly")
    plots.save_figure(plots.probe_figure(run), run, "offline_b")
    assert js.read_bytes() == get_plotlyjs().encode(), "a different bundle is replaced by the installed one"


def test_saved_figure_draws_in_a_headless_browser_with_no_network(run):
    from tests.explore.test_site import _browser

    path = plots.save_figure(plots.steering_figure(run), run, "offline_browser")
    browser = _browser()
    try:
        # any http(s) request fails, as on Drive offline or an unzipped folder without internet
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*"]})
        browser.get(path.as_uri())
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 20).until(
            lambda b: b.execute_script(
                "return document.querySelectorAll('.plotly .scatterlayer .trace').length"
            )
        )
        assert browser.execute_script("return typeof Plotly") == "object"
        scripts = browser.execute_script(
            "return Array.from(document.scripts).filter(s => s.src).map(s => s.src)"
        )
        assert scripts == [(path.parent / "plotly.min.js").as_uri()]
        # every trace of the figure drawn (2 lines; the no-steering band is a shape)
        assert browser.execute_script("return document.querySelectorAll('.scatterlayer .trace').length") == 2
        # a request the page tried to make over the network would be blocked and logged as an error here
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()


def test_static_figure_draws_the_plotly_traces(run):
    fig = plots.probe_figure(run)
    static = plots.static_figure(fig)
    panels = [ax for ax in static.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 2 and [ax.get_title() or "" for ax in panels] == ["", ""]
    assert {t.get_text() for t in static.texts} >= {"balanced accuracy", "AUROC"}
    assert static._suptitle.get_text() == fig.layout.title.text
    for col, ax in enumerate(panels):
        traces = [t for t in fig.data if (t.xaxis or "x") == ("x" if col == 0 else "x2")]
        drawn = [
            np.nan_to_num(line.get_ydata(), nan=-1).round(6).tolist()
            for line in ax.lines
            if line.get_linestyle() == "-"
        ]
        assert drawn == [np.nan_to_num(np.asarray(t.y, float), nan=-1).round(6).tolist() for t in traces]
        # the error bars are the CIs: a vertical segment from lo to hi at each point
        segments = [
            g for c in ax.collections if isinstance(c, LineCollection) for g in c.get_segments() if len(g)
        ]
        got = {(g[0][0], round(g[0][1], 6), round(g[1][1], 6)) for g in segments}
        for t in traces:
            e = t.error_y
            for x, y, minus, plus in zip(t.x, t.y, e.arrayminus, e.array, strict=True):
                if np.isnan(y):  # a row without this metric: no point, no bar
                    continue
                assert (x, round(y - minus, 6), round(y + plus, 6)) in got
        assert any(line.get_linestyle() == ":" and line.get_ydata()[0] == 0.5 for line in ax.lines), (
            "chance line"
        )
    legend = [t.get_text() for t in static.legends[0].get_texts()]
    assert legend == list(plots.probe_series(run)), "one legend entry per line, not per panel"

    effects = plots.static_figure(plots.feature_effects_figure(run, "m_topk_L3_mixed"))
    (ax,) = effects.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "#3: not explained",
        "#7: not explained",
        "#11: says <lie>",
    ]
    markers = {
        len(c.get_offsets()): len(c.get_facecolors()) for c in ax.collections if isinstance(c, PathCollection)
    }
    assert markers == {1: 1, 2: 0}, "the q < 0.05 feature filled, the other two open (no fill)"

    steering = plots.static_figure(plots.steering_figure(run))
    (ax,) = steering.axes
    assert any(p.get_alpha() == 0.2 for p in ax.patches), "the no-steering band"
    assert "no steering" in [t.get_text() for t in ax.texts]
    heat = plots.static_figure(plots.token_heatmap(["a", "<b>", "c"], [0.0, 2.0, 1.0], width=2))
    image = heat.axes[0].images[0].get_array()
    assert image.shape == (2, 2) and image[0, 1] == 2.0 and image.mask[1, 1]
    assert [t.get_text() for t in heat.axes[0].texts] == ["a", "<b>", "c", ""]
    density = plots.static_figure(plots.firing_density_figure(run))
    assert len(density.axes[0].patches) == 3 * 28 and len(density.legends[0].get_texts()) == 3
    import plotly.graph_objects as go

    with pytest.raises(ValueError, match=r"scatter, bar and heatmap.*\['pie'\]"):
        plots.static_figure(go.Figure(go.Pie(values=[1, 2])))
    assert plots.png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_in_a_notebook_gives_an_interactive_figure_and_a_png(run, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            f"from helpers import plots\nplots.show(plots.steering_figure({str(run)!r}))"
        ),
        nbformat.v4.new_code_cell(
            "import plotly.graph_objects as go\nplots.show(go.Figure(go.Pie(values=[1, 2])))\n"
            f"plots.show(plots.steering_figure({str(run)!r}, backend='matplotlib'))\nplots.show('x')"
        ),
    ]
    with pytest.raises(Exception, match="plotly or matplotlib figure, got str"):
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    first, second = ([o for o in c.outputs if o.output_type == "display_data"] for c in nb.cells)
    assert len(first) == 2 and "image/png" not in first[0].data and "image/png" in first[1].data
    assert "application/vnd.plotly.v1+json" in first[0].data or "text/html" in first[0].data
    pie, mpl = second
    assert "image/png" not in pie.data and list(mpl.data) == ["image/png", "text/plain"]
    said = "".join(o.get("text", "") for o in nb.cells[1].outputs if o.output_type == "stream")
    assert "(no static copy of this figure: static_figure draws scatter, bar and heatmap traces" in said
