"""Notebook 04: which features separate deception. Probes on raw activations and SAE features
(`probes.py`) and the field's detector protocol on other datasets (`detection.py`), per-feature
statistics with held-out selection (`features.py`), token windows
(`windows.py` chooses, `contexts.py` cuts and marks), Gemini explanations (`autointerp.py`) and their
detection/fuzzing scores (`scoring.py`); `pipeline.py` holds the notebook's steps, re-exported here.
"""

from helpers.analysis.autointerp import plan as autointerp_plan
from helpers.analysis.contexts import feature_activation_over_text
from helpers.analysis.pipeline import (
    feature_summary,
    feature_table,
    label_features,
    layer_sweep,
    probe_summary,
    probe_table,
    sae_pair_summary,
    sweep_summary,
    transfer_summary,
)
from helpers.analysis.scoring import score_table
from helpers.run import read_probes

__all__ = [
    "autointerp_plan",
    "feature_activation_over_text",
    "feature_summary",
    "feature_table",
    "label_features",
    "layer_sweep",
    "probe_summary",
    "probe_table",
    "read_probes",
    "sae_pair_summary",
    "sweep_summary",
    "transfer_summary",
    "score_table",
]
