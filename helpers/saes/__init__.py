"""Notebook 03: sparse autoencoders, trained per layer and condition, saved in the SAELens format.

    base.py       the SAE contract: parameters, decoder, SAELens tensors, the training step's interface
    kernels.py    the sparse maths of a training step (Pattern, gather_pre, sparse_decode, batch_topk)
    standard.py, topk.py, batchtopk.py, matryoshka_batchtopk.py, jumprelu.py, gated.py
                  one file per architecture; registry.py names them
    io.py         save/load SAELens 6.x folders (ours and published ones)
    train.py      the one training loop for every architecture, checkpoint/resume; its data sources
    evals.py      explained variance, L0, dead/dense fractions, spliced-in CE/KL, the leaderboard
    pipeline.py   the layer x condition x architecture (x L0) grid of a run; importing published SAEs
    hub.py        publishing SAEs to the Hugging Face Hub with a model card
    random_control.py  random-weight SAEs of the same class and L0 (arXiv 2602.14111), the probing control
    handoff.py    beyond one GPU: a layer as SAELens's cached-activations dataset or SAETrainer's data, the
                  corpus as sparsify's token file and its command; their SAEs imported back into saes/
    sparsify_main.py  `python -m helpers.saes.sparsify_main`: sparsify's CLI with our nanochat class loadable

The names notebook 03 uses are re-exported here.
"""

from helpers.saes.base import SAE, StepOutput
from helpers.saes.batchtopk import BatchTopKSAE
from helpers.saes.evals import evaluate_lm, leaderboard
from helpers.saes.gated import GatedSAE
from helpers.saes.io import LoadedSAE, find_sae_folders, load_sae, save_sae
from helpers.saes.jumprelu import JumpReLUSAE
from helpers.saes.matryoshka_batchtopk import MatryoshkaBatchTopKSAE
from helpers.saes.pipeline import GridSettings, import_sae, run_saes, train_grid
from helpers.saes.random_control import l0_on, random_sae_like
from helpers.saes.registry import ARCHITECTURES, make_sae, sae_class
from helpers.saes.standard import StandardSAE
from helpers.saes.topk import TopKSAE
from helpers.saes.train import TrainConfig

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "GridSettings",
    "GatedSAE",
    "JumpReLUSAE",
    "LoadedSAE",
    "MatryoshkaBatchTopKSAE",
    "StandardSAE",
    "StepOutput",
    "TopKSAE",
    "TrainConfig",
    "evaluate_lm",
    "find_sae_folders",
    "import_sae",
    "l0_on",
    "leaderboard",
    "load_sae",
    "make_sae",
    "random_sae_like",
    "run_saes",
    "sae_class",
    "save_sae",
    "train_grid",
]
