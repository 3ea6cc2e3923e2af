"""SAELens as the training engine: our store exported in SAELens's cached-activations schema is read by
SAELens's own ActivationsStore (`use_cached_activations=True`) and trains an SAE with its SAETrainer;
our store as SAETrainer's data provider; the SAEs come back into the run folder and notebook 04's
feature analysis reads them. Bad input (missing layer, a folder of another export, a context longer than
the data, an SAELens release of unknown format) is refused with nothing overwritten."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import sae_lens
import torch
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LoggingConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer

from helpers.analysis.pipeline import feature_table
from helpers.collect.completions import ANALYSIS_FRACTION, analysis_split, read_completions
from helpers.collect.store import LayerStore
from helpers.run import SAE_METRICS, sae_dir
from helpers.saes import handoff
from helpers.saes.handoff import (
    EXPORT_MANIFEST,
    Selection,
    SparsifySettings,
    check_saelens_version,
    export_saelens_cache,
    import_saelens_sae,
    sparsify_command,
    store_batches,
)
from helpers.saes.io import load_sae
from tests.conftest import tiny_chat_llama
from tests.explore.fake_run import LAYER, make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CTX = 16


@pytest.fixture(scope="module")
def run(offline_lm, tmp_path_factory) -> Path:
    return make_run(
        tmp_path_factory.mktemp("handoff") / "run", tiny_chat_llama(offline_lm.tokenizer), with_analysis=False
    )


def selected_rows(selection: Selection) -> np.ndarray:
    """Every training row of the selection, float32, read straight from the store."""
    return np.concatenate([s.tokens_of(i) for _, s, ids in selection.sources() for i in ids])


def as_set(rows: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in np.ascontiguousarray(rows, np.float32)}


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def saelens_store(
    out: Path, manifest: dict, tokens: datasets.Dataset
) -> tuple[LanguageModelSAERunnerConfig, ActivationsStore]:
    """SAELens's own activations store on our export, built as its training runner builds it from a
    config with use_cached_activations=True (the token dataset is there because its constructor reads
    one; with a cache it trains from the cache)."""
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=manifest["d_in"], d_sae=64, k=4),
        hook_name=manifest["hook_name"],
        context_size=manifest["context_size"],
        use_cached_activations=True,
        cached_activations_path=str(out),
        dataset_path="",
        training_tokens=300 * 32,
        train_batch_size_tokens=32,
        lr=3e-3,  # 300 steps: a short run wants a larger step than the default 3e-4
        store_batch_size_prompts=2,
        n_batches_in_buffer=4,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        seed=0,
    )
    return cfg, ActivationsStore.from_config(None, cfg, override_dataset=tokens)


def test_saelens_reads_our_export_trains_on_it_and_the_sae_comes_back(run, offline_lm, tmp_path):
    sel = Selection(run, LAYER, kinds=("activations", "corpus"))
    out = tmp_path / "cache"
    # ~8 rows per Arrow file: several files, as a store larger than memory would give
    manifest = export_saelens_cache(sel, out, context_size=CTX, shard_bytes=8 * CTX * 32 * 4, progress=False)
    assert manifest["files"] > 2 and manifest["token_ids"]

    # The schema is SAELens's (cache_activations_runner.py): the same features, dataset_info.json as
    # save_to_disk writes it for them, and every exported token is a training row of the store.
    ds = datasets.load_from_disk(str(out))
    hook = f"blocks.{LAYER}.hook_resid_post"
    want = datasets.Features(
        {
            hook: datasets.Array2D(shape=(CTX, 32), dtype="float32"),
            "token_ids": datasets.Sequence(datasets.Value("int32"), length=CTX),
        }
    )
    assert ds.features == want and len(ds) == manifest["n_rows"]
    ref = tmp_path / "reference"
    datasets.Dataset.from_dict(
        {hook: np.zeros((1, CTX, 32), np.float32), "token_ids": np.zeros((1, CTX), np.int32)}, features=want
    ).save_to_disk(str(ref))
    assert json.loads((out / "dataset_info.json").read_text()) == json.loads(
        (ref / "dataset_info.json").read_text()
    )
    exported = np.asarray(ds.with_format("numpy")[hook]).reshape(-1, 32)
    rows = selected_rows(sel)
    assert len(exported) == manifest["n_tokens"] == len(rows) - manifest["tokens_dropped"]
    assert as_set(exported) <= as_set(rows)
    reserved = set(analysis_split(read_completions(run), ANALYSIS_FRACTION, 0)[1])
    store = LayerStore(run, LAYER)
    assert not as_set(exported) & as_set(
        np.concatenate([store.tokens_of(i) for i in reserved if i in store.entries])
    )
    # token ids travel with their rows: a corpus row's id is the one the corpus store holds for it
    ids = np.asarray(ds.with_format("numpy")["token_ids"]).reshape(-1)
    corpus = LayerStore(run, LAYER, kind="corpus")
    row_id = {
        r.tobytes(): t
        for i in corpus.completion_ids
        for r, t in zip(corpus.tokens_of(i), corpus.token_ids_of(i)[:, 0], strict=True)
    }
    hits = [(row_id[r.tobytes()], t) for r, t in zip(exported, ids, strict=True) if r.tobytes() in row_id]
    assert len(hits) > 100 and all(a == b for a, b in hits)

    # SAELens's activations store (use_cached_activations=True) serves our rows, and its trainer trains.
    tokens = datasets.Dataset.from_dict({"input_ids": ids.reshape(-1, CTX)[:4].tolist()})
    cfg, acts_store = saelens_store(out, manifest, tokens)
    first, _ = acts_store.get_raw_llm_batch()
    assert as_set(first.numpy()) <= as_set(rows)
    torch.manual_seed(0)
    sae = TopKTrainingSAE(cfg.sae)
    x = torch.from_numpy(rows[:256])
    before = ((sae(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    trained = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=acts_store).fit()
    assert trained.cfg.d_in == 32
    with torch.no_grad():
        after = ((trained(x) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert after < 0.5 * before  # 300 steps of 32 tokens learnt something

    saved = tmp_path / "saelens_sae"
    trained.save_inference_model(str(saved))
    sae_id = import_saelens_sae(saved, sel)
    assert sae_id == "tiny-llama_topk-saelens_L1_corpus+behaviour"
    folder = sae_dir(run, sae_id)
    metrics = json.loads((folder / SAE_METRICS).read_text())
    assert metrics["layer"] == LAYER and 0 < metrics["activations"]["l0"] <= 4
    assert metrics["analysis_split"] == {"fraction": ANALYSIS_FRACTION, "seed": 0}
    ours, theirs = load_sae(folder).sae, sae_lens.SAE.load_from_disk(str(saved))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x)[0], theirs.encode(x), rtol=1e-4, atol=1e-5)
    # notebook 04's feature analysis reads it like one of ours
    table = feature_table(
        run, folder, k=3, seed=0, tokenizer=offline_lm.tokenizer, n_permutations=49, n_controls=0
    )
    assert table and all("feature" in r for r in table)
    assert import_saelens_sae(saved, sel) == sae_id  # a second import keeps the first


def test_float16_export_and_our_store_as_saetrainers_data_provider(run, tmp_path):
    sel = Selection(run, LAYER, kinds=("corpus",))
    m32 = export_saelens_cache(sel, tmp_path / "f32", context_size=CTX, progress=False)
    m16 = export_saelens_cache(sel, tmp_path / "f16", context_size=CTX, dtype="float16", progress=False)
    assert m16["n_rows"] == m32["n_rows"]
    d16, d32 = (datasets.load_from_disk(str(tmp_path / n)) for n in ("f16", "f32"))
    assert d16.features[m16["hook_name"]].dtype == "float16"
    a, b = (np.asarray(d.with_format("numpy")[m16["hook_name"]]) for d in (d16, d32))
    assert np.array_equal(a, b)  # the store is float16: lossless
    size = {n: sum(p.stat().st_size for p in (tmp_path / n).glob("*.arrow")) for n in ("f16", "f32")}
    assert size["f16"] < 0.6 * size["f32"]

    rows = as_set(selected_rows(sel))
    batches = store_batches(sel, 32)
    seen = [next(batches) for _ in range(80)]  # several epochs of the ~1k training tokens
    assert all(b.shape == (32, 32) and b.dtype == torch.float32 for b in seen)
    assert as_set(torch.cat(seen).numpy()) == rows  # every training row, and nothing else
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4),
        hook_name=m16["hook_name"],
        training_tokens=200 * 32,
        train_batch_size_tokens=32,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    torch.manual_seed(0)
    trained = SAETrainer(
        cfg=cfg.to_sae_trainer_config(), sae=TopKTrainingSAE(cfg.sae), data_provider=batches
    ).fit()
    trained.save_inference_model(str(tmp_path / "sl"))
    sae_id = import_saelens_sae(tmp_path / "sl", sel)
    assert sae_id == "tiny-llama_topk-saelens_L1_corpus" and (sae_dir(run, sae_id) / SAE_METRICS).exists()


def test_an_interrupted_export_resumes_to_the_same_dataset(run, tmp_path, monkeypatch):
    sel = Selection(run, LAYER, kinds=("corpus",))
    whole = export_saelens_cache(sel, tmp_path / "whole", context_size=CTX, shard_bytes=4096, progress=False)
    real, calls = handoff._write_arrow, []

    def dies_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        real(*args)

    monkeypatch.setattr(handoff, "_write_arrow", dies_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        export_saelens_cache(sel, tmp_path / "cut", context_size=CTX, shard_bytes=4096, progress=False)
    assert not (tmp_path / "cut" / EXPORT_MANIFEST).exists()
    monkeypatch.setattr(handoff, "_write_arrow", real)
    assert (
        export_saelens_cache(sel, tmp_path / "cut", context_size=CTX, shard_bytes=4096, progress=False)
        == whole
    )
    cut, ref = folder_digest(tmp_path / "cut"), folder_digest(tmp_path / "whole")
    assert cut == ref and len(cut) == whole["files"] + 3  # arrow files, state, info, manifest


def test_bad_input_is_refused_and_nothing_is_overwritten(run, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"layer 0 has no activations store.*Layers with stored activations: \[1, 2\]"
    ):
        Selection(run, 0).sources()
    with pytest.raises(ValueError, match="corpus \\+ behaviour uses the mixed completions"):
        Selection(run, LAYER, kinds=("activations", "corpus"), condition="honest_only")
    sel = Selection(run, LAYER)
    with pytest.raises(ValueError, match="context_size 100000 is larger than the .* training tokens"):
        export_saelens_cache(sel, tmp_path / "big", context_size=100_000, progress=False)
    assert not (tmp_path / "big").exists()

    out = tmp_path / "cache"
    export_saelens_cache(sel, out, context_size=CTX, progress=False)
    before = folder_digest(out)
    with pytest.raises(
        FileExistsError, match=r"holds an export of other data or settings.*'layer': \(1, 2\)"
    ):
        export_saelens_cache(Selection(run, 2), out, context_size=CTX, progress=False)
    with pytest.raises(FileExistsError, match="context_size"):
        export_saelens_cache(sel, out, context_size=8, progress=False)
    assert folder_digest(out) == before
    assert export_saelens_cache(sel, out, context_size=CTX, progress=False)["layer"] == LAYER  # same: reused
    assert folder_digest(out) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no export"):
        export_saelens_cache(sel, foreign, context_size=CTX, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    with pytest.raises(ValueError, match=r"sae_lens 7.0.0 .*tested: 6.54.12"):
        check_saelens_version("7.0.0")
    with pytest.raises(ValueError, match=r"sae_lens 5.11.0 .*tested: 6.54.12"):
        export_saelens_cache(
            sel, tmp_path / "old", context_size=CTX, saelens_version="5.11.0", progress=False
        )
    assert not (tmp_path / "old").exists()
    assert check_saelens_version() == sae_lens.__version__  # the installed, tested one

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=32, d_sae=64, k=4))
    sae.save_inference_model(str(tmp_path / "future"))
    cfg = json.loads((tmp_path / "future" / "cfg.json").read_text())
    cfg.setdefault("metadata", {}).update(
        hook_name=f"blocks.{LAYER}.hook_resid_post",
        sae_lens_version="7.2.0",
        sae_lens_training_version="7.2.0",
    )
    (tmp_path / "future" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sae_lens 7.2.0"):
        import_saelens_sae(tmp_path / "future", sel)


def test_sparsify_settings_come_whole_or_as_keywords_and_unknown_names_are_refused():
    whole = sparsify_command("m", "t.bin", [1], ctx_len=64, settings=SparsifySettings(n_gpus=2, k=64))
    assert whole == sparsify_command("m", "t.bin", [1], ctx_len=64, n_gpus=2, k=64)
    assert whole.startswith("torchrun --nproc_per_node 2 -m") and " --k 64 --expansion_factor 8 " in whole
    with pytest.raises(ValueError, match="n_gpus must be at least 1"):
        sparsify_command("m", "t.bin", [1], ctx_len=64, n_gpus=0)
    with pytest.raises(TypeError, match=r"\['kk'\]: the sparsify settings are \['n_gpus', 'k', "):
        sparsify_command("m", "t.bin", [1], ctx_len=64, kk=64)
