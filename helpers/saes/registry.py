"""The registry of SAE architectures, keyed by the name SAELens writes in cfg.json (one file each).

    ARCHITECTURES["topk"]      TopKSAE      Gao et al. 2024 (k active latents, AuxK for dead latents)
    ARCHITECTURES["jumprelu"]  JumpReLUSAE  Rajamanoharan et al. 2024b (learned thresholds, L0 loss, STE)
    ARCHITECTURES["gated"]     GatedSAE     Rajamanoharan et al. 2024a (gate/magnitude paths, r_mag)

All share `base.SAE`: `encode(x) -> (acts, pre_acts)`, `decode(acts)`, and `losses(x, dead)` (the sparse
training forward pass with the architecture's auxiliary losses), so `train.py` has one loop.
"""

from __future__ import annotations

from helpers.saes.base import SAE
from helpers.saes.gated import GatedSAE
from helpers.saes.jumprelu import JumpReLUSAE
from helpers.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {cls.architecture: cls for cls in (TopKSAE, JumpReLUSAE, GatedSAE)}


def sae_class(arch: str) -> type[SAE]:
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown SAE architecture {arch!r}: known ones are {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def make_sae(arch: str, d_in: int, d_sae: int, **kw) -> SAE:
    """A fresh SAE of architecture `arch` ("topk", "jumprelu", "gated"); `kw` go to its constructor
    (every architecture takes `l0`, the sparsity target, and `seed`)."""
    return sae_class(arch)(d_in, d_sae, **kw)
