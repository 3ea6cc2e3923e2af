"""A small Gemini client for JSON answers: cached, budgeted, and honest about quota errors.

Used by the judge (`helpers.collect.judge`), autointerp and scoring, and any caller that needs structured
answers from Gemini (auto-interpretation of SAE features). It wraps the `google-genai` SDK (not the
end-of-life `google-generativeai`) and adds what a free-tier Colab user needs:

- a SQLite cache keyed by model + system + prompt + schema, so a rerun after a disconnect is free;
- a request budget (`max_requests`) checked before each request is sent;
- per-minute 429s wait the server's RetryInfo delay (capped) and retry a bounded number of times;
- a per-day 429 (quota id containing "PerDay") stops at once with `DailyQuotaExceeded`: it will not clear
  before the daily reset, so spinning would only waste the session;
- an unknown model id and malformed JSON give errors that say what to change.

The API key is read from the argument, else `GOOGLE_API_KEY` (wins, as in the SDK) / `GEMINI_API_KEY`,
else Colab secrets. It is handed to the SDK and never stored on this object, printed, cached or put in
an error message. The SDK itself honours `GOOGLE_GEMINI_BASE_URL` (used by the tests' fake server).

`client_for(run_dir, use_gemini=..., ...)` is the one way the notebooks get a client: None (announced)
when Gemini is switched off or no key exists, else a client caching in the run folder's
`judge_cache.sqlite` with the notebook's request budget. Callers treat None as "offline".

Batching (below `GeminiClient`), shared by the judge, explanations and scores:
Several features per Gemini request, for auto-interpretation (autointerp.py explains, scoring.py
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

import hashlib
import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Container, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from helpers.env import get_secret
from helpers.run import judge_cache_path

# gemini-2.5-flash is reported to shut down on 2026-12-01 (DESIGN.md §7). Google's deprecations page
# (read 2026-11) lists gemini-3.5-flash-lite (stable since 2026-07-21) with no shutdown date and names it
# the recommended replacement for gemini-2.5-flash; it defaults to minimal thinking, which suits fast
# classification into a JSON schema. Change it with GeminiClient(model=...) / the notebook's JUDGE_MODEL.
DEFAULT_MODEL = "gemini-3.5-flash-lite"
KEY_NAMES = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
FREE_TIER_REQUESTS_PER_DAY = 20
"""About 20 requests a day per Flash model on the free tier since 2025-12 (seen in 429 texts)."""
MODELS_PAGE = "https://ai.google.dev/gemini-api/docs/models"


class GeminiError(RuntimeError):
    """A Gemini request failed in a way that retrying here will not fix."""


class MissingApiKey(GeminiError):
    pass


class BudgetExhausted(GeminiError):
    """`max_requests` requests were made; raised before sending the next one."""


class DailyQuotaExceeded(GeminiError):
    """The per-day quota is used up; it resets at midnight Pacific time."""


class ModelNotFound(GeminiError):
    pass


class MalformedResponse(GeminiError):
    """The answer was not JSON matching the schema, twice in a row."""


def resolve_api_key(api_key: str | None = None) -> str | None:
    """The key to use: the argument, else the environment (GOOGLE_API_KEY first), else Colab secrets."""
    if api_key:
        return api_key
    for name in KEY_NAMES:
        if value := os.environ.get(name):
            return value
    for name in KEY_NAMES:
        if value := get_secret(name):
            return value
    return None


def parse_duration(text: str) -> float:
    """Seconds in a protobuf Duration string such as "1s", "26.5s" or "0.120s"."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)s\s*", text or "")
    if not match:
        raise ValueError(f"not a protobuf duration like '26s': {text!r}")
    return float(match.group(1))


