"""Notebook 06: explore the features. Per-feature dashboards of every latent from one pass over the
activation store (`dashboards.py` on the streaming accumulators of `accumulate.py`; logit effects and
nearest decoder rows in `decoder.py`), the static HTML explorer (`site.py`, `static/index.html`), the
Neuronpedia export (`neuronpedia.py`), the deception meter (`meter.py`), live tracking of features
during generation and the prompt analyser (`live.py`), the notebook's HTML views and widgets
(`views.py`, `panel.py`); `pipeline.py` holds the notebook's steps. Re-exported here.
"""

from helpers.explore.dashboards import ExplorerConfig, build_dashboards
from helpers.explore.live import analyse_text, answer_acts, track_generation
from helpers.explore.meter import fit_meter
from helpers.explore.neuronpedia import export_neuronpedia, validate_export
from helpers.explore.panel import explorer_panel
from helpers.explore.pipeline import build_explorer
from helpers.explore.site import explorer_path, read_page, read_table
from helpers.explore.views import (
    TABLE_COLUMNS,
    analyser_html,
    default_feature,
    feature_html,
    select_features,
    show_live,
    table_html,
)

__all__ = [
    "TABLE_COLUMNS",
    "ExplorerConfig",
    "analyse_text",
    "analyser_html",
    "answer_acts",
    "build_dashboards",
    "build_explorer",
    "default_feature",
    "explorer_panel",
    "explorer_path",
    "export_neuronpedia",
    "feature_html",
    "fit_meter",
    "read_page",
    "read_table",
    "select_features",
    "show_live",
    "table_html",
    "track_generation",
    "validate_export",
]
