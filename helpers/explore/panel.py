"""The explorer panel of notebook 06: four tabs over the run's explorer data.

- **features**: search (explanation text, top logit token, or `#id`), deception-tag filter, sort (firing
  rate, |d|, deceptive minus honest rate, max activation), and a feature number to open;
- **feature page**: the page of one feature (views.feature_html), and steering it: the unsteered and
  the steered answer to a prompt with the same seed (steer.panel.generate_pair, additive, error kept);
- **prompt analyser**: per-token activations of chosen features (or the text's top ones) over a text
  you type, or over the model's own answer to it;
- **live tracking**: the model answers token by token; each token's firing features and the deception
  meter appear as they are generated (meter.py, with its calibration caveat).

ipywidgets 7 API only (Colab ships 7.x): Text, Textarea, Dropdown, Checkbox, BoundedIntText,
IntSlider, FloatSlider, Button, HTML, Tab (titles through `set_title`), HBox, VBox, Layout, with
`observe(..., names="value")` and `on_click`; output is HTML written into `HTML` widgets, never plotly
(it fails inside Colab callbacks). Building the panel reads only the explorer's table files; SAEs, the
meter and pages load on first use.
"""

from __future__ import annotations

import html
import os
from typing import Any

from helpers.explore.live import analyse_text, answer_acts, track_generation
from helpers.explore.meter import DeceptionMeter, fit_meter
from helpers.explore.site import COMPLETE, DATA, read_page, read_table, sae_info
from helpers.explore.views import (
    SORTS,
    TAGS,
    analyser_html,
    feature_html,
    live_html,
    select_features,
    table_html,
)
from helpers.run import explorer_dir, sae_dir
from helpers.saes.io import LoadedSAE, load_sae
from helpers.steer import directions as steering
from helpers.steer.panel import generate_pair


def explorer_sae_ids(run_dir: str | os.PathLike) -> list[str]:
    """SAEs whose explorer data are complete."""
    return sorted(p.parent.name for p in (explorer_dir(run_dir) / DATA).glob(f"*/{COMPLETE}"))


def _error(err: Exception) -> str:
    return f"<b style='color:#b00'>{type(err).__name__}</b>: {html.escape(str(err))}"


def parse_features(text: str) -> list[int] | None:
    """'12, 40 7' -> [12, 40, 7]; empty -> None (the top features); anything else is an error naming it."""
    parts = text.replace(",", " ").split()
    bad = [p for p in parts if not p.lstrip("#").isdigit()]
    if bad:
        raise ValueError(f"features must be numbers like '12, 40', got {bad}")
    return [int(p.lstrip("#")) for p in parts] or None


