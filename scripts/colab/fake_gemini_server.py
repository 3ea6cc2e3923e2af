"""The Colab rehearsal's Gemini: tests/fake_gemini.py's `FakeGemini` with a handler that answers the
package's real requests, deterministically, and remembers every answer so the rehearsal can check
that what the notebooks saved is what "Gemini" said.

Three kinds of request reach it, told apart by the property names of the request's response schema
(not by prompt wording; `grep -rn response_schema helpers/` finds where the package builds them):

- the judge (notebooks 02 and 05, helpers/collect/judge.py): items with an `id`; answered
  `{"labels": [{"id", "label", "confidence", "reason"}]}`, the label chosen by a hash of the id
  (honest or deceptive), so the same completion id always gets the same label;
- autointerp's explanations (notebook 04, helpers/analysis/autointerp.py): items with a `feature`
  number; answered `{"features": [{"feature", "explanation", "deception_related", "kind"}]}`, the
  explanation naming a hash of the item, so each one is unique and traceable;
- autointerp's detection and fuzzing scores (helpers/analysis/scoring.py): items with a `feature` and
  numbered `windows`; answered `{"features": [{"feature", "scores": [{"window", "score"}]}]}`.

The items are read from the JSON list after the prompt's `ITEMS:` line, which the judge and the
feature batching both write. Enums (labels, kinds) are taken from the request's schema. Every item of
a request is answered (ids unchanged), so the package never needs a follow-up. A request without the
secret's key gets the API's 400; one the handler does not recognise gets a 400 and is kept in
`unrecognised`, for the rehearsal to report.

tests/fake_gemini.py imports pytest at the top (for its fixture helpers); when pytest is not
installed, a placeholder module stands in during that import only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import threading
import types
from collections import Counter
from pathlib import Path
from typing import Any

LABELS = ("honest", "deceptive")
"""What the fake judge answers (both classes, so notebooks 03 and 04 have something to train on)."""


def load_fake_gemini(path: Path) -> types.ModuleType:
    """tests/fake_gemini.py imported by path (it is not a package module)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the rehearsal's Gemini pass needs tests/fake_gemini.py")
    placeholder = None
    if importlib.util.find_spec("pytest") is None:
        placeholder = sys.modules["pytest"] = types.ModuleType("pytest")
    try:
        spec = importlib.util.spec_from_file_location("rehearsal_fake_gemini", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    finally:
        if placeholder is not None and sys.modules.get("pytest") is placeholder:
            del sys.modules["pytest"]
    return module


def _digest(*parts: Any) -> int:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def schema_properties(schema: Any) -> set[str]:
    """Every property name anywhere in a JSON / OpenAPI schema (nested objects, $defs, items)."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                found.update(value)
            found |= schema_properties(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= schema_properties(value)
    return found


def schema_enum(schema: Any, prop: str) -> list[str] | None:
    """The enum of property `prop` somewhere in `schema` (following local $refs), if any."""
    defs: dict[str, Any] = {}

    def collect_defs(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("$defs", "definitions"):
                if isinstance(node.get(key), dict):
                    defs.update(node[key])
            for value in node.values():
                collect_defs(value)
        elif isinstance(node, list):
            for value in node:
                collect_defs(value)

    def enum_in(node: Any) -> list[str] | None:
        if not isinstance(node, dict):
            return None
        if isinstance(node.get("enum"), list):
            return node["enum"]
        if isinstance(node.get("$ref"), str):
            return enum_in(defs.get(node["$ref"].rsplit("/", 1)[-1]))
        for key in ("anyOf", "oneOf", "allOf"):
            for option in node.get(key) or []:
                if (found := enum_in(option)) is not None:
                    return found
        return None

    def search(node: Any) -> list[str] | None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and prop in props and (found := enum_in(props[prop])) is not None:
                return found
            for value in node.values():
                if (found := search(value)) is not None:
                    return found
        elif isinstance(node, list):
            for value in node:
                if (found := search(value)) is not None:
                    return found
        return None

    collect_defs(schema)
    return search(schema)


def request_schema(generation_config: dict[str, Any]) -> Any:
    """The response schema as the SDK sent it (responseSchema or responseJsonSchema, either case)."""
    for key in ("responseJsonSchema", "response_json_schema", "responseSchema", "response_schema"):
        if generation_config.get(key) is not None:
            return generation_config[key]
    return None


def prompt_items(prompt: str) -> list[dict[str, Any]]:
    """The JSON list after the prompt's `ITEMS:` line."""
    marker = "ITEMS:\n"
    at = prompt.find(marker)
    if at < 0:
        raise ValueError("the prompt has no 'ITEMS:' line")
    items = json.loads(prompt[at + len(marker) :])
    if not isinstance(items, list):
        raise ValueError("the items after 'ITEMS:' are not a JSON list")
    return items


class RehearsalGemini:
    """A running FakeGemini whose handler answers judge, explanation and scoring requests."""

    def __init__(self, fake_module: types.ModuleType, models: set[str], api_key: str) -> None:
        self._fake = fake_module
        self.api_key = api_key
        self.server = fake_module.FakeGemini(models=tuple(sorted(models)), handler=self.handle)
        self._lock = threading.Lock()
        self.labels: dict[str, str] = {}
        """Completion id -> the label answered."""
        self.explanations: dict[int, set[str]] = {}
        """Feature number -> every explanation answered for a feature of that number (any SAE)."""
        self.scores: dict[int, list[list[float]]] = {}
        """Feature number -> every list of window scores answered, in window order."""
        self.kinds: Counter[str] = Counter()
        self.unrecognised: list[str] = []
        self.wrong_key = 0

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Any]:
        return self.server.requests

    def start(self) -> RehearsalGemini:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def handle(self, request: Any) -> Any:
        if request.headers.get("x-goog-api-key") != self.api_key:
            with self._lock:
                self.wrong_key += 1
            return self._fake.Reply(
                400,
                {
                    "error": {
                        "code": 400,
                        "status": "INVALID_ARGUMENT",
                        "message": "API key not valid. Please pass a valid API key.",
                    }
                },
            )
        schema = request_schema(request.generation_config)
        props = schema_properties(schema)
        try:
            items = prompt_items(request.prompt)
            if {"labels", "id", "label"} <= props:
                kind, answer = "judge", self._judge(items, schema)
            elif {"features", "explanation"} <= props:
                kind, answer = "explain", self._explain(items, schema)
            elif {"features", "scores", "window"} <= props:
                kind, answer = "score", self._score(items)
            else:
                raise ValueError(f"no handler for a response schema with properties {sorted(props)}")
        except (ValueError, KeyError, TypeError) as err:
            message = f"fake gemini: cannot answer this request ({type(err).__name__}: {err})"
            with self._lock:
                self.unrecognised.append(f"{message}; prompt starts {request.prompt[:120]!r}")
            # 400, not 500: the client retries a 5xx with growing waits; a 400 stops the notebook at once
            return self._fake.Reply(
                400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": message}}
            )
        with self._lock:
            self.kinds[kind] += 1
        return self._fake.json_reply(answer)

    def _judge(self, items: list[dict[str, Any]], schema: Any) -> dict[str, Any]:
        allowed = schema_enum(schema, "label")
        if allowed is not None and not set(LABELS) <= set(allowed):
            raise ValueError(f"the judge's label enum {allowed} lacks {LABELS}")
        out = []
        for it in items:
            item_id = str(it["id"])
            label = LABELS[_digest("label", item_id) % len(LABELS)]
            with self._lock:
                self.labels[item_id] = label
            out.append(
                {
                    "id": item_id,
                    "label": label,
                    "confidence": 0.9,
                    "reason": f"rehearsal judge: label chosen by a hash of id {item_id}",
                }
            )
        return {"labels": out}

    def _explain(self, items: list[dict[str, Any]], schema: Any) -> dict[str, Any]:
        related = schema_enum(schema, "deception_related") or ["yes", "no", "unclear"]
        kinds = schema_enum(schema, "kind") or ["other"]
        out = []
        for it in items:
            feature = int(it["feature"])
            h = _digest("explain", it)
            pattern = f"{h % 10**8:08d}"
            text = (
                f"Tokens of the rehearsal's text pattern {pattern} (fake explanation of feature {feature})."
            )
            with self._lock:
                self.explanations.setdefault(feature, set()).add(text)
            out.append(
                {
                    "feature": feature,
                    "explanation": text,
                    "deception_related": related[h % len(related)],
                    "kind": kinds[h % len(kinds)],
                }
            )
        return {"features": out}

    def _score(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        out = []
        for it in items:
            feature = int(it["feature"])
            scores = [
                {
                    "window": int(w["window"]),
                    "score": (_digest("score", feature, it.get("explanation"), w) % 101) / 100,
                }
                for w in it["windows"]
            ]
            with self._lock:
                self.scores.setdefault(feature, []).append([s["score"] for s in scores])
            out.append({"feature": feature, "scores": scores})
        return {"features": out}
