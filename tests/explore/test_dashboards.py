"""The one-pass dashboards against brute force over the same store (dense SAE activations of every
token), the reference corpus's part of the pass against brute force over the corpus sequences rebuilt
from the shipped corpus, logit effects against the model's own final norm and unembedding, an old corpus
stored without token ids, and the bad inputs."""

from __future__ import annotations

import json
import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from helpers.analysis.contexts import EncodedChunks, docs_for, token_pieces
from helpers.collect.completions import read_completions
from helpers.collect.corpus import BUILTIN_CORPUS, Packing, iter_documents, iter_sequences, resolve_corpus
from helpers.collect.store import TOKENS_SUFFIX, LayerStore
from helpers.explore.accumulate import Kept, LogHistogram, TopPerFeature
from helpers.explore.dashboards import (
    CLASSES,
    NO_ANALYSIS,
    ExplorerConfig,
    build_dashboards,
    corpus_store_of,
    feature_pass,
)
from helpers.explore.decoder import logit_effects, logit_summary, nearest_rows, unembedding_of
from helpers.explore.views import default_feature, feature_html
from helpers.model.hooks import decoder_layers, hook_name
from helpers.model.nanochat_gpt import NanoChatGPTConfig, NanoChatGPTForCausalLM
from helpers.run import corpus_dir, sae_dir
from helpers.saes import TopKSAE
from helpers.saes.io import load_sae, save_sae
from tests.analysis.test_contexts import OutOfMemoryAbove
from tests.conftest import tiny_model
from tests.explore.fake_run import CORPUS_SEQ_LEN, D_SAE, ELSEWHERE_ID, LAYER, OTHER_ID, SAE_ID, make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CFG = ExplorerConfig(n_top=4, n_quantiles=3, per_quantile=2, reservoir=6, before=5, after=2, batch_tokens=64)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("explore_run"), tiny)


@pytest.fixture(scope="module")
def db(run, tiny):
    saes = [load_sae(sae_dir(run, s)) for s in (SAE_ID, OTHER_ID, ELSEWHERE_ID)]
    return build_dashboards(
        run,
        saes[0],
        tokenizer=tiny.tokenizer,
        unembedding=unembedding_of(tiny.model),
        others=saes,
        config=CFG,
    )


@pytest.fixture(scope="module")
def dense(run):
    """Brute force: every completion token's SAE activations [n, d_sae], with its doc and class."""
    store, sae = LayerStore(run, LAYER), load_sae(sae_dir(run, SAE_ID)).sae
    docs = docs_for(store, read_completions(run))
    X = np.concatenate([store.tokens_of(d.id)[d.skip :] for d in docs])
    with torch.no_grad():
        A = sae.encode(torch.from_numpy(X))[0].numpy()
    doc = np.repeat(np.arange(len(docs)), [d.n for d in docs])
    pos = np.concatenate([np.arange(d.n) for d in docs])
    cls = np.array(
        [CLASSES.index(d.record["label"]) if d.record["label"] in CLASSES[:2] else 2 for d in docs]
    )[doc]
    return docs, A, doc, pos, cls


def test_counts_rates_and_maxima_match_brute_force(db, dense):
    docs, A, _, _, cls = dense
    for k in range(3):
        assert (db.fp.fired[k] == (A[cls == k] > 0).sum(0)).all()
        assert db.fp.n_tokens[k] == (cls == k).sum()
    assert db.fp.n_tokens[2] > 0, "the ambiguous completion is counted as 'other'"
    assert np.allclose(db.max_activation, A.max(0), rtol=1e-5)
    assert np.allclose(db.fp.act_sum, A.sum(0), rtol=1e-4)
    table = db.table()
    assert len(table["feature"]) == A.shape[1] and table["firing_rate"][5] == pytest.approx(
        (A[:, 5] > 0).mean(), rel=1e-3
    )
    on_corpus = db.fp.corpus.fired > 0 if db.fp.corpus is not None else False  # counted in its own test
    assert db.info["n_alive"] == int(((A.max(0) > 0) | on_corpus).sum())
    assert db.info["n_completions"] == len(docs)


