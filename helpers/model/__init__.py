"""Notebook 01: the model. Loading any checkpoint (`load.py`), native nanochat checkpoints of every layout
(`nanochat.py` converts them; `nanochat_layouts.py` tells the layouts apart and what each implies;
`nanochat_gpt.py` is our model class for the 2026 layouts), chat formatting and stop tokens (`chat.py`), and
every hook of the package (`hooks.py`: `blocks.{i}.hook_resid_post` mapped to modules in one place). The
main names are re-exported by `helpers`.
"""
