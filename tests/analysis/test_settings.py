"""Notebook 04's settings objects (`ProbeTableSettings`, `FeatureSettings`, `ProbeSettings`,
`AutointerpSettings`): single fields as keywords win over a whole settings object, and an unknown name is
refused with the field list before anything is read or written."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.analysis import probes
from helpers.analysis.pipeline import FeatureSettings, ProbeTableSettings, feature_table, probe_table
from helpers.analysis.scoring import score_explanations


def test_keywords_override_the_settings_object():
    base = ProbeTableSettings(n_folds=3, seed=7)
    assert base.with_overrides({"seed": 1}) == ProbeTableSettings(n_folds=3, seed=1)
    assert FeatureSettings().with_overrides({"k": 5}).k == 5
    with pytest.raises(ValueError, match="pooling must be one of"):
        base.with_overrides({"pooling": "max"})


def test_unknown_names_are_refused_with_the_field_list(tmp_path):
    missing = tmp_path / "no_run"  # refused before the run folder is touched
    with pytest.raises(TypeError, match=r"\['nfolds'\].*probe table settings are \['pooling', 'n_folds'"):
        probe_table(missing, [0], nfolds=3)
    with pytest.raises(TypeError, match=r"\['top_k'\].*feature settings are \['k', 'seed'"):
        feature_table(missing, tmp_path / "no_sae", top_k=3)
    with pytest.raises(TypeError, match=r"\['folds'\].*probe settings are \['n_folds'"):
        probes.bag_of_words_probe(["a b"] * 4, np.array([0, 1, 0, 1]), [0, 0, 1, 1], folds=2)
    with pytest.raises(TypeError, match=r"\['folds'\].*probe settings are \['n_folds'"):
        probes.probe(np.zeros((4, 2)), np.array([0, 1, 0, 1]), [0, 0, 1, 1], folds=2)
    with pytest.raises(TypeError, match=r"\['fuzz'\].*autointerp settings are \['features_per_request'"):
        score_explanations([], {}, None, fuzz=False)
    assert not missing.exists()


def test_probe_settings_object_equals_keywords():
    rng = np.random.default_rng(1)
    y = np.tile([0, 1], 24)
    groups = np.repeat(np.arange(12), 4)
    X = rng.standard_normal((48, 5)) + 0.8 * y[:, None]
    settings = probes.ProbeSettings(n_folds=3, n_permutations=9, n_bootstrap=5, seed=2, C=0.5)
    a = probes.probe(X, y, groups, settings=settings, name="raw")
    b = probes.probe(X, y, groups, n_folds=3, n_permutations=9, n_bootstrap=5, seed=2, C=0.5, name="raw")
    c = probes.probe(X, y, groups, settings=settings, seed=3)
    assert a.to_dict() == b.to_dict() and np.array_equal(a.boot_ba, b.boot_ba)
    assert (a.details["seed"], c.details["seed"]) == (2, 3) and a.fold_signature != c.fold_signature


def test_bag_of_words_settings_object_equals_keywords():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 48)
    groups = np.repeat(np.arange(12), 4)
    texts = [" ".join(rng.choice([f"w{i}" for i in range(20)], 6)) + (" frankly" if v else "") for v in y]
    settings = probes.ProbeSettings(n_folds=3, n_permutations=9, n_bootstrap=5, seed=2)
    a = probes.bag_of_words_probe(texts, y, groups, settings=settings)
    b = probes.bag_of_words_probe(texts, y, groups, n_folds=3, n_permutations=9, n_bootstrap=5, seed=2)
    c = probes.bag_of_words_probe(texts, y, groups, settings=settings, seed=3)
    assert a.to_dict() == b.to_dict()
    assert a.details["top_terms"] == c.details["top_terms"] and not np.array_equal(a.boot_ba, c.boot_ba)
