"""Notebook 05: causal tests. Directions and interventions (`directions.py`: feature, random and
difference-of-means directions, additive steering, clamping), steering experiments with controls and
their statistics (`pipeline.py`, the notebook's steps), and the interactive panel (`panel.py`).
Re-exported here.
"""

from helpers.steer.directions import (
    build_conditions,
    check_sae_matches,
    diff_of_means_direction,
    residual_norm,
)
from helpers.steer.panel import steering_panel
from helpers.steer.pipeline import (
    compare_to_controls,
    comparison_table,
    held_out_prompts,
    run_steering_experiment,
    steering_targets,
)

__all__ = [
    "build_conditions",
    "check_sae_matches",
    "compare_to_controls",
    "comparison_table",
    "diff_of_means_direction",
    "held_out_prompts",
    "residual_norm",
    "run_steering_experiment",
    "steering_panel",
    "steering_targets",
]
