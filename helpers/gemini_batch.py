"""Several features per Gemini request, for auto-interpretation (autointerp.py explains, scoring.py
scores): the batching, answer validation and follow-up rounds that explanation and every score share.

- `ask_batched` sends items (dicts with a "feature" key) `batch_size` per request as a JSON list after
  the line `ITEMS:` (`items_prompt`). The caller's `parse` validates an answer against the items it was
  asked about (`check_ids` drops feature ids not in the batch) and returns the usable answers by
  feature; features left out are asked again in halves, up to `max_followups` rounds
  (`ask_with_followups`, which the judge uses too).
- `Asker` wraps the GeminiClient (which caches and budgets every request). After a daily-quota or
  budget stop it answers only from the cache, and `stopped` says why the rest is unavailable, so the
  next run continues from the cache. Without a client nothing is sent and every answer is missing:
  callers mark those results `OFFLINE`, never invent them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Container, Sequence
from typing import Any

from pydantic import BaseModel

from .gemini import BudgetExhausted, DailyQuotaExceeded, GeminiClient, MalformedResponse

OFFLINE = "unavailable (no Gemini key)"
LEFT_OUT = "unavailable (Gemini left this feature out of its answers)"


class Asker:
    """Sends requests until a daily quota or budget stop; after one, answers only from the cache."""

    def __init__(self, client: GeminiClient | None):
        self.client = client
        self.stopped: str | None = None if client is not None else OFFLINE

    @property
    def source(self) -> str:
        """What answered: "gemini:<model>"."""
        if self.client is None:
            raise RuntimeError("no Gemini client, so no answer has a source: mark the result OFFLINE")
        return f"gemini:{self.client.model}"

    def ask(self, prompt: str, schema: type[BaseModel], system: str) -> BaseModel | None:
        if self.client is None:
            return None
        if self.stopped and not self.client.is_cached(prompt, schema, system=system):
            return None
        try:
            return self.client.generate_json(prompt, schema, system=system)
        except DailyQuotaExceeded as err:
            self.stopped = (
                "unavailable (Gemini's daily quota ran out; rerun tomorrow to continue from the cache)"
            )
            print(f"autointerp stopped: {err}")
        except BudgetExhausted as err:
            self.stopped = "unavailable (request budget used up; raise max_requests and rerun)"
            print(f"autointerp stopped: {err}")
        except MalformedResponse as err:
            print(f"warning: {err} Asking again in smaller batches.")
        return None


def items_prompt(verb: str, items: list[dict[str, Any]], followup: int = 0) -> str:
    """The user prompt of one request: the items as a JSON list after the line `ITEMS:`. A follow-up
    says so, which also keeps it from hitting the cached incomplete answer."""
    note = f" (follow-up {followup}: an earlier answer left these out; answer every item)" if followup else ""
    body = json.dumps(items, ensure_ascii=False, indent=1)
    return f"{verb} each of these {len(items)} features{note}.\nITEMS:\n{body}"


def check_ids(answer_ids: list[int], chunk: list[dict[str, Any]]) -> set[int]:
    """The feature ids asked about in `chunk`; warns about answered ids that are not among them."""
    wanted = {it["feature"] for it in chunk}
    unknown = [f for f in answer_ids if f not in wanted]
    if unknown:
        print(f"warning: Gemini answered feature id(s) not in the batch, ignored: {unknown[:5]}")
    return wanted


def ask_with_followups(
    batch: Sequence[Any],
    key: Callable[[Any], Any],
    ask_chunk: Callable[[list[Any], int], None],
    answered: Container[Any],
    max_followups: int,
    lacking: Callable[[list[Any]], str],
    quiet: Callable[[], bool] = lambda: False,
) -> None:
    """Ask about `batch` in one request (`ask_chunk(items, attempt)` records answers into `answered`,
    keyed by `key(item)`), then up to `max_followups` rounds for the items still missing, in halves: a
    long batch is the usual reason an item is dropped. Warns `lacking(missing)` unless `quiet()`. The
    judge (labels) and autointerp (features) share this."""
    pending = list(batch)
    for attempt in range(1 + max_followups):
        size = len(pending) if attempt == 0 else math.ceil(len(pending) / 2)
        for i in range(0, len(pending), size):
            ask_chunk(pending[i : i + size], attempt)
        pending = [it for it in pending if key(it) not in answered]
        if not pending:
            return
        if not quiet():
            more = "asking again" if attempt < max_followups else "giving up on them for this run"
            print(f"warning: Gemini's answer lacked {lacking(pending)}; {more}")


def ask_batched(
    asker: Asker,
    items: Sequence[dict[str, Any]],
    verb: str,
    schema: type[BaseModel],
    system: str,
    parse: Callable[[Any, list[dict[str, Any]]], dict[int, Any]],
    batch_size: int,
    max_followups: int,
) -> dict[int, Any]:
    """Answers keyed by item["feature"]: batches of `batch_size`, each with `ask_with_followups`. Once
    the asker has stopped, follow-ups are only looked up in the cache, without warnings."""
    if batch_size < 1:
        raise ValueError(f"features_per_request must be at least 1, got {batch_size}")
    got: dict[int, Any] = {}

    def ask_chunk(chunk: list[dict[str, Any]], attempt: int) -> None:
        answer = asker.ask(items_prompt(verb, chunk, attempt), schema, system)
        if answer is not None:
            got.update(parse(answer, chunk))

    for start in range(0, len(items), batch_size):
        ask_with_followups(items[start : start + batch_size], lambda it: it["feature"], ask_chunk, got,
                           max_followups, lambda p: f"feature(s) {[it['feature'] for it in p]}",
                           quiet=lambda: bool(asker.stopped))  # fmt: skip
    return got
