"""Batches that halve when CUDA runs out of memory: the one loop of collection's model-forward steps.

Sampling (`sampling.py`), activation capture (`capture.py`) and the reference corpus (`corpus.py`) each
run their items through the model a batch at a time and write what a batch gives before taking the next.
A T4 can run out of memory in one batch (a long prompt, a long completion, a larger model) after hours
of work: `ShrinkingBatches` then halves the batch (`env.smaller_after_oom`, which announces it and, at
one item, raises an error naming the setting that sets the starting size) and gives the same items to
the work again at the smaller size, then goes on at that size. The work must keep nothing of a call that
fails (its device tensors are local to it, so they go with the exception's traceback, which is let go
before retrying); the caller writes a batch's results only when they are handed to it, so nothing is
half-written, lost, or counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Generic, TypeVar

import torch

from helpers.env import smaller_after_oom

T = TypeVar("T")
R = TypeVar("R")


class ShrinkingBatches(Generic[T, R]):
    """Runs `work` over consecutive batches of items, halving the batch size after each CUDA
    out-of-memory error and redoing the failed batch's items. `size` is the batch size now; it stays
    halved across `run` calls (a CUDA that ran out once would again). `what` names the items per batch
    ("completions per batch"), `setting` the parameter the user sets the starting size with, `fix` what
    else to change when one item does not fit."""

    def __init__(self, size: int, *, what: str, setting: str, fix: str):
        if size < 1:
            raise ValueError(f"{setting} must be at least 1, got {size}")
        self.size, self.what, self.setting, self.fix = size, what, setting, fix

    def run(self, items: Iterable[T], work: Callable[[list[T]], R]) -> Iterator[tuple[list[T], R]]:
        """`(batch, work(batch))` for consecutive batches of `items`, in order, every item in exactly
        one batch handed out. `items` is read lazily, `size` at a time, so it may be endless or depend
        on what the caller did with the batches before."""
        source, pending = iter(items), []
        while True:
            pending.extend(islice(source, max(0, self.size - len(pending))))
            if not pending:
                return
            batch = pending[: self.size]
            error = None
            try:
                result = work(batch)
            except torch.cuda.OutOfMemoryError as e:
                error = str(e)  # the traceback, and the tensors its frames hold, go with `e`
            if error is not None:
                self.size = smaller_after_oom(
                    self.size, floor=1, what=self.what, setting=self.setting, error=error, fix=self.fix
                )
                continue  # the same items again, at the smaller size
            del pending[: len(batch)]
            yield batch, result
