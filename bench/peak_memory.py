"""This process's resident memory for the benches, from /proc/self/status (Linux): `rss()` now, and
`PeakMemory`, the peak while a block runs, sampled by a thread every 20 ms. One home for the sampler that
bench/corpus_collect.py, bench/sae_train.py and bench/explorer.py each measure with."""

from __future__ import annotations

import threading
from pathlib import Path

KEYS = ("RssAnon", "RssFile")
"""Anonymous (private: tensors, Python objects) and file-backed (mapped weights, shards) resident bytes."""


def rss() -> dict[str, int]:
    """`KEYS` of this process now, in bytes."""
    lines = Path("/proc/self/status").read_text().splitlines()
    return {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in lines) if k in KEYS}


class PeakMemory:
    """`start`: `rss()` on entry; `peak`: the largest value of each key and of their sum (`total`) while the
    block runs, sampled every `every` seconds."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every

    def __enter__(self) -> PeakMemory:
        self.start = rss()
        self.peak = dict.fromkeys((*KEYS, "total"), 0)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.every):
            now = rss()
            for key, value in (*now.items(), ("total", sum(now.values()))):
                self.peak[key] = max(self.peak[key], value)

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()
