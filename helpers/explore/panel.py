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

`explorer_panel` makes one `PanelState` (the model, the SAE chooser, the status line, what was loaded)
and one builder per tab over it; each builder returns its tab and what to clear when the SAE changes.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helpers.collect.sampling import SamplingSettings
from helpers.explore.live import LIVE_SAMPLING, analyse_text, answer_acts, track_generation
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
from helpers.model.protocols import HookableModel
from helpers.run import explorer_dir, sae_dir
from helpers.saes.io import LoadedSAE, load_sae
from helpers.steer import directions as steering
from helpers.steer.panel import generate_pair, strength_slider


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


_FULL = {"description_width": "initial"}


@dataclass
class PanelState:
    """What the tabs share: the model, the run, the SAE chooser and status line, and what was loaded
    (SAEs, feature tables, meters and residual norms, each on first use and then kept)."""

    lm: HookableModel
    run_dir: str | os.PathLike
    sampling: SamplingSettings
    sae_box: Any
    """The SAE Dropdown: its value is the SAE id every tab works on."""
    status: Any
    """The HTML line that shows "working...", then nothing or the callback's error."""
    loaded: dict[str, LoadedSAE] = field(default_factory=dict)
    meters: dict[int, DeceptionMeter] = field(default_factory=dict)
    tables: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    units: dict[int, float] = field(default_factory=dict)

    def table(self) -> dict[str, list[Any]]:
        if self.sae_box.value not in self.tables:
            self.tables[self.sae_box.value] = read_table(self.run_dir, self.sae_box.value)
        return self.tables[self.sae_box.value]

    def sae(self) -> LoadedSAE:
        if self.sae_box.value not in self.loaded:
            device = str(next(self.lm.model.parameters()).device)
            self.loaded[self.sae_box.value] = load_sae(
                sae_dir(self.run_dir, self.sae_box.value), device=device
            )
        return self.loaded[self.sae_box.value]

    def labels(self) -> dict[int, str]:
        t = self.table()
        return {f: e for f, e in zip(t["feature"], t["explanation"], strict=True) if e}

    def guarded(self, fn: Callable[[], None]) -> Callable[..., None]:
        """A button callback running `fn`, its exception shown in the status line (invisible otherwise)."""

        def run(*_: Any) -> None:
            self.status.value = "working..."
            try:
                fn()
                self.status.value = ""
            except Exception as err:  # noqa: BLE001 - a callback's exception is invisible in Colab: show it
                self.status.value = _error(err)

        return run


Tab = tuple[Any, Callable[[], None]]
"""A tab's box and what to do when the SAE changes."""


def _features_tab(w: Any, state: PanelState) -> Tab:
    """Search, tag filter, sort and the table of matching features."""
    search = w.Text(
        placeholder="search explanations / top tokens, or #feature",
        description="search",
        style=_FULL,
        layout=w.Layout(width="50%"),
    )
    tag = w.Dropdown(options=list(TAGS), value="all", description="deception tag", style=_FULL)
    sort = w.Dropdown(options=list(SORTS), value="firing rate", description="sort by", style=_FULL)
    dead = w.Checkbox(value=True, description="hide features that never fired", style=_FULL)
    rows_html = w.HTML()

    def refresh(*_: Any) -> None:
        try:
            rows = select_features(
                state.table(), search.value, tag=tag.value, sort=sort.value, hide_dead=dead.value, n=25
            )
            rows_html.value = table_html(rows) if rows else "<p>no feature matches</p>"
        except Exception as err:  # noqa: BLE001
            rows_html.value = _error(err)

    for box in (search, tag, sort, dead):
        box.observe(refresh, names="value")
    return w.VBox([w.HBox([search, tag]), w.HBox([sort, dead]), rows_html]), refresh


def _feature_page_tab(w: Any, state: PanelState, prompt: str) -> Tab:
    """One feature's page, and steering it: the unsteered and the steered answer, same seed."""
    d_sae = int(sae_info(state.run_dir, state.sae_box.value)["d_sae"])
    feature = w.BoundedIntText(value=0, min=0, max=d_sae - 1, description="feature", style=_FULL)
    show = w.Button(description="show feature", button_style="primary")
    page_html = w.HTML()
    strength = strength_slider(w, "steer (x typical residual norm)")
    steer_prompt = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="95%", height="50px"))
    steer_button = w.Button(description="steer this feature")
    steer_html = w.HTML()

    def on_show() -> None:
        info = sae_info(state.run_dir, state.sae_box.value)
        page_html.value = feature_html(read_page(state.run_dir, state.sae_box.value, feature.value), info)

    def on_steer() -> None:
        s = state.sae()
        if s.layer not in state.units:
            state.units[s.layer] = steering.residual_norm(state.run_dir, s.layer)
        out = generate_pair(
            state.lm,
            s,
            feature.value,
            strength.value,
            steer_prompt.value,
            unit=state.units[s.layer],
            sampling=state.sampling,
        )
        steer_html.value = (
            f"<p><b>unsteered</b>: {html.escape(out['unsteered'])}</p><p><b>steered</b> (feature "
            f"{out['feature']} added at {out['strength']:+g} x {out['unit']:.1f}): "
            f"{html.escape(out['steered'])}</p>"
        )

    def on_sae() -> None:
        feature.max = int(sae_info(state.run_dir, state.sae_box.value)["d_sae"]) - 1
        page_html.value = steer_html.value = ""

    show.on_click(state.guarded(on_show))
    steer_button.on_click(state.guarded(on_steer))
    box = w.VBox([w.HBox([feature, show]), page_html, strength, steer_prompt, steer_button, steer_html])
    return box, on_sae