def explorer_panel(
    lm: Any,
    run_dir: str | os.PathLike,
    *,
    sae_id: str | None = None,
    prompt: str = "Did you eat the last cookie?",
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int = 0,
) -> Any:
    """The panel as an ipywidgets VBox (make it a cell's last line). Needs `build_explorer` first."""
    import ipywidgets as w

    ids = explorer_sae_ids(run_dir)
    if not ids:
        raise FileNotFoundError(f"no explorer data under {explorer_dir(run_dir)}: run build_explorer first")
    full = {"description_width": "initial"}
    sae_box = w.Dropdown(
        options=ids, value=sae_id if sae_id in ids else ids[0], description="SAE", style=full
    )
    status = w.HTML()
    loaded: dict[str, LoadedSAE] = {}
    meters: dict[int, DeceptionMeter] = {}
    tables: dict[str, dict[str, list[Any]]] = {}
    units: dict[int, float] = {}

    def table() -> dict[str, list[Any]]:
        if sae_box.value not in tables:
            tables[sae_box.value] = read_table(run_dir, sae_box.value)
        return tables[sae_box.value]

    def sae() -> LoadedSAE:
        if sae_box.value not in loaded:
            loaded[sae_box.value] = load_sae(
                sae_dir(run_dir, sae_box.value), device=str(next(lm.model.parameters()).device)
            )
        return loaded[sae_box.value]

    def labels() -> dict[int, str]:
        t = table()
        return {f: e for f, e in zip(t["feature"], t["explanation"], strict=True) if e}

    def guarded(fn):
        def run(*_: Any) -> None:
            status.value = "working..."
            try:
                fn()
                status.value = ""
            except Exception as err:  # noqa: BLE001 - a callback's exception is invisible in Colab: show it
                status.value = _error(err)

        return run

    # --- features -------------------------------------------------------------------------------
    search = w.Text(
        placeholder="search explanations / top tokens, or #feature",
        description="search",
        style=full,
        layout=w.Layout(width="50%"),
    )
    tag = w.Dropdown(options=list(TAGS), value="all", description="deception tag", style=full)
    sort = w.Dropdown(options=list(SORTS), value="firing rate", description="sort by", style=full)
    dead = w.Checkbox(value=True, description="hide features that never fired", style=full)
    rows_html = w.HTML()

    def refresh(*_: Any) -> None:
        try:
            rows = select_features(
                table(), search.value, tag=tag.value, sort=sort.value, hide_dead=dead.value, n=25
            )
            rows_html.value = table_html(rows) if rows else "<p>no feature matches</p>"
        except Exception as err:  # noqa: BLE001
            rows_html.value = _error(err)

    for box in (search, tag, sort, dead):
        box.observe(refresh, names="value")

    # --- feature page + steering -------------------------------------------------------------------
    d_sae = int(sae_info(run_dir, sae_box.value)["d_sae"])
    feature = w.BoundedIntText(value=0, min=0, max=d_sae - 1, description="feature", style=full)
    show = w.Button(description="show feature", button_style="primary")
    page_html = w.HTML()
    strength = w.FloatSlider(
        value=0.5,
        min=-3.0,
        max=3.0,
        step=0.05,
        continuous_update=False,
        style=full,
        description="steer (x typical residual norm)",
        layout=w.Layout(width="60%"),
    )
    steer_prompt = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="95%", height="50px"))
    steer_button = w.Button(description="steer this feature")
    steer_html = w.HTML()

    @guarded
    def on_show() -> None:
        page_html.value = feature_html(
            read_page(run_dir, sae_box.value, feature.value), sae_info(run_dir, sae_box.value)
        )

    @guarded
    def on_steer() -> None:
        s = sae()
        if s.layer not in units:
            units[s.layer] = steering.residual_norm(run_dir, s.layer)
        out = generate_pair(
            lm,
            s,
            feature.value,
            strength.value,
            steer_prompt.value,
            unit=units[s.layer],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
        )
        steer_html.value = (
            f"<p><b>unsteered</b>: {html.escape(out['unsteered'])}</p><p><b>steered</b> (feature "
            f"{out['feature']} added at {out['strength']:+g} x {out['unit']:.1f}): "
            f"{html.escape(out['steered'])}</p>"
        )

    show.on_click(on_show)
    steer_button.on_click(on_steer)

    # --- prompt analyser ---------------------------------------------------------------------------
    mode = w.Dropdown(
        options=["analyse this text", "let the model answer it"], description="mode", style=full
    )
    text = w.Textarea(value=prompt, description="text", layout=w.Layout(width="95%", height="60px"))
    chosen = w.Text(
        value="",
        placeholder="e.g. 12, 40 (empty: the text's top features)",
        description="features",
        style=full,
    )
    analyse = w.Button(description="analyse", button_style="primary")
    analyser_out = w.HTML()

    @guarded
    def on_analyse() -> None:
        feats = parse_features(chosen.value)
        if mode.value == "analyse this text":
            tokens, fs, acts = analyse_text(lm, sae(), text.value, features=feats)
        else:
            steps = list(
                track_generation(
                    lm, sae(), text.value, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
                )
            )
            tokens, fs, acts = answer_acts(steps, feats)
        analyser_out.value = analyser_html(tokens, fs, acts, labels())

    analyse.on_click(on_analyse)

    # --- live tracking -----------------------------------------------------------------------------
    live_prompt = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="95%", height="50px"))
    n_tokens = w.IntSlider(value=max_new_tokens, min=1, max=256, description="max tokens", style=full)
    go = w.Button(description="generate and track", button_style="primary")
    live_out = w.HTML()

    @guarded
    def on_live() -> None:
        s = sae()
        if s.layer not in meters:
            meters[s.layer] = fit_meter(run_dir, s.layer)
        steps, names = [], labels()
        for step in track_generation(
            lm,
            s,
            live_prompt.value,
            meter=meters[s.layer],
            max_new_tokens=n_tokens.value,
            temperature=temperature,
            seed=seed,
        ):
            steps.append(step)
            live_out.value = live_html(steps, meters[s.layer], names)  # updates as each token arrives
        live_out.value = live_html(steps, meters[s.layer], names)

    go.on_click(on_live)

    def on_sae(_: Any = None) -> None:
        feature.max = int(sae_info(run_dir, sae_box.value)["d_sae"]) - 1
        page_html.value = steer_html.value = analyser_out.value = live_out.value = ""
        refresh()

    sae_box.observe(on_sae, names="value")
    tabs = w.Tab(
        children=[
            w.VBox([w.HBox([search, tag]), w.HBox([sort, dead]), rows_html]),
            w.VBox([w.HBox([feature, show]), page_html, strength, steer_prompt, steer_button, steer_html]),
            w.VBox([mode, text, chosen, analyse, analyser_out]),
            w.VBox([live_prompt, n_tokens, go, live_out]),
        ]
    )
    for i, title in enumerate(("features", "feature page", "prompt analyser", "live tracking")):
        tabs.set_title(i, title)
    refresh()
    return w.VBox([sae_box, status, tabs])
