"""train.clip_grad_norm, the trainer's gradient clipping: torch.nn.utils.clip_grad_norm_'s answer, bitwise."""

from __future__ import annotations

import torch

from helpers.saes.train import clip_grad_norm


def test_clip_grad_norm_is_torchs():
    """Gradients above and below the limit, and a parameter without a gradient: the same norm and the same
    clipped gradients as torch.nn.utils.clip_grad_norm_."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.001, 100.0):  # total norms ~0.04 and ~4,000
        ours = [torch.nn.Parameter(torch.zeros(s)) for s in ((96, 16), (96,), (16,), (3,))]
        for p in ours[:3]:
            p.grad = scale * torch.randn(p.shape, generator=g)
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        for p, q in zip(ours, theirs, strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        norm = clip_grad_norm(ours, 1.0)
        assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs, 1.0))
        for p, q in zip(ours[:3], theirs[:3], strict=True):
            assert torch.equal(p.grad, q.grad)
        assert (float(norm) > 1.0) == (scale > 1) and ours[3].grad is None
