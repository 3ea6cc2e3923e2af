"""This process's resident memory for the benches: `rss()` now and `PeakMemory`, the peak while a block runs
(sampled by a thread every 20 ms), whose one home is helpers/plan.py (the plans' `Watch` measures with the
same sampler); bench/corpus_collect.py, bench/sae_train.py and bench/explorer.py import them from here."""

from __future__ import annotations

from helpers.plan import RSS_KEYS as KEYS
from helpers.plan import PeakMemory, rss

__all__ = ["KEYS", "PeakMemory", "rss"]
