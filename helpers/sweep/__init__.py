"""07: the study of notebooks 01–04 over many models, and the cross-model comparison.

plan     which models, their run folders (unique keys), sizes, memory and time estimates, T4 fit
pipeline the study's parameters (`Study`) and `run_sweep`: each model in turn through the stages,
         resumable per model × stage, failures recorded, memory freed and checked between models
compare  the table (`sweeps/<name>/comparison.csv|json`), figures and the markdown summary, read from
         each run's probes.json, features/ and saes/*/metrics.json
"""

from helpers.sweep.compare import compare, comparison_table, sae_differences, scale_trend
from helpers.sweep.pipeline import (
    SMOKE_STUDY,
    STAGES,
    Study,
    SweepFolders,
    read_sweep,
    run_sweep,
    status_table,
)
from helpers.sweep.plan import (
    COLAB_T4_MODELS,
    CPU_MODELS,
    ModelSpec,
    layers_at,
    machine_rates,
    model_keys,
    model_size,
    plan_rows,
    plan_table,
)
from helpers.sweep.tiny import tiny_random_model

__all__ = [
    "COLAB_T4_MODELS",
    "CPU_MODELS",
    "SMOKE_STUDY",
    "STAGES",
    "ModelSpec",
    "Study",
    "SweepFolders",
    "compare",
    "comparison_table",
    "layers_at",
    "machine_rates",
    "model_keys",
    "model_size",
    "plan_rows",
    "plan_table",
    "read_sweep",
    "run_sweep",
    "sae_differences",
    "scale_trend",
    "status_table",
    "tiny_random_model",
]
