"""An interactive steering panel for notebook 05: pick an SAE and a feature, a strength and a prompt,
press Generate, and read the unsteered and the steered completion side by side.

It uses only widgets and arguments that ipywidgets 7.x (what Colab ships) and 8.x share: Dropdown,
BoundedIntText, FloatSlider, Textarea, Button, HTML, HBox, VBox and Layout, with `observe(...,
names="value")` and `on_click`. The work is in the plain function `generate_pair`, which the button
calls and which tests (or a script) call directly. Building the panel reads only cfg.json and
features/*.jsonl: it loads no SAE and generates nothing, so Run all never waits on it.

Both completions use the same seed, so with strength 0 they are identical and any difference at
another strength comes from the steering. Additive mode keeps the SAE's error term (directions.py).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.collect.prompts import load_scenarios
from helpers.collect.sampling import SamplingSettings, sample_completions
from helpers.model.protocols import HookableModel
from helpers.run import SAE_CFG, features_path, read_jsonl, saes_dir, split_overrides
from helpers.saes.io import LoadedSAE, find_sae_folders, load_sae
from helpers.steer import directions as steering

MODES = ("add", "clamp")
PANEL_SAMPLING = SamplingSettings(temperature=0.7, max_new_tokens=48, seed=0, batch_size=1)
"""The panels' sampling defaults: short answers at a moderate temperature, one at a time."""


@dataclass(frozen=True)
class PairSettings:
    """How `generate_pair` steers: the system prompt, the edit (`mode`) and the unit its strength counts
    in. Given whole (`pair=PairSettings(...)`) or as single fields (`mode="clamp"`, `unit=3.0`)."""

    system: str | None = None
    mode: str = "add"
    """"add" adds the feature's decoder direction; "clamp" sets the latent on every token."""
    unit: float = 1.0
    """What strength 1 means, as a residual norm (`steering.residual_norm(run_dir, layer)`)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


def feature_options(run_dir: str | os.PathLike, sae_id: str, top: int = 50) -> list[tuple[str, int]]:
    """Dropdown options `(label, feature)` for the top features of `features/{sae_id}.jsonl`, labelled
    with Cohen's d and the explanation when there is one; [] when notebook 04 has not written it."""
    path = features_path(run_dir, sae_id)
    if not path.exists():
        return []
    rows = read_jsonl(path)
    rows.sort(key=lambda r: r.get("rank") or 1e9)
    out = []
    for r in rows[:top]:
        d = r.get("cohens_d")
        label = f"#{r['feature']}" + (f"  d={d:+.2f}" if d is not None else "")
        out.append((f"{label}  {(r.get('explanation') or 'not explained yet')[:70]}", int(r["feature"])))
    return out


def generate_pair(
    lm: HookableModel,
    sae: LoadedSAE,
    feature: int,
    strength: float,
    prompt: str,
    *,
    pair: PairSettings | None = None,
    sampling: SamplingSettings = PANEL_SAMPLING,
    **overrides: Any,
) -> dict[str, Any]:
    """The unsteered and the steered completion of one prompt, sampled with the same seed.

    `strength` is the norm of what the feature writes, in units of `unit` (pass
    `unit=steering.residual_norm(run_dir, layer)`: the typical residual norm). Mode "add" adds
    strength · unit · W_dec[f]/|W_dec[f]| at the SAE's layer; mode "clamp" sets latent f to
    strength · unit / |W_dec[f]| on every token (the error term is kept in both). `sampling` (default
    `PANEL_SAMPLING`), or any of its fields as keywords (`max_new_tokens=32`), sets how both are drawn;
    `pair` (default `PairSettings()`: no system prompt, mode "add", unit 1), or its fields as keywords
    (`system=...`, `mode="clamp"`, `unit=...`), how the steered one is made."""
    how, settings = split_overrides(
        overrides, {"pair settings": pair or PairSettings(), "sampling settings": sampling}
    )
    system, mode, unit = how.system, how.mode, how.unit
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty: type a question for the model")
    steering.check_sae_matches(sae, lm, sae.layer)
    direction = steering.feature_direction(sae, feature)  # also the index check that names d_sae
    prompts = [("panel", prompt, system or None)]
    unsteered = sample_completions(lm, prompts, n_per_prompt=1, sampling=settings)[0].completion
    if mode == "add":
        ctx = steering.steer(lm, sae.layer, direction, strength, scale=unit)
    else:
        value = (
            strength * unit / float(sae.sae.W_dec[feature].detach().norm())
        )  # the activation writing that norm
        ctx = steering.clamp_feature(lm, sae, sae.layer, feature, value)
    with ctx:
        steered = sample_completions(lm, prompts, n_per_prompt=1, sampling=settings)[0].completion
    return {
        "unsteered": unsteered,
        "steered": steered,
        "feature": int(feature),
        "layer": sae.layer,
        "mode": mode,
        "strength": float(strength),
        "unit": float(unit),
    }


