"""Notebook 01: the model. Loading any checkpoint (`load.py`), native nanochat checkpoints (`nanochat.py`),
chat formatting and stop tokens (`chat.py`), and every hook of the package (`hooks.py`:
`blocks.{i}.hook_resid_post` mapped to modules in one place). The main names are re-exported by `helpers`.
"""
