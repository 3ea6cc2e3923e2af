"""The grid's corpus conditions and L0 sweep: `corpus` and `corpus+behaviour` train from the stored
reference corpus (or a stream of it), every SAE is evaluated on the same held-out behaviour tokens and on
held-out corpus text, mixed batches hold each source's share, and missing data is skipped with the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import helpers
from helpers import plots
from helpers.collect.completions import analysis_split, read_completions
from helpers.collect.corpus import BUILTIN_CORPUS, CorpusStream, collect_corpus, corpus_ids
from helpers.collect.store import LayerStore
from helpers.env import NotebookError
from helpers.run import mark_stage, read_run_json, settings_hash, update_run_json
from helpers.saes.io import save_sae
from helpers.saes.pipeline import GridSettings, run_saes, sae_id_of, sae_release_flag, train_grid
from helpers.saes.registry import make_sae
from helpers.saes.train import MixedData, StoreData
from tests.saes.test_train import LAYER, shared_run, small_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def copy_run(src, dst, with_behaviour: bool = True):
    dst.mkdir(parents=True)
    shutil.copy(src / "run.json", dst / "run.json")
    if with_behaviour:
        (dst / "completions.jsonl").symlink_to(src / "completions.jsonl")
        (dst / "activations").symlink_to(src / "activations")
    return dst


@pytest.fixture(scope="module")
def corpus_run(offline_lm, tmp_path_factory):
    """The shared behaviour run plus ~4k tokens of the shipped corpus at the same layer."""
    run = copy_run(shared_run(offline_lm, tmp_path_factory), tmp_path_factory.mktemp("corpus_run") / "run")
    collect_corpus(offline_lm, BUILTIN_CORPUS, [LAYER], run, max_tokens=4000, seq_len=64, batch_size=8)
    return run


def test_corpus_conditions_and_an_l0_sweep_train_evaluate_and_resume(corpus_run):
    cfg = small_cfg(train_tokens=16 * 64)
    kw = dict(min_completions=4, min_tokens=500, l0s=[4, 8])
    conditions = ["corpus", "corpus+behaviour"]
    status = train_grid(corpus_run, [LAYER], ["topk"], conditions, cfg, **kw)
    spec = read_run_json(corpus_run)["model"]["spec"]
    assert [r["sae_id"] for r in status] == [
        sae_id_of(spec, "topk", LAYER, c, l0) for c in conditions for l0 in (4, 8)
    ]
    assert status[0]["sae_id"].endswith(f"_topk-l0-4_L{LAYER}_corpus")
    assert {r["status"] for r in status} == {"trained"}
    behaviour_tokens, (store, _, held) = None, corpus_ids(corpus_run, LAYER)
    for r in status:
        m = json.loads((corpus_run / "saes" / r["sae_id"] / "metrics.json").read_text())
        assert m["training"]["config"]["l0"] == r["l0_target"] and m["condition"] == r["condition"]
        # One yardstick for every condition: the held-out behaviour completions, and held-out corpus text.
        behaviour_tokens = behaviour_tokens or m["activations"]["n_tokens"]
        assert m["activations"]["n_tokens"] == behaviour_tokens
        assert m["corpus_activations"]["n_tokens"] == store.count(held) > 0
        if r["architecture"] == "topk":
            assert m["activations"]["l0"] == pytest.approx(r["l0_target"])
    assert json.loads((corpus_run / "saes" / status[0]["sae_id"] / "metrics.json").read_text())[
        "dataset_path"
    ].endswith("corpus/")
    again = train_grid(corpus_run, [LAYER], ["topk"], conditions, cfg, **kw)
    assert {r["status"] for r in again} == {"done earlier"}
    # The Pareto view: one line per architecture / condition through its L0s, for EV and the CE score.
    fig = plots.sae_pareto_figure(corpus_run)
    lines = [t for t in fig.data if t.xaxis == "x"]
    assert {t.name for t in lines} == {f"topk / {c}" for c in conditions}
    assert all(len(t.x) == 2 and t.x[0] < t.x[1] for t in lines), "each line runs through its sweep by L0"
    assert len(plots.sae_pareto_figure(corpus_run, backend="matplotlib").axes[1].lines) == 2


def test_mixed_batches_hold_each_sources_share(corpus_run):
    store, train, _ = corpus_ids(corpus_run, LAYER)
    behaviour = LayerStore(corpus_run, LAYER)
    mix = MixedData([(StoreData(store, train), 0.75), (StoreData(behaviour), 0.25)])
    assert (
        mix.sizes(64) == [48, 16]
        and mix.sizes(10) == [8, 2]
        and mix.count() == store.count(train) + behaviour.n_tokens
    )
    from_corpus = {r.tobytes() for i in train for r in store.tokens_of(i)}
    it = mix.batches(small_cfg(), 0)
    for _ in range(5):
        x = next(it).numpy()
        assert x.shape == (64, 576)
        assert all(r.tobytes() in from_corpus for r in x[:48]) and not any(
            r.tobytes() in from_corpus for r in x[48:]
        )
    with pytest.raises(ValueError, match="shares"):
        MixedData([(StoreData(store), 0.0)])


def test_the_corpus_condition_streams_when_nothing_is_stored(offline_lm, corpus_run, tmp_path):
    """No corpus/ in the run: the corpus SAE trains from forward passes through a bounded buffer and is
    evaluated on the same held-out behaviour tokens as the stored-corpus SAEs."""
    run = copy_run(corpus_run, tmp_path / "run")
    made = []

    def stream(layer):
        made.append(layer)
        return CorpusStream(offline_lm, BUILTIN_CORPUS, layer, seq_len=64, batch_size=8, buffer_tokens=512)

    status = train_grid(
        run,
        [LAYER],
        ["topk"],
        ["corpus", "corpus+behaviour"],
        small_cfg(train_tokens=12 * 64),
        min_completions=4,
        min_tokens=500,
        corpus_stream=stream,
    )
    assert [r["status"] for r in status] == ["trained", "trained"] and made == [LAYER], "one stream per layer"
    m = json.loads((run / "saes" / status[0]["sae_id"] / "metrics.json").read_text())
    # The same SAE trained from the stored corpus, for its yardstick.
    stored_run = copy_run(corpus_run, tmp_path / "stored")
    (stored_run / "corpus").symlink_to(corpus_run / "corpus")
    (row,) = train_grid(
        stored_run, [LAYER], ["topk"], ["corpus"], small_cfg(), min_completions=4, min_tokens=500
    )
    stored = json.loads((stored_run / "saes" / row["sae_id"] / "metrics.json").read_text())
    assert m["activations"]["n_tokens"] == stored["activations"]["n_tokens"]
    assert "corpus_activations" not in m, "no stored corpus to evaluate on"
    assert np.isfinite(m["activations"]["explained_variance"])


def test_missing_corpus_is_skipped_and_a_corpus_only_run_evaluates_on_held_out_text(
    offline_lm, corpus_run, tmp_path, capsys
):
    bare = copy_run(corpus_run, tmp_path / "bare")
    status = train_grid(
        bare, [LAYER], ["topk"], ["corpus", "mixed"], small_cfg(), min_completions=4, min_tokens=500
    )
    assert [r["status"] for r in status] == ["skipped", "trained"]
    assert "no reference corpus at layer 2: collect one in notebook 02" in status[0]["reason"]
    assert "skipping corpus at layer 2" in capsys.readouterr().out

    only = copy_run(corpus_run, tmp_path / "only", with_behaviour=False)
    (only / "corpus").symlink_to(corpus_run / "corpus")
    with pytest.raises(FileNotFoundError, match="completions.jsonl is missing"):
        train_grid(only, [LAYER], ["topk"], ["corpus+behaviour"], small_cfg(), min_tokens=500)
    (row,) = train_grid(only, [LAYER], ["topk"], ["corpus"], small_cfg(), min_tokens=500)
    store, _, held = corpus_ids(only, LAYER)
    m = json.loads((only / "saes" / row["sae_id"] / "metrics.json").read_text())
    assert m["activations"]["n_tokens"] == store.count(held) == m["corpus_activations"]["n_tokens"]
    with pytest.raises(ValueError, match=r"unknown condition\(s\) \['corpora'\]"):
        train_grid(only, [LAYER], ["topk"], ["corpora"], small_cfg())


def test_no_sae_trains_on_the_groups_reserved_for_analysis(offline_lm, tmp_path_factory, monkeypatch):
    """Notebook 04 probes and tests features on `completions.analysis_split`'s groups: no SAE of any
    behaviour condition may train on them (a deceptive_only SAE would otherwise be tested on rows chosen
    by their label that it learned), and each SAE records the split it skipped."""
    run = shared_run(offline_lm, tmp_path_factory)
    seen = {}

    def fake_train(data, cfg, out, *, metadata, **_):
        seen[metadata["condition"]] = (set(data.ids), metadata["analysis_split"])
        return {"activations": {"explained_variance": 0.5, "l0": 4.0, "dead_fraction": 0.0}}

    monkeypatch.setattr("helpers.saes.pipeline.train_sae", fake_train)
    conditions = ["mixed", "deceptive_only", "honest_only"]
    train_grid(run, [LAYER], ["topk"], conditions, small_cfg(), min_completions=1, min_tokens=1)
    reserved = set(analysis_split(read_completions(run), seed=small_cfg().seed)[1])
    assert reserved and set(seen) == set(conditions)
    for ids, split in seen.values():
        assert ids and not ids & reserved and split == {"fraction": 0.5, "seed": small_cfg().seed}


def test_a_layer_notebook_02_did_not_collect_is_one_error_listing_the_collected_ones(
    offline_lm, tmp_path_factory, tmp_path
):
    run = copy_run(shared_run(offline_lm, tmp_path_factory), tmp_path / "run")
    for layers in ([LAYER, 9], []):  # was: "run notebook 02 first" per SAE, then an IndexError
        with pytest.raises(
            NotebookError, match=r"(\[9\] that notebook 02 did not collect.*collected: \[2\]|no layers)"
        ):
            train_grid(run, layers, ["topk"], ["mixed"], small_cfg(), plan_only=True)
    assert not (run / "saes").exists()


def test_notebook_04_stops_when_notebook_03_has_not_finished_and_left_no_sae(tmp_path, capsys):
    run = tmp_path / "run"
    update_run_json(run, run_name="run")
    mark_stage(run, "03_train_saes", "started")
    before = (run / "run.json").read_bytes()
    with pytest.raises(
        NotebookError, match=r"no SAE in .*notebook 03 has not finished.*stage is started.*run notebook 03"
    ):
        run_saes(run)  # was: notebook 04 went on and marked itself done with 0 SAEs
    assert (run / "run.json").read_bytes() == before
    mark_stage(run, "03_train_saes", saes=[])  # 03 finished and trained none on purpose: 04 goes on
    assert run_saes(run) == [] and "only the residual-stream probes run" in capsys.readouterr().out


def test_sae_filter_matching_no_sae_lists_them(tmp_path, capsys):
    run = tmp_path / "run"
    update_run_json(run, run_name="run")
    save_sae(
        make_sae("topk", 8, 16, l0=2),
        run / "saes" / "m_topk_L2_mixed",
        hook_name="blocks.2.hook_resid_post",
        model_name="m",
    )
    with pytest.raises(NotebookError, match=r"SAE_FILTER 'honest' matches none.*m_topk_L2_mixed"):
        run_saes(run, "honest")
    assert [f.name for f in run_saes(run, "mixed")] == ["m_topk_L2_mixed"]
    assert "notebook 03 has not finished" in capsys.readouterr().out


def test_a_rerun_with_other_settings_stops_before_training_and_overwrite_retrains(
    offline_lm, tmp_path_factory, tmp_path
):
    """Issue 21: an SAE with a metrics.json was reused whatever its settings (LR, TRAIN_TOKENS, release)."""
    run = copy_run(shared_run(offline_lm, tmp_path_factory), tmp_path / "run")
    kw = dict(min_completions=4, min_tokens=64)
    cfg = small_cfg(train_tokens=8 * 64, checkpoint_every=4)
    (row,) = train_grid(run, [LAYER], ["topk"], ["mixed"], cfg, **kw)
    folder = run / "saes" / row["sae_id"]
    m = json.loads((folder / "metrics.json").read_text())
    assert m["package_version"] == helpers.__version__ and m["settings_hash"] == settings_hash(m["settings"])
    assert (
        m["settings"]["data"]["store"] == f"activations/layer_{LAYER}"
        and m["settings"]["training"]["lr"] == cfg.lr
    )
    assert sae_release_flag(run, row["sae_id"]) == ""

    def digest():
        return {p: p.read_bytes() for p in sorted((run / "saes").rglob("*")) if p.is_file()}

    before = digest()
    (again,) = train_grid(
        run, [LAYER], ["topk"], ["mixed"], small_cfg(train_tokens=8 * 64, checkpoint_every=2), **kw
    )
    assert again["status"] == "done earlier", "checkpoint_every does not change the SAE"
    for changed, line in (
        (dict(lr=3e-4), "training.lr: 0.001 → 0.0003"),
        (dict(train_tokens=16 * 64), "training.train_tokens: 512 → 1024"),
    ):
        for plan_only in (True, False):
            with pytest.raises(
                NotebookError, match=rf"(?s){row['sae_id']} \(finished, release .*{line}.*OVERWRITE"
            ):
                train_grid(
                    run,
                    [LAYER],
                    ["topk"],
                    ["mixed"],
                    small_cfg(**{"train_tokens": 8 * 64, **changed}),
                    plan_only=plan_only,
                    **kw,
                )
    assert digest() == before, "nothing trained or rewritten"
    # An SAE from before settings were recorded (release 0.1.0 at lr 3e-4) is compared on its training config.
    legacy = {k: v for k, v in m.items() if k not in ("settings", "settings_hash", "package_version")}
    legacy["training"] = {**m["training"], "config": {**m["training"]["config"], "lr": 3e-4}}
    (folder / "metrics.json").write_text(json.dumps(legacy))
    assert sae_release_flag(run, row["sae_id"]) == "release not recorded"
    with pytest.raises(NotebookError, match=r"(?s)release not recorded.*training.lr: 0.0003 → 0.001"):
        train_grid(run, [LAYER], ["topk"], ["mixed"], cfg, **kw)
    (redone,) = train_grid(run, [LAYER], ["topk"], ["mixed"], cfg, overwrite=True, **kw)
    assert redone["status"] == "trained"
    m2 = json.loads((folder / "metrics.json").read_text())
    assert m2["settings_hash"] == m["settings_hash"], "the same settings as the first training"
    assert (folder / "sae_weights.safetensors").read_bytes() == before[folder / "sae_weights.safetensors"]


def test_grid_settings_come_whole_or_as_keywords_and_unknown_names_are_refused(corpus_run, tmp_path):
    with pytest.raises(TypeError, match=r"\['min_token'\]: the grid settings are \['eval_fraction', "):
        train_grid(tmp_path, [LAYER], ["topk"], ["mixed"], small_cfg(), min_token=5)
    with pytest.raises(ValueError, match=r"behaviour_share must be in \(0, 1\), got 1.5"):
        train_grid(tmp_path, [LAYER], ["topk"], ["mixed"], small_cfg(), behaviour_share=1.5)
    kw = dict(min_completions=4, min_tokens=500, l0s=[4, 8], plan_only=True)
    whole = train_grid(corpus_run, [LAYER], ["topk"], ["mixed"], small_cfg(), grid=GridSettings(**kw))
    as_keywords = train_grid(corpus_run, [LAYER], ["topk"], ["mixed"], small_cfg(), **kw)
    assert whole == as_keywords and {r["status"] for r in whole} == {"to train"} and len(whole) == 2
    wins = train_grid(
        corpus_run, [LAYER], ["topk"], ["mixed"], small_cfg(), grid=GridSettings(**kw), l0s=None
    )
    assert len(wins) == 1, "a keyword wins over the settings object"