def _analyser_tab(w: Any, state: PanelState, prompt: str) -> Tab:
    """Per-token activations of chosen (or the top) features over a text, or over the model's answer."""
    mode = w.Dropdown(
        options=["analyse this text", "let the model answer it"], description="mode", style=_FULL
    )
    text = w.Textarea(value=prompt, description="text", layout=w.Layout(width="95%", height="60px"))
    chosen = w.Text(
        value="",
        placeholder="e.g. 12, 40 (empty: the text's top features)",
        description="features",
        style=_FULL,
    )
    analyse = w.Button(description="analyse", button_style="primary")
    analyser_out = w.HTML()
    sampling = state.sampling

    def on_analyse() -> None:
        feats = parse_features(chosen.value)
        if mode.value == "analyse this text":
            tokens, fs, acts = analyse_text(state.lm, state.sae(), text.value, features=feats)
        else:
            steps = list(
                track_generation(
                    state.lm,
                    state.sae(),
                    text.value,
                    max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    seed=sampling.seed,
                )
            )
            tokens, fs, acts = answer_acts(steps, feats)
        analyser_out.value = analyser_html(tokens, fs, acts, state.labels())

    def on_sae() -> None:
        analyser_out.value = ""

    analyse.on_click(state.guarded(on_analyse))
    return w.VBox([mode, text, chosen, analyse, analyser_out]), on_sae


def _live_tab(w: Any, state: PanelState, prompt: str) -> Tab:
    """The model answers token by token; each token's firing features and the deception meter."""
    sampling = state.sampling
    live_prompt = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="95%", height="50px"))
    n_tokens = w.IntSlider(
        value=sampling.max_new_tokens, min=1, max=256, description="max tokens", style=_FULL
    )
    go = w.Button(description="generate and track", button_style="primary")
    live_out = w.HTML()

    def on_live() -> None:
        s = state.sae()
        if s.layer not in state.meters:
            state.meters[s.layer] = fit_meter(state.run_dir, s.layer)
        meter, steps, names = state.meters[s.layer], [], state.labels()
        for step in track_generation(
            state.lm,
            s,
            live_prompt.value,
            meter=meter,
            max_new_tokens=n_tokens.value,
            temperature=sampling.temperature,
            seed=sampling.seed,
        ):
            steps.append(step)
            live_out.value = live_html(steps, meter, names)  # updates as each token arrives
        live_out.value = live_html(steps, meter, names)

    def on_sae() -> None:
        live_out.value = ""

    go.on_click(state.guarded(on_live))
    return w.VBox([live_prompt, n_tokens, go, live_out]), on_sae


TAB_TITLES = ("features", "feature page", "prompt analyser", "live tracking")


def explorer_panel(
    lm: HookableModel,
    run_dir: str | os.PathLike,
    *,
    sae_id: str | None = None,
    prompt: str = "Did you eat the last cookie?",
    sampling: SamplingSettings = LIVE_SAMPLING,
    **overrides: Any,
) -> Any:
    """The panel as an ipywidgets VBox (make it a cell's last line). Needs `build_explorer` first.

    `sampling` (default `live.LIVE_SAMPLING`: greedy, 48 new tokens, seed 0), or any of its fields as
    keywords (`max_new_tokens=32`), sets how the steering, analyser and live tabs generate."""
    import ipywidgets as w

    ids = explorer_sae_ids(run_dir)
    if not ids:
        raise FileNotFoundError(f"no explorer data under {explorer_dir(run_dir)}: run build_explorer first")
    sae_box = w.Dropdown(
        options=ids, value=sae_id if sae_id in ids else ids[0], description="SAE", style=_FULL
    )
    state = PanelState(lm, run_dir, sampling.with_overrides(overrides), sae_box, w.HTML())
    features, refresh = _features_tab(w, state)
    tabs = [
        (features, refresh),
        _feature_page_tab(w, state, prompt),
        _analyser_tab(w, state, prompt),
        _live_tab(w, state, prompt),
    ]

    def on_sae(_: Any = None) -> None:
        for _box, clear in tabs[1:]:
            clear()
        refresh()

    sae_box.observe(on_sae, names="value")
    tab = w.Tab(children=[box for box, _ in tabs])
    for i, title in enumerate(TAB_TITLES):
        tab.set_title(i, title)
    refresh()
    return w.VBox([sae_box, state.status, tab])
