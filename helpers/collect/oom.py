"""The one home of retrying after CUDA runs out of memory: a batch size that halves (`BatchSize`), and
batches of items that redo the failed items at the smaller size (`ShrinkingBatches`).

A T4 can run out of memory in one batch (a long prompt, a long completion, a larger model, a wider SAE)
after hours of work. Every loop that sends batches to the device runs each batch's device work through
`BatchSize.attempt`: when CUDA runs out of memory in it, the batch size halves (announced, with the setting
that sets where it starts; at its floor, an error naming that setting and what else to change) and the
caller gives the same work again at the smaller size, then goes on at that size. The work must keep
nothing of a call that fails (its device tensors are local to it, so they go with the exception's
traceback, which is let go before the cache is emptied); the caller keeps a batch's results only when
they are handed to it, so nothing is half-written, lost, or counted twice.

Users: collection's model-forward steps through `ShrinkingBatches` (sampling.py, capture.py, corpus.py;
the logistic probes' chunks of problems, analysis/logistic.py), and the SAE encoding passes through
`BatchSize` (analysis/contexts.py `EncodedChunks`: notebook 04's pooled features and examples, the
explorer's passes), whose batches are runs of whole documents cut to a number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class BatchSize:
    """A batch size, `size`, that halves after each CUDA out-of-memory error in `attempt`, down to `floor`.
    `what` names the unit per batch ("tokens per batch"), `setting` the parameter the user sets the
    starting size with, `fix` what else to change when `floor` does not fit either. `size` stays halved
    (a CUDA that ran out once would again)."""

    def __init__(self, size: int, *, what: str, setting: str, fix: str, floor: int = 1):
        if size < 1:
            raise ValueError(f"{setting} must be at least 1, got {size}")
        self.size, self.floor, self.what, self.setting, self.fix = size, floor, what, setting, fix

    def attempt(self, work: Callable[..., R], *args: Any) -> R | None:
        """`work(*args)`, a batch's device work at the size now, all of it before anything of the batch
        is kept (`work` must not return None). When CUDA runs out of memory in it: the size halves
        (`halve`, once the exception, `work`'s frame and the tensors they hold are gone) and None is
        returned; the caller keeps nothing of the batch and gives its items again at the new size."""
        try:
            result = work(*args)
        except torch.cuda.OutOfMemoryError as e:
            error = str(e)  # the traceback, and the tensors its frames hold, go with `e`
        else:
            if result is None:
                raise TypeError(
                    f"{getattr(work, '__name__', work)!r} returned None, which BatchSize.attempt gives for "
                    "a batch that ran out of memory: return the batch's results (a tuple, say)"
                )
            return result
        self.halve(error)
        return None

    def halve(self, error: str) -> None:
        """CUDA ran out of memory at `size` (`error`: what CUDA said): the allocator's cache is emptied
        and `size` halves, at least to `floor`, announced. At `floor` already: `torch.cuda.OutOfMemoryError`
        naming `setting` and `fix`."""
        if self.size <= self.floor:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA ran out of memory even at {self.size} {self.what} (halved after each out-of-memory "
                f"error, down to {self.floor}; {self.setting} sets where it starts): {self.fix}. "
                f"CUDA said: {error}"
            )
        torch.cuda.empty_cache()
        new = max(self.floor, self.size // 2)
        print(
            f"CUDA ran out of memory at {self.size} {self.what}: going on at {new}, nothing lost or counted "
            f"twice (lower {self.setting} to start smaller)"
        )
        self.size = new


class ShrinkingBatches(BatchSize, Generic[T, R]):
    """Runs `work` over consecutive batches of items, `size` items a batch (`BatchSize`, down to one
    item), redoing a failed batch's items at the halved size."""

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
            result = self.attempt(work, batch)
            if result is None:
                continue  # the same items again, at the smaller size
            del pending[: len(batch)]
            yield batch, result
