"""Notebook 02: behaviour data. Prompt sets (`prompts.py`, built-in sets in `data/`), batched sampling
(`sampling.py`), the datasets of a run and the public ones we read (`datasets.py`), `completions.jsonl`
(`completions.py`), the honest/deceptive judge (`judge.py`: Gemini or
offline rules), the activation store (`store.py`) and its capture (`capture.py`), reference-corpus
activations (`corpus.py`), batches that halve when CUDA runs out of memory (`oom.py`); `pipeline.py` holds the
notebook's steps, re-exported here.
"""

from helpers.collect.capture import collect_activations, load_pooled
from helpers.collect.corpus import collect_corpus, default_corpus, stream_factory
from helpers.collect.datasets import dataset_of, read_datasets, write_datasets
from helpers.collect.pipeline import (
    add_transcripts,
    examples,
    label_balance,
    label_run,
    load_datasets,
    load_prompts,
    sample_into_run,
)

__all__ = [
    "add_transcripts",
    "collect_activations",
    "collect_corpus",
    "dataset_of",
    "default_corpus",
    "examples",
    "label_balance",
    "label_run",
    "load_datasets",
    "load_pooled",
    "load_prompts",
    "read_datasets",
    "sample_into_run",
    "stream_factory",
    "write_datasets",
]
