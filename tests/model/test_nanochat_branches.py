"""nanochat's side branches and unmerged PRs (../shared/oracles/nanochat): a tiny checkpoint built and saved
with upstream's own code at each commit is refused by `load_model` with a message naming the feature and
the commit, and nothing is converted. MoE (moe3, 3a76bb9), widening (PR #807, 4197e95), hyper-connections
(PR #812, 83ba923)."""

from __future__ import annotations

import pytest
import torch

import helpers
from helpers.model import nanochat_layouts as L
from tests.model.nanochat_oracle import import_oracle, save_native, tiny_encoding

BASE = dict(sequence_len=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
BRANCHES = {
    "2026-07-03-3a76bb9-moe3": (
        dict(num_experts=4, top_k=2),
        r"mixture-of-experts MLP \(branch moe3, commit 3a76bb9",
    ),
    "2026-07-13-4197e95-widening": (dict(n_token_embd=32), r"widening \(PR #807, commit 4197e95"),
    "2026-07-22-83ba923-hyperconn": (
        dict(hc_rate=2, hc_dynamic=True),
        r"hyper-connections \(PR #812, commit 83ba923",
    ),
}


@pytest.mark.parametrize("commit", sorted(BRANCHES))
def test_each_branch_checkpoint_is_refused_by_name(commit, tmp_path):
    extra, message = BRANCHES[commit]
    gpt = import_oracle(commit)
    config = dict(BASE, **extra, vocab_size=tiny_encoding().n_vocab)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**config))
    model.to_empty(device="cpu")
    model.init_weights()
    folder = save_native(model, config, tmp_path / "native")
    with pytest.raises(L.UnknownLayoutError, match=message + r".*nothing was converted"):
        helpers.load_model(str(folder), device="cpu", cache_dir=tmp_path / "cache")
    converted = tmp_path / "cache" / "converted"
    assert not converted.exists() or not [p for p in converted.iterdir() if any(p.iterdir())]


def test_main_branch_layouts_are_not_taken_for_a_branch():
    for layout in L.LAYOUTS:
        shapes = {k: (8, 8) for k in layout.expected_keys(4)}
        L.refuse_branches(shapes)  # no error