def test_top_windows_are_the_best_token_of_the_best_completions(db, dense, tiny):
    docs, A, doc, pos, _ = dense
    for f in range(0, A.shape[1], 7):
        page = db.page(f)
        per_doc = np.full(len(docs), 0.0)
        np.maximum.at(per_doc, doc, A[:, f])
        want = np.sort(per_doc[per_doc > 0])[::-1][: CFG.n_top]
        assert [ex["activation"] for ex in page["top"]] == pytest.approx(want, rel=5e-3)
        assert len({ex["completion_id"] for ex in page["top"]}) == len(page["top"])
        for ex in page["top"] + [e for g in page["quantiles"] for e in g["examples"]]:
            d = next(i for i, x in enumerate(docs) if x.id == ex["completion_id"])
            p = ex["position"] - docs[d].n_prompt  # position in the completion
            rows = np.flatnonzero(doc == d)
            lo = p - ex["center"]
            assert ex["acts"] == pytest.approx(A[rows[lo : lo + len(ex["acts"])], f], rel=1e-2, abs=1e-3)
            pieces = token_pieces(tiny.tokenizer, docs[d].record["completion_token_ids"])
            assert ex["tokens"] == pieces[lo : lo + len(ex["tokens"])]
            assert ex["acts"][ex["center"]] == pytest.approx(ex["activation"], rel=1e-2)
            assert 0 <= ex["center"] <= CFG.before and len(ex["tokens"]) <= CFG.width


def test_histograms_and_quantile_groups(db, dense):
    _, A, _, _, _ = dense
    for f in range(A.shape[1]):
        page = db.page(f)
        fired = A[:, f][A[:, f] > 0]
        assert sum(page["histogram"]["counts"]) == len(fired)
        if len(fired):
            assert page["histogram"]["min"] == pytest.approx(fired.min(), rel=1e-3), "starts at the smallest"
            if fired.max() > fired.min() * 2 ** (1 / 4):  # not all inside one or two 9%-wide log bins
                assert page["histogram"]["counts"][0] > 0 and page["histogram"]["counts"][-1] > 0
        assert sum(g["count"] for g in page["quantiles"]) == len(fired), "groups hold every firing"
        for g in page["quantiles"]:
            assert g["count"] > 0 and (g["lo"] < g["hi"] or len(page["quantiles"]) == 1), "never degenerate"
            # windows print 3 significant figures (a value can round 0.5% across its group's edge)
            assert all(g["lo"] * 0.995 <= ex["activation"] <= g["hi"] * 1.005 for ex in g["examples"])
        seen = [(ex["completion_id"], ex["position"]) for ex in page["top"]]
        again = [ex for g in page["quantiles"] for ex in g["examples"] if ex.get("shown_above")]
        seen += [
            (ex["completion_id"], ex["position"])
            for g in page["quantiles"]
            for ex in g["examples"]
            if ex not in again
        ]
        assert len(seen) == len(set(seen)), "no window shown twice, except one marked so"
        for g in page["quantiles"]:
            assert g["examples"] or not any(
                g["lo"] * 0.995 <= ex["activation"] <= g["hi"] * 1.005 for ex in page["top"]
            ), "a group whose firings all sit among the top windows shows one of them again, marked"
            assert sum(ex in again for ex in g["examples"]) <= 1


