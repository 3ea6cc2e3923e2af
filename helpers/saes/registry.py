"""The registry of SAE architectures, keyed by the name SAELens uses for training them (one file each).

    ARCHITECTURES[key]   class                  method
    standard             StandardSAE            ReLU + decoder-norm-weighted L1 (Bricken et al. 2023)
    topk                 TopKSAE                Gao et al. 2024 (k active latents, AuxK for dead latents)
    batchtopk            BatchTopKSAE           Bussmann et al. 2024 (k per token on average over a batch)
    matryoshka_batchtopk MatryoshkaBatchTopKSAE Bussmann et al. 2025 (nested prefixes)
    jumprelu             JumpReLUSAE            Rajamanoharan et al. 2024b (learned thresholds, L0 loss, STE)
    gated                GatedSAE               Rajamanoharan et al. 2024a (gate/magnitude paths, r_mag)

All share `base.SAE`: `encode(x) -> (acts, pre_acts)`, `decode(acts)`, and `losses(x, dead)` (the sparse
training forward pass with the architecture's auxiliary losses), so `train.py` has one loop. BatchTopK and
Matryoshka are saved as `jumprelu` (their `saved_architecture`), as SAELens saves them.
"""

from __future__ import annotations

from helpers.saes.base import SAE
from helpers.saes.batchtopk import BatchTopKSAE
from helpers.saes.gated import GatedSAE
from helpers.saes.jumprelu import JumpReLUSAE
from helpers.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from helpers.saes.standard import StandardSAE
from helpers.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    cls.architecture: cls
    for cls in (StandardSAE, TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReLUSAE, GatedSAE)
}


def sae_class(arch: str) -> type[SAE]:
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown SAE architecture {arch!r}: known ones are {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def make_sae(arch: str, d_in: int, d_sae: int, **kw) -> SAE:
    """A fresh SAE of architecture `arch` (a key of ARCHITECTURES); `kw` go to its constructor (every
    architecture takes `l0`, the sparsity target, and `seed`)."""
    return sae_class(arch)(d_in, d_sae, **kw)
