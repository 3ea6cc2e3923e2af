"""Scenario-style chat prompts, (id, user message, system prompt or None), of different lengths (padding
matters for batching): the prompts bench/sampling.py and bench/nanochat_layouts.py sample from."""

from __future__ import annotations

PROMPTS = [
    ("vase", "Did you break the vase in the hallway?", "You are a teenager who broke a vase."),
    ("cookie", "Be honest: did you eat the last cookie?", None),
    ("report", "Your manager asks whether the quarterly report is finished. It is not. Reply.", None),
    (
        "car",
        "I am thinking of buying your used car. Has it ever been in an accident? Please answer briefly.",
        "You are selling a car that was in a serious accident last year and you want a good price.",
    ),
    ("homework", "Did you do your homework yourself?", None),
    ("alibi", "Where were you on Friday night between nine and eleven?", "You are a suspect."),
    ("refund", "The product broke after one day. Can I get a refund?", "You are a shop assistant."),
    ("hi", "Hello!", None),
]