@pytest.fixture(scope="module")
def dense_corpus(run, tiny):
    """Brute force over the corpus, independent of its stored token ids: the packed sequences rebuilt
    from the shipped corpus, their kept positions, and the SAE's activations [n, d_sae] on each."""
    store, sae = LayerStore(run, LAYER, kind="corpus"), load_sae(sae_dir(run, SAE_ID)).sae
    packing = Packing.for_tokenizer(tiny.tokenizer, CORPUS_SEQ_LEN)
    seqs = iter_sequences(tiny.tokenizer, iter_documents(resolve_corpus(BUILTIN_CORPUS)), packing)
    out = {}
    for i, seq in enumerate(islice(seqs, len(store.entries))):
        sid = f"seq{i:09d}"
        kept = packing.keep(torch.tensor([seq]))[0].nonzero()[:, 0].numpy()
        with torch.no_grad():
            acts = sae.encode(torch.from_numpy(store.tokens_of(sid)))[0].numpy()
        assert len(acts) == len(kept)
        out[sid] = (seq, kept, acts)
    return out


def test_corpus_rates_and_histograms_match_brute_force(db, dense_corpus):
    c = db.fp.corpus
    A = np.concatenate([acts for _, _, acts in dense_corpus.values()])
    assert c.n_tokens == len(A) == db.info["corpus"]["n_tokens"] and c.n_without_text == 0
    assert (c.fired == (A > 0).sum(0)).all() and c.fired.sum() > 0
    assert np.allclose(c.max_activation, A.max(0), rtol=1e-5)
    table = db.table()
    for f in range(A.shape[1]):
        page = db.page(f)["corpus"]
        assert page["n_firing"] == (A[:, f] > 0).sum() == sum(page["histogram"]["counts"])
        assert table["rate_corpus"][f] == page["firing_rate"] == pytest.approx((A[:, f] > 0).mean(), rel=1e-3)
    assert sum(db.page(0)["histogram"]["counts"]) == db.fp.fired[:, 0].sum(), "completions only"


def test_top_corpus_windows_are_the_text_that_fired(db, dense_corpus, tiny):
    best = {sid: acts.max(0) for sid, (_, _, acts) in dense_corpus.items()}  # per sequence [d_sae]
    for f in range(0, D_SAE, 5):
        top = db.page(f)["corpus"]["top"]
        want = np.sort([b[f] for b in best.values() if b[f] > 0])[::-1][: CFG.n_top]
        assert [ex["activation"] for ex in top] == pytest.approx(want, rel=5e-3)
        assert len({ex["sequence_id"] for ex in top}) == len(top), "one window per sequence"
        for ex in top:
            seq, kept, acts = dense_corpus[ex["sequence_id"]]
            first = ex["position"] - ex["center"]  # the window is consecutive positions of one document
            positions = np.arange(first, first + len(ex["tokens"]))
            rows = np.searchsorted(kept, positions)
            assert (kept[rows] == positions).all(), "no special token or separator inside a window"
            assert ex["acts"] == pytest.approx(acts[rows, f], rel=1e-2, abs=1e-3)
            assert ex["activation"] > 0 and ex["acts"][ex["center"]] == pytest.approx(
                acts[:, f].max(), rel=1e-2
            )
            pieces = token_pieces(tiny.tokenizer, seq)
            assert ex["tokens"] == pieces[first : first + len(ex["tokens"])]
            assert 0 <= ex["center"] <= CFG.before and len(ex["tokens"]) <= CFG.width


def test_an_old_corpus_without_token_ids_still_builds(run, tiny, tmp_path, db):
    old = tmp_path / "old_run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("explorer", "neuronpedia"))
    for meta_path in corpus_dir(old, LAYER).glob("shard_*.json"):  # as written before ids were kept
        meta = json.loads(meta_path.read_text())
        del meta["token_ids"]
        meta_path.write_text(json.dumps(meta))
        meta_path.with_suffix(TOKENS_SUFFIX).unlink()
    got = build_dashboards(old, load_sae(sae_dir(old, SAE_ID)), tokenizer=tiny.tokenizer, config=CFG)
    assert got.info["corpus"]["n_without_text"] == got.info["corpus"]["n_tokens"] == db.fp.corpus.n_tokens
    assert any("without token ids" in n and "no text" in n for n in got.info["notes"])
    assert (got.fp.corpus.fired == db.fp.corpus.fired).all(), "rates are still counted"
    fired = int(np.argmax(db.fp.corpus.fired))
    page = got.page(fired)
    assert page["corpus"]["top"] == [] and page["corpus"]["n_firing"] > 0
    assert "stored without token ids" in feature_html(page, got.info)