class ResponseCache:
    """Answers keyed by a hash of (model, system, prompt, schema). SQLite on disk, or a dict in memory.

    A connection is opened per call: the file may live on Google Drive, where long-held SQLite handles
    misbehave, and a few hundred calls per run make the cost irrelevant.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._memory: dict[str, str] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with sqlite3.connect(self.path) as db:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS responses "
                    "(key TEXT PRIMARY KEY, model TEXT, response TEXT, created_at TEXT)"
                )

    @staticmethod
    def key(model: str, system: str | None, prompt: str, schema: type[BaseModel]) -> str:
        blob = json.dumps(
            {"model": model, "system": system, "prompt": prompt, "schema": schema.model_json_schema()},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        if self.path is None:
            return self._memory.get(key)
        with sqlite3.connect(self.path) as db:
            row = db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, response: str) -> None:
        if self.path is None:
            self._memory[key] = response
            return
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with sqlite3.connect(self.path) as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", (key, model, response, now))


class GeminiClient:
    """JSON answers from one Gemini model, cached and counted against a request budget."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        cache_path: Path | None = None,
        max_requests: int | None = None,
        max_retries: int = 4,
        max_wait_s: float = 90.0,
        timeout_s: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`cache_path`: SQLite file (e.g. `judge_cache_path(run_dir)`); None caches in memory only.
        `max_requests`: requests this client may send (None: no limit). `max_retries`: retries after a
        per-minute 429 or a 5xx. `max_wait_s`: cap on one wait. `sleep`: injectable for tests."""
        from google import genai
        from google.genai import errors, types

        key = resolve_api_key(api_key)
        if not key:
            raise MissingApiKey(
                "no Gemini API key: create one at https://aistudio.google.com/apikey, then add it as the "
                "Colab secret GEMINI_API_KEY (key icon in the left bar) or set the environment variable "
                "GEMINI_API_KEY. Without a key the notebooks use the offline rule judge."
            )
        self.model = model
        self.max_requests = max_requests
        self.max_retries = max_retries
        self.max_wait_s = max_wait_s
        self.requests_made = 0
        self.cache_hits = 0
        self.cache = ResponseCache(cache_path)
        self._sleep = sleep
        self._types = types
        self._api_error = errors.APIError
        # The SDK reads GOOGLE_GEMINI_BASE_URL itself when http_options has no base_url.
        self._client = genai.Client(
            api_key=key, http_options=types.HttpOptions(timeout=int(timeout_s * 1000))
        )

    def __repr__(self) -> str:
        budget = (
            f"{self.requests_made} of {self.max_requests}" if self.max_requests else f"{self.requests_made}"
        )
        return f"GeminiClient(model={self.model!r}, requests made: {budget})"

    def is_cached(self, prompt: str, schema: type[BaseModel], *, system: str | None = None) -> bool:
        return self.cache.get(ResponseCache.key(self.model, system, prompt, schema)) is not None

    def generate_json(self, prompt: str, schema: type[BaseModel], *, system: str | None = None) -> BaseModel:
        """One answer parsed into `schema`, from the cache or from one request (plus bounded retries)."""
        key = ResponseCache.key(self.model, system, prompt, schema)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                result = schema.model_validate_json(cached)
            except ValidationError:
                result = None  # written under an older schema version: ask again
            if result is not None:
                self.cache_hits += 1
                return result
        config = self._types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=schema, system_instruction=system
        )
        retries = malformed = 0
        while True:
            if self.max_requests is not None and self.requests_made >= self.max_requests:
                raise BudgetExhausted(
                    f"request budget used up ({self.requests_made} of max_requests={self.max_requests}). "
                    "Answers so far are in the cache; raise max_requests, or rerun later to continue."
                )
            self.requests_made += 1
            try:
                response = self._client.models.generate_content(
                    model=self.model, contents=prompt, config=config
                )
            except self._api_error as err:
                wait = self._wait_after(err, retries)
                retries += 1
                self._sleep(wait)
                continue
            text = response.text
            try:
                result = schema.model_validate_json(text or "")
            except ValidationError as err:
                malformed += 1
                if malformed < 2:
                    continue
                finish = response.candidates[0].finish_reason if response.candidates else None
                raise MalformedResponse(
                    f"{self.model} twice returned an answer that is not JSON matching "
                    f"{schema.__name__} (finish reason {finish}; first 200 characters: "
                    f"{(text or '')[:200]!r}; {err.error_count()} validation error(s)). Try a "
                    "smaller batch or another model (model=...)."
                ) from None
            self.cache.put(key, self.model, text)
            return result

    def _wait_after(self, err: Any, retries: int) -> float:
        """Seconds to wait before retrying the SDK's APIError `err`, or raise the error we report for it."""
        status, message = err.status or "", err.message or ""
        details = err.details.get("error", err.details) if isinstance(err.details, dict) else {}
        if err.code == 404:
            raise ModelNotFound(
                f"Gemini model {self.model!r} was not found ({err.code} {status}: {message}). Pick a current "
                f"model id from {MODELS_PAGE} and pass it as model=... (the notebook's JUDGE_MODEL "
                f"parameter); the default is {DEFAULT_MODEL!r}."
            ) from None
        if err.code == 429:
            violations = [
                v
                for d in details.get("details", [])
                if "QuotaFailure" in d.get("@type", "")
                for v in d["violations"]
            ]
            daily = [v.get("quotaId", "") for v in violations if "PerDay" in v.get("quotaId", "")]
            if daily:
                raise DailyQuotaExceeded(
                    f"Gemini's daily quota for {self.model} is used up ({daily[0]}); it resets at midnight "
                    "Pacific time. Everything answered so far is cached: rerun tomorrow, or use another "
                    "model (model=...), which has its own quota."
                ) from None
            delays = [d["retryDelay"] for d in details.get("details", []) if "retryDelay" in d]
            wait = parse_duration(delays[0]) if delays else 10.0 * 2**retries
        elif err.code >= 500:
            wait = 5.0 * 2**retries
        else:
            raise GeminiError(
                f"Gemini refused the request ({err.code} {status}: {message}). If it names the API key, "
                "check the GEMINI_API_KEY secret; if it names a parameter, check model=... "
            ) from None
        if retries >= self.max_retries:
            raise GeminiError(
                f"Gemini still answered {err.code} {status} after {retries} retries ({message}). "
                "Wait a minute and rerun: answers so far are cached."
            ) from None
        return min(wait, self.max_wait_s)


def client_for(
    run_dir: str | os.PathLike,
    *,
    use_gemini: bool = True,
    model: str = DEFAULT_MODEL,
    max_requests: int | None = None,
    purpose: str = "gemini",
) -> GeminiClient | None:
    """The client a notebook uses: None when `use_gemini` is False or no key exists (each announced, and
    callers then work offline), else a GeminiClient caching in the run folder with the request budget."""
    if not use_gemini:
        print(f"{purpose}: Gemini is switched off by the parameters (USE_GEMINI = False): working offline")
        return None
    if resolve_api_key() is None:
        print(
            f"{purpose}: no GEMINI_API_KEY / GOOGLE_API_KEY (environment or Colab secrets): working offline"
        )
        return None
    return GeminiClient(model, cache_path=judge_cache_path(run_dir), max_requests=max_requests)


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
        ask_with_followups(
            items[start : start + batch_size],
            lambda it: it["feature"],
            ask_chunk,
            got,
            max_followups,
            lambda p: f"feature(s) {[it['feature'] for it in p]}",
            quiet=lambda: bool(asker.stopped),
        )
    return got
