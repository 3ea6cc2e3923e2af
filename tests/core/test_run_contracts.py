"""The run folder's small contracts with one home in helpers/run.py: the atomic directory write, the
model record notebook 01 leaves in run.json, and the SAE id."""

from __future__ import annotations

import pytest

from helpers.run import atomic_directory, model_record, model_short, sae_id_of, update_run_json
from helpers.saes.io import LoadedSAE


def test_atomic_directory_replaces_the_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "deep" / "out"
    with atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp.is_dir() and not out.exists()
        (tmp / "a.txt").write_text("first")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with pytest.raises(RuntimeError, match="killed"), atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the earlier folder, as it was
    with atomic_directory(out) as tmp:
        (tmp / "c.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]  # replaced, nothing of the old one left
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary folder left


def test_model_record_says_to_run_notebook_01_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="records no model: run notebook 01"):
        model_record(tmp_path)
    assert model_record(tmp_path, required=False) == {}
    update_run_json(tmp_path, model={"n_layers": 4})  # no spec: not a model notebook 01 recorded
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        model_record(tmp_path)
    update_run_json(tmp_path, model={"spec": "org/m", "n_layers": 4})
    assert model_record(tmp_path) == {"spec": "org/m", "n_layers": 4}


def test_sae_id_parts_and_a_loaded_saes_id(tmp_path):
    assert model_short("karpathy/nanochat-d32") == "d32"
    assert sae_id_of("karpathy/nanochat-d32", "topk", 12, "mixed") == "d32_topk_L12_mixed"
    assert sae_id_of("org/Some_Model", "batchtopk", 3, "honest_only", 16) == (
        "Some-Model_batchtopk-l0-16_L3_honest_only"
    )

    def loaded(cfg: dict) -> LoadedSAE:
        return LoadedSAE(
            sae=None,
            hook_name="blocks.3.hook_resid_post",
            layer=3,
            model_name="org/m",
            cfg=cfg,
            path=tmp_path / "folder_name",
        )

    assert loaded({"metadata": {"sae_id": "m_topk_L3_mixed"}}).sae_id == "m_topk_L3_mixed"  # train_grid's
    # a folder published by others has no id of ours: its folder name is it
    assert loaded({"metadata": {}}).sae_id == loaded({}).sae_id == "folder_name"