def strength_slider(w: Any, description: str) -> Any:
    """The steering strength slider of both panels (`w`: ipywidgets), in units of the layer's typical
    residual norm: -3 to 3, 0.5 to start, read when released."""
    return w.FloatSlider(
        value=0.5,
        min=-3.0,
        max=3.0,
        step=0.05,
        continuous_update=False,
        style={"description_width": "initial"},
        description=description,
        layout=w.Layout(width="60%"),
    )


def _card(title: str, text: str) -> str:
    return (
        f'<div style="border:1px solid #ccc; border-radius:4px; padding:6px; white-space:pre-wrap">'
        f"<b>{html.escape(title)}</b><br>{html.escape(text) or '<i>(empty)</i>'}</div>"
    )


def steering_panel(
    lm: HookableModel,
    run_dir: str | os.PathLike,
    *,
    prompt: str = "",
    system: str = "",
    sampling: SamplingSettings = PANEL_SAMPLING,
    **overrides: Any,
) -> Any:
    """The panel as an ipywidgets VBox (display it, or make it a cell's last line). The SAEs are those
    under `run_dir/saes`; an empty prompt starts with the first built-in scenario. `sampling`, or
    any of its fields as keywords, sets how both answers are drawn (as in `generate_pair`)."""
    import ipywidgets as w

    sampling = sampling.with_overrides(overrides)
    folders = find_sae_folders(saes_dir(run_dir))
    if not folders:
        raise FileNotFoundError(f"no SAEs under {Path(run_dir) / 'saes'}: train some in notebook 03 first")
    if not prompt:
        first = load_scenarios(paraphrases=False)[0]
        prompt, system = first.user, system or first.system or ""
    d_sae = {str(f): int(json.loads((f / SAE_CFG).read_text())["d_sae"]) for f in folders}
    full = {"description_width": "initial"}
    sae_box = w.Dropdown(options=[(f.name, str(f)) for f in folders], description="SAE", style=full)
    feat_box = w.Dropdown(
        options=[("(type a latent)", -1)], description="feature", style=full, layout=w.Layout(width="60%")
    )
    latent = w.BoundedIntText(value=0, min=0, max=d_sae[sae_box.value] - 1, description="latent", style=full)
    mode = w.Dropdown(options=list(MODES), value="add", description="mode", style=full)
    strength = strength_slider(w, "strength (x typical residual norm)")
    system_box = w.Textarea(value=system, description="system", layout=w.Layout(width="95%", height="70px"))
    prompt_box = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="95%", height="50px"))
    button = w.Button(description="Generate", button_style="primary")
    status, left, right = w.HTML(), w.HTML(layout=w.Layout(width="49%")), w.HTML(layout=w.Layout(width="49%"))
    loaded: dict[str, LoadedSAE] = {}
    units: dict[int, float] = {}
    notes: dict[int, str] = {}

    def on_sae(_change: Any = None) -> None:
        options = feature_options(run_dir, Path(sae_box.value).name)
        feat_box.options = options or [("(no features file for this SAE: type a latent)", -1)]
        latent.max = d_sae[sae_box.value] - 1
        if options:
            latent.value = options[0][1]

    def on_feature(change: Any) -> None:
        if change["new"] is not None and change["new"] >= 0:
            latent.value = change["new"]

    def on_click(_button: Any) -> None:
        status.value = "generating..."
        try:
            if sae_box.value not in loaded:  # loaded on first use, then kept
                loaded[sae_box.value] = load_sae(sae_box.value, device=str(lm.model.device))
            sae = loaded[sae_box.value]
            if sae.layer not in units:
                try:
                    units[sae.layer] = steering.residual_norm(run_dir, sae.layer)
                except FileNotFoundError:  # no activations in this run: measure on the prompt, announced
                    units[sae.layer] = steering.measure_residual_norm(lm, sae.layer, [prompt_box.value])
                    notes[sae.layer] = " (measured on this prompt: the run has no stored activations)"
            out = generate_pair(
                lm,
                sae,
                latent.value,
                strength.value,
                prompt_box.value,
                system=system_box.value,
                mode=mode.value,
                unit=units[sae.layer],
                sampling=sampling,
            )
        except Exception as err:  # noqa: BLE001 - a callback's exception is invisible in Colab: show it
            status.value = f"<b style='color:#b00'>{type(err).__name__}</b>: {html.escape(str(err))}"
            return
        how = f"{'added' if out['mode'] == 'add' else 'clamped'} at {out['strength']:+g} x {out['unit']:.1f}"
        left.value = _card("unsteered", out["unsteered"])
        right.value = _card(
            f"steered: latent {out['feature']} at layer {out['layer']}, {how}", out["steered"]
        )
        unit = f"{units[out['layer']]:.1f}{notes.get(out['layer'], '')}"
        status.value = (
            f"same seed ({sampling.seed}) for both; residual norm unit at layer {out['layer']}: {unit}"
        )

    sae_box.observe(on_sae, names="value")
    feat_box.observe(on_feature, names="value")
    button.on_click(on_click)
    on_sae()
    return w.VBox(
        [
            w.HBox([sae_box, feat_box]),
            w.HBox([latent, mode]),
            strength,
            system_box,
            prompt_box,
            button,
            status,
            w.HBox([left, right]),
        ]
    )