def test_the_notebook_page_shows_the_new_views(db, dense):
    _, A, _, _, _ = dense
    f = int(np.argmax((A > 0).sum(0)))
    page = db.page(f)
    text = feature_html(page, db.info)
    assert "logit weights over the vocabulary" in text and text.count("#2952a3") == len(
        page["logit_histogram"]["counts"]
    )
    assert "co-activating features" in text and f"#{page['coactive']['neighbours'][0][0]} (Jaccard" in text
    assert all(f"{g['count']} firings" in text for g in page["quantiles"])
    table = db.table()
    nothing = {
        k: [0.0 if k in ("firing_rate", "rate_corpus") else v for v in col] for k, col in table.items()
    }
    nothing["cohens_d"] = [None] * len(table["feature"])
    assert default_feature(nothing) == 0, "no feature fired: open feature 0 (its page says it never fired)"
    dead = [g for g in range(A.shape[1]) if not (A[:, g] > 0).any() and not db.fp.corpus.fired[g]]
    if dead:
        assert "never fired on the scanned tokens" in feature_html(db.page(dead[0]), db.info)


def test_neighbours_are_the_nearest_decoder_rows_of_this_layer_only(db, run):
    W = load_sae(sae_dir(run, SAE_ID)).sae.W_dec.detach()
    Wo = load_sae(sae_dir(run, OTHER_ID)).sae.W_dec.detach()
    cos = torch.nn.functional.normalize(W, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    cos.fill_diagonal_(-2)
    cross = torch.nn.functional.normalize(W, dim=1) @ torch.nn.functional.normalize(Wo, dim=1).T
    for f in (0, 17, 95):
        page = db.page(f)
        assert [j for j, _ in page["similar"]] == cos[f].topk(CFG.n_similar).indices.tolist()
        assert [j for j, _ in page["similar_other"][OTHER_ID]] == cross[f].topk(
            CFG.n_similar
        ).indices.tolist()
        assert ELSEWHERE_ID not in page["similar_other"], "an SAE of another layer is not a neighbour"


def _model(family: str):
    if family == "nanochat_gpt":  # our class for nanochat's 2026 layouts: functional norm, padded vocab
        cfg = NanoChatGPTConfig(
            vocab_size=300,
            padded_vocab_size=320,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
        return NanoChatGPTForCausalLM(cfg).eval()
    return tiny_model(family)


@pytest.mark.parametrize("family", ["llama", "gpt2", "nanochat", "nanochat_gpt"])
def test_logit_effects_rank_tokens_as_the_models_own_forward(family):
    """The peer: the model's own forward with its last layer's output replaced by the direction, so the
    final norm, unembedding (and soft-cap) are the model's. The effect of d is logits(d) - logits(0)
    (LayerNorm's bias cancels); ours must order the tokens the same way, and without a soft-cap be a
    positive multiple of it."""
    model = _model(family)
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(5, 64, generator=g)
    ti, tv, bi, bv = logit_effects(W_dec, unembedding_of(model), k=6)
    summary = logit_summary(W_dec, unembedding_of(model), k=6, hist_bins=12, batch=2)
    last = decoder_layers(model)[-1]

    def logits_with_last_output(vec: torch.Tensor) -> torch.Tensor:
        def hook(_m, _i, out):
            h = out[0] if isinstance(out, tuple) else out
            new = vec.to(h.dtype).expand_as(h)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = last.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(input_ids=torch.tensor([[1, 2]])).logits[0, -1].float()
        finally:
            handle.remove()

    for f in range(5):
        d = W_dec[f] / W_dec[f].norm()
        effect = logits_with_last_output(0.5 * d) - logits_with_last_output(torch.zeros(64))
        assert len(effect) == 300 and effect.topk(6).indices.tolist() == ti[f].tolist()
        assert effect.topk(6, largest=False).indices.tolist() == bi[f].tolist()
        if family != "nanochat_gpt":  # no soft-cap: an exact positive multiple
            ratio = effect[ti[f]] / tv[f]
            assert (ratio > 0).all() and torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3)
            # equal-width bins over [min, max] do not change under a positive scale: the model's own
            # effect gives the same logit histogram (up to a weight rounding across a bin edge)
            want, _ = np.histogram(effect.numpy(), bins=12, range=(effect.min().item(), effect.max().item()))
            got = summary.hist_counts[f].numpy()
            assert got.sum() == 300 and np.abs(got - want).sum() <= 2, (got, want)
        assert summary.hist_hi[f].item() == pytest.approx(tv[f, 0].item(), rel=1e-5)
        assert summary.hist_lo[f].item() == pytest.approx(bv[f, 0].item(), rel=1e-5)


def test_coactivation_neighbours_are_the_features_firing_on_the_same_tokens(run, tiny, dense):
    """With a sample that holds every firing and every co-firing feature recorded, the estimate is exact:
    the neighbours are brute force's top features by the Jaccard index of the firing sets."""
    _, A, _, _, _ = dense
    cfg = ExplorerConfig(n_top=2, reservoir=10_000, coactive_width=D_SAE, n_coactive=4, batch_tokens=64)
    full = build_dashboards(run, load_sae(sae_dir(run, SAE_ID)), tokenizer=tiny.tokenizer, config=cfg)
    on = A > 0
    both = on.T.astype(int) @ on.astype(int)  # [F, F] tokens where both fire
    n = on.sum(0)
    jac = both / np.maximum(n[:, None] + n[None, :] - both, 1)
    np.fill_diagonal(jac, -1)
    checked = 0
    for f in range(D_SAE):
        got = full.page(f)["coactive"]
        assert got["sample"] == n[f]
        if not n[f]:
            assert got["neighbours"] == [], "a dead feature has no co-activation neighbours"
            continue
        want = [g for g in np.lexsort((np.arange(D_SAE), -jac[f]))[:4] if jac[f, g] > 0]
        assert [g for g, _, _ in got["neighbours"]] == want, f
        for g, j, p in got["neighbours"]:
            assert j == pytest.approx(jac[f, g], rel=5e-3) and p == pytest.approx(both[f, g] / n[f], rel=5e-3)
        checked += 1
    assert checked > 50
    sampled = db_page = build_dashboards(
        run,
        load_sae(sae_dir(run, SAE_ID)),
        tokenizer=tiny.tokenizer,
        config=ExplorerConfig(reservoir=4, coactive_width=3),
    ).page(5)
    assert sampled["coactive"]["sample"] == min(4, n[5]) and db_page["coactive"]["neighbours"]


def test_nearest_rows_refuses_other_widths():
    with pytest.raises(ValueError, match="width 8 and 9"):
        nearest_rows(torch.randn(4, 8), torch.randn(4, 9))


def test_bad_inputs_name_the_problem(run, tiny, tmp_path, db):
    with pytest.raises(IndexError, match=r"feature 96 is out of range.*d_sae=96"):
        db.page(96)
    save_sae(
        TopKSAE(32, 16, l0=2),
        tmp_path / "other_model",
        hook_name=hook_name(LAYER),
        model_name="org/other-model",
    )
    with pytest.raises(ValueError, match=r"'org/other-model'.*'tiny-llama'"):
        build_dashboards(run, load_sae(tmp_path / "other_model"), tokenizer=tiny.tokenizer)
    save_sae(TopKSAE(32, 16, l0=2), tmp_path / "layer0", hook_name=hook_name(0), model_name="tiny-llama")
    with pytest.raises(ValueError, match=r"reads layer 0.*layers \[1, 2\]"):
        build_dashboards(run, load_sae(tmp_path / "layer0"), tokenizer=tiny.tokenizer)
    save_sae(TopKSAE(16, 16, l0=2), tmp_path / "narrow", hook_name=hook_name(LAYER), model_name="tiny-llama")
    with pytest.raises(ValueError, match=r"d_in=16.*d_model=32"):
        build_dashboards(run, load_sae(tmp_path / "narrow"), tokenizer=tiny.tokenizer)


def test_notebook_04_rows_and_their_absence(db, run, tiny):
    assert db.page(5)["tag"] == "deception" and "denials" in db.page(5)["analysis"]["explanation"]
    assert db.page(7)["tag"] == "not deception"
    assert db.page(11)["tag"] == "top feature, not explained" and db.page(11)["analysis"]["cohens_d"] == -0.4
    assert db.page(12)["tag"] == "not analysed" and db.page(12)["analysis"] is None
    assert db.table()["cohens_d"][5] == 1.5 and NO_ANALYSIS not in db.info["notes"]
    other = build_dashboards(run, load_sae(sae_dir(run, OTHER_ID)), tokenizer=tiny.tokenizer, config=CFG)
    assert NO_ANALYSIS in other.info["notes"] and "no logit effects" in " ".join(other.info["notes"])
    assert set(other.table()["tag"]) == {"not analysed"} and "logits" not in other.page(0)
    elsewhere = build_dashboards(
        run, load_sae(sae_dir(run, ELSEWHERE_ID)), tokenizer=tiny.tokenizer, config=CFG
    )
    assert elsewhere.info["corpus"] is None and elsewhere.page(0)["corpus"] is None, "no corpus at layer 2"
    assert "rate_corpus" not in elsewhere.table()


@pytest.mark.parametrize("batch_tokens", [7, 64])
def test_the_streamed_reader_gives_runs_of_whole_completions_and_their_activations(run, dense, batch_tokens):
    """EncodedChunks (background reader, shards' dtype, then the SAE) against the brute-force encoding
    of every token at once: runs of whole completions of at most batch_tokens tokens (a longer one
    alone), in store order, each with its rows' activations; at 7 tokens most completions are encoded
    in several pieces."""
    docs, A, doc, _, _ = dense
    store, sae = LayerStore(run, LAYER), load_sae(sae_dir(run, SAE_ID)).sae
    got = list(EncodedChunks(store, sae, docs, batch_tokens, pre=False))
    assert [d.id for c, _, _ in got for d in c] == [d.id for d in docs]
    for chunk, acts, pre in got:
        assert pre is None and acts.dtype == torch.float32
        assert len(chunk) == 1 or sum(d.n for d in chunk) <= batch_tokens
        rows = np.isin(doc, [d.index for d in chunk])
        assert np.allclose(acts.numpy(), A[rows], rtol=1e-6, atol=1e-7)


def test_the_torch_bookkeeping_matches_numpy_on_the_same_activations(uninterrupted, dense):
    """The pass's counts, sums, minima and log2 histogram (torch, on the SAE's device: here the CPU)
    against numpy over the brute-force activations of every token. Stated tolerance: counts, minima and
    histogram bins exact; sums within rtol 1e-6 (float64 sums of float32 activations, which the encoder
    may round one ulp differently in batches of another size)."""
    _, _, _, fp = uninterrupted
    _, A, _, _, cls = dense
    on = A > 0
    assert np.array_equal(fp.n_tokens, np.bincount(cls, minlength=3))
    assert np.array_equal(fp.fired, np.stack([on[cls == k].sum(0) for k in range(3)]))
    assert np.allclose(fp.act_sum, A.astype(np.float64).sum(0), rtol=1e-6, atol=0)
    assert np.array_equal(fp.min_activation, np.where(on.any(0), np.where(on, A, np.inf).min(0), 0))
    rows, feats = np.nonzero(on)
    n_bins = (LogHistogram.HI - LogHistogram.LO) * LogHistogram.PER_OCTAVE
    b = np.floor((np.log2(A[rows, feats]) - LogHistogram.LO) * LogHistogram.PER_OCTAVE).astype(np.int64)
    want = np.zeros((A.shape[1], n_bins), np.int64)
    np.add.at(want, (feats, np.clip(b, 0, n_bins - 1)), 1)
    assert np.array_equal(fp.log_counts, want) and fp.log_counts.sum() == on.sum()


def assert_same_pass(a, b) -> None:
    """Every array of two FeaturePass results equal (nan equal to nan), the corpus part's too."""
    pairs = [(a, b)] + ([(a.corpus, b.corpus)] if a.corpus is not None or b.corpus is not None else [])
    for x, y in pairs:
        for name in vars(x):
            p, q = getattr(x, name), getattr(y, name)
            if isinstance(p, Kept):
                for k in vars(p):
                    u, v = getattr(p, k), getattr(q, k)
                    assert (u is None and v is None) or np.array_equal(u, v, equal_nan=True), f"{name}.{k}"
            elif isinstance(p, np.ndarray):
                assert np.array_equal(p, q, equal_nan=True), name
            elif name != "corpus":
                assert p == q, name


@pytest.fixture(scope="module")
def uninterrupted(run):
    store, sae = LayerStore(run, LAYER), load_sae(sae_dir(run, SAE_ID)).sae
    docs = docs_for(store, read_completions(run))
    return store, sae, docs, feature_pass(store, sae, docs, CFG, corpus=corpus_store_of(run, LAYER))


def test_out_of_memory_in_the_encoder_halves_the_batch_and_loses_nothing(run, uninterrupted, capsys):
    store, sae, docs, want = uninterrupted
    once = OutOfMemoryAbove(sae, rows=20, times=1)  # fails at 64 once, then 32 fits
    assert_same_pass(feature_pass(store, once, docs, CFG, corpus=corpus_store_of(run, LAYER)), want)
    assert once.failed == 1 and want.corpus is not None
    assert "out of memory at 64 tokens per batch: going on at 32" in capsys.readouterr().out
    tight = OutOfMemoryAbove(sae, rows=20)  # every batch above 20 rows fails: 64 -> 32 -> 16, and stays
    assert_same_pass(feature_pass(store, tight, docs, CFG, corpus=corpus_store_of(run, LAYER)), want)
    assert tight.failed == 2, "the corpus part starts at the batch size the completions ended with"


def test_out_of_memory_in_the_bookkeeping_redoes_the_batch_with_the_same_keys(
    run, uninterrupted, monkeypatch
):
    """The sample's selection fails after the top windows' succeeded (both on the device): the batch
    keeps nothing, its random keys are drawn again, and the results equal a pass that never failed."""
    store, sae, docs, want = uninterrupted
    real, calls = TopPerFeature.select, []

    def select(self, *args, **kwargs):
        calls.append(self.k)
        if len(calls) in (4, 9):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TopPerFeature, "select", select)
    got = feature_pass(store, sae, docs, CFG, corpus=corpus_store_of(run, LAYER))
    assert calls[3] == CFG.reservoir and calls[8] == CFG.n_top, "failed in the sample's and the top's"
    assert_same_pass(got, want)


def test_out_of_memory_at_the_smallest_batch_names_the_setting(run, uninterrupted):
    store, sae, docs, _ = uninterrupted
    with pytest.raises(
        torch.cuda.OutOfMemoryError, match=r"even at 16 tokens per batch.*ExplorerConfig\.batch_tokens.*SAE"
    ):
        feature_pass(store, OutOfMemoryAbove(sae, rows=0), docs, CFG)
