"""Auto-interpretation through the real google-genai SDK against the local fake Gemini server: batching,
id validation and follow-ups, the cache, detection and fuzzing scores against the truth (a perfect
explanation, one at chance, the shuffled baseline), the fuzzing windows' marks, quota stops, offline
mode, and the request plan."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers.analysis.autointerp import (
    EXPLAIN_SYSTEM,
    AutointerpSettings,
    autointerp,
    explain_features,
    plan,
)
from helpers.analysis.contexts import FeatureContexts, window_record
from helpers.analysis.scoring import (
    DETECTION_SYSTEM,
    FUZZING_SYSTEM,
    fuzzing_windows,
    score_explanations,
    score_summary,
    score_table,
)
from helpers.gemini import DEFAULT_MODEL, OFFLINE, GeminiClient
from tests.fake_gemini import (
    RecordedRequest,
    daily_quota_exceeded,
    fake_gemini_server,
    json_reply,
    text_reply,
)
from tests.null_worlds import activating_window, fire_through_example

fake_gemini = pytest.fixture(fake_gemini_server, name="fake_gemini")

WORDS = ["apple", "river", "candle", "violin", "tiger", "marble", "pepper", "saddle", "lantern", "walrus"]
FILLER = [
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "was",
    "it",
    "on",
    "that",
    "with",
    "as",
    "for",
    "at",
    "by",
    "this",
    "from",
]
FEATURES = [101, 7, 2048, 33, 5, 999, 64, 12]  # any ids: nothing may assume 0..n-1


def no_sleep(seconds: float) -> None:
    raise AssertionError(f"unexpected wait of {seconds} s")


def new_client(**kwargs) -> GeminiClient:
    return GeminiClient(sleep=no_sleep, **kwargs)


def synthetic_contexts(features=FEATURES, seed: int = 0) -> list[FeatureContexts]:
    """Feature i fires on WORDS[i] (never on anything else); explain and score windows from disjoint
    completions; the completion labels are random (they must not reach Gemini)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, f in enumerate(features):
        n = iter(range(1000))

        def window(kind: str, i=i, f=f, n=n) -> dict:
            tokens = [" " + str(rng.choice(FILLER)) for _ in range(12)]
            acts = [0.0] * 12
            center = int(rng.integers(12))
            if kind == "activating":
                tokens[center], acts[center] = " " + WORDS[i], float(rng.uniform(0.5, 5))
            label = str(rng.choice(["honest", "deceptive"]))
            return window_record(
                tokens,
                acts,
                center,
                kind=kind,
                completion_id=f"c{f}-{next(n)}",
                label=label,
                window_start=10,
                quantile=int(rng.integers(10)) if kind == "activating" else None,
            )

        explain = [window(k) for k in ["activating"] * 6 + ["non_activating"] * 3 + ["hard_negative"] * 2]
        score = [window(k) for k in ["activating"] * 10 + ["non_activating"] * 5 + ["hard_negative"] * 5]
        out.append(FeatureContexts(f, 5000, 100, 5.0, list(np.linspace(0.5, 5, 11)), explain, score))
    return out


def items(request: RecordedRequest) -> list[dict]:
    return json.loads(request.prompt.split("ITEMS:\n", 1)[1])


def explain_from_markers(request: RecordedRequest):
    """A stand-in explainer: names the word inside the markers."""
    answers = []
    for it in items(request):
        word = re.search(r"<<\s*(\w+)>>", it["activating"][0]["text"]).group(1)
        answers.append(
            {
                "feature": it["feature"],
                "explanation": f"Fires on the word {word}.",
                "deception_related": "no",
                "kind": "none",
            }
        )
    return json_reply({"features": answers})


def scorer(score_window):
    def reply(request: RecordedRequest):
        answers = []
        for it in items(request):
            word = it["explanation"].rstrip(".").split()[-1]
            scores = [{"window": w["window"], "score": score_window(word, w["text"])} for w in it["windows"]]
            answers.append({"feature": it["feature"], "scores": scores})
        return json_reply({"features": answers})

    return reply


truthful = scorer(lambda word, text: 1.0 if word in text else 0.0)


def marks_only(word: str, text: str) -> float:
    """A fuzzing reader that knows the feature fires on `word`: are the marked tokens exactly that word?"""
    spans = re.findall(r"<<(.*?)>>", text)
    return float(bool(spans) and all(span.strip() == word for span in spans))


knows_the_word = scorer(marks_only)


def route(score_reply, fuzz_reply=knows_the_word):
    def handler(request: RecordedRequest):
        replies = {
            EXPLAIN_SYSTEM: explain_from_markers,
            DETECTION_SYSTEM: score_reply,
            FUZZING_SYSTEM: fuzz_reply,
        }
        return replies[request.system](request)

    return handler


def test_several_features_per_request_and_a_perfect_explanation_scores_one(fake_gemini):
    fake_gemini.handler = route(truthful)
    *contexts, c1, c2 = synthetic_contexts([*FEATURES, 501, 502])  # two random features: the baselines
    results = autointerp(contexts, new_client(), features_per_request=3, controls=[c1, c2])

    assert len(fake_gemini.requests) == plan(8, 3, n_controls=2)["requests"] == 16
    systems = [r.system for r in fake_gemini.requests]
    assert systems == [EXPLAIN_SYSTEM] * 4 + [DETECTION_SYSTEM] * 6 + [FUZZING_SYSTEM] * 6
    assert [len(items(r)) for r in fake_gemini.requests] == [3, 3, 3, 1] + [3, 3, 2] * 4
    first = fake_gemini.requests[0]
    schema = first.generation_config["responseSchema"]["properties"]["features"]["items"]["properties"]
    assert schema["kind"]["enum"] == [
        "lying about a fact",
        "concealing a role",
        "evasion",
        "refusal",
        "other",
        "none",
    ]
    # Labels and completion ids never reach Gemini; detection windows carry no markers, fuzzing windows
    # (the 10 activating ones) all do, and nothing of the truth is sent.
    for r in fake_gemini.requests:
        assert "honest" not in r.prompt and "deceptive" not in r.prompt and '"c101-' not in r.prompt
    assert all("<<" not in r.prompt for r in fake_gemini.requests[4:10])
    assert all(len(it["windows"]) == 20 for r in fake_gemini.requests[4:10] for it in items(r))
    fuzz_windows = [w for r in fake_gemini.requests[10:] for it in items(r) for w in it["windows"]]
    assert all(set(w) == {"window", "text"} for w in fuzz_windows) and all(
        "<<" in w["text"] for w in fuzz_windows
    )

    for i, f in enumerate(FEATURES):
        res = results[f]
        assert res["explanation"] == f"Fires on the word {WORDS[i]}."
        sources = [
            res[k]
            for k in (
                "explanation_source",
                "detection_source",
                "detection_baseline_source",
                "fuzzing_source",
                "fuzzing_baseline_source",
            )
        ]
        assert sources == [f"gemini:{DEFAULT_MODEL}"] * 5
        assert (res["deception_related"], res["kind"]) == ("no", "none")
        det, base = res["detection"], res["detection_baseline"]
        assert (det["balanced_accuracy"], det["auroc"], det["verdict"]) == (1.0, 1.0, "above chance")
        assert det["hard_negative_rejection"] == 1.0 and (det["n_windows"], det["n_activating"]) == (20, 10)
        # The baseline scored the same windows with a random feature's explanation: chance.
        assert (
            res["baseline_explanation_of"] == (501, 502)[i % 2] and res["baseline_kind"] == "random feature"
        )
        assert res["baseline_explanation"] == f"Fires on the word {WORDS[8 + i % 2]}."
        assert (base["balanced_accuracy"], base["auroc"], base["verdict"]) == (0.5, 0.5, "at chance")
        assert res["detection_ba_over_baseline"] == 0.5
        # Fuzzing: a reader who knows the word tells right marks from wrong ones; with the random
        # feature's word it calls every marking wrong.
        fuzz, fuzz_base = res["fuzzing"], res["fuzzing_baseline"]
        assert (fuzz["balanced_accuracy"], fuzz["auroc"], fuzz["verdict"]) == (1.0, 1.0, "above chance")
        assert fuzz["n_windows"] == 2 * fuzz["n_correct"] >= 4
        assert (fuzz_base["balanced_accuracy"], fuzz_base["auroc"]) == (0.5, 0.5)
        assert res["fuzzing_ba_over_baseline"] == 0.5
    summary = score_summary(results)
    for method in ("detection", "fuzzing"):
        assert summary[f"{method}_n_scored"] == summary[f"{method}_n_above_chance"] == 8
        assert summary[f"{method}_balanced_accuracy"] == summary[f"{method}_auroc"] == 1.0
        assert summary[f"{method}_baseline_balanced_accuracy"] == summary[f"{method}_baseline_auroc"] == 0.5
        assert summary[f"{method}_n_baseline_above_chance"] == 0
    table = score_table([results[f] for f in FEATURES])
    assert table[0] == {
        "feature": "101",
        "detection BA / AUROC": "1.00 / 1.00",
        "baseline (det.)": "0.50 / 0.50",
        "fuzzing BA / AUROC": "1.00 / 1.00",
        "baseline (fuzz.)": "0.50 / 0.50",
        "explanation": "Fires on the word apple.",
    }


@pytest.mark.parametrize("kind", ["constant", "random"])
def test_an_explanation_at_chance_scores_about_one_half_and_says_so(fake_gemini, kind):
    rng = np.random.default_rng(3)
    answer = (lambda w, t: 0.7) if kind == "constant" else (lambda w, t: float(rng.random()))
    fake_gemini.handler = route(scorer(answer), scorer(answer))
    # More features than usual, so that the mean of the random reader is close to 0.5.
    contexts = synthetic_contexts(range(8), seed=1) + synthetic_contexts(range(8, 16), seed=2)
    results = autointerp(contexts, new_client(), baseline=False)
    for method in ("detection", "fuzzing"):
        scored = [r[method] for r in results.values()]
        bas = np.array([d["balanced_accuracy"] for d in scored])
        if kind == "constant":
            assert (bas == 0.5).all() and all(
                d["auroc"] == 0.5 and d["verdict"] == "at chance" for d in scored
            )
        else:
            assert abs(bas.mean() - 0.5) < 0.1 and abs(np.mean([d["auroc"] for d in scored]) - 0.5) < 0.1
            assert sum(d["verdict"] == "at chance" for d in scored) >= 13
        assert all(
            r[f"{method}_baseline"] is None and r[f"{method}_baseline_source"] == "not run"
            for r in results.values()
        )


def multi_token_context(feature: int = 77) -> FeatureContexts:
    """32-token activating windows (the example token at 24, as ContextConfig cuts them) firing on a run
    of 1-4 tokens through it and sometimes on a second run, two of them firing nearly everywhere (they
    cannot be marked wrongly), and non-activating windows that fuzzing must not use."""
    rng = np.random.default_rng(5)
    score = []
    for i in range(13):
        acts = np.zeros(32)
        if i in (3, 8):
            acts[2:] = 1.0
        else:
            fire_through_example(acts, rng)
            if i % 3 == 0:
                acts[int(rng.integers(4, 14))] = 0.5
        tokens = [f" t{i}_{j}" for j in range(32)]
        score.append(activating_window(window_record, i, tokens, acts))
    for i in range(4):
        tokens = [f" n{i}_{j}" for j in range(32)]
        score.append(
            window_record(
                tokens,
                [0.0] * 32,
                0,
                kind="non_activating",
                completion_id=f"n{i}",
                label=None,
                window_start=0,
            )
        )
    return FeatureContexts(feature, 1000, 50, 3.0, list(np.linspace(0.1, 3, 11)), [], score)


def test_fuzzing_marks_half_right_and_half_wrong_in_the_same_shape():
    """Right marks are the firing tokens; wrong ones are the same pattern moved onto silent tokens; the
    text is cropped to a drawn amount before the first mark and after the last, whichever it shows."""
    ctx = multi_token_context()
    wrong_sets = set()
    for seed in range(20):
        windows = fuzzing_windows(ctx, seed)
        assert windows == fuzzing_windows(ctx, seed), "seeded"
        assert [w["window"] for w in windows] == list(range(10)), "11 usable activating windows: 5 pairs"
        assert sum(w["truth"] for w in windows) == 5
        for w in windows:
            example = ctx.score[w["example"]]
            assert example["kind"] == "activating" and w["example"] not in (3, 8), "no room to mark wrongly"
            acts = np.asarray(example["acts"])
            firing = np.flatnonzero(acts > 0)
            shift = w["marked"][0] - firing[0]
            assert w["marked"] == (firing + shift).tolist(), "the same runs and gaps"
            assert (shift == 0) == bool(w["truth"]) and (w["truth"] or (acts[w["marked"]] == 0).all())
            lo, hi = w["shown"]
            assert 32 // 8 <= w["marked"][0] - lo <= 32 // 2 and 0 <= hi - 1 - w["marked"][-1] <= 32 // 8
            # The marks wrap exactly the marked tokens, as the explanation prompt marks firing ones.
            inside = "".join(re.findall(r"<<(.*?)>>", w["text"]))
            assert inside == "".join(example["tokens"][i] for i in w["marked"])
            assert w["text"].replace("<<", "").replace(">>", "") == "".join(example["tokens"][lo:hi])
        wrong_sets.add(frozenset(w["example"] for w in windows if not w["truth"]))
    assert len(wrong_sets) > 10, "the seed chooses which windows are marked wrongly"

    # Windows of which none can be marked wrongly, or only one activating one: no pair.
    ctx.score = [ctx.score[3], ctx.score[8], *ctx.score[13:]]
    assert fuzzing_windows(ctx) is None
    ctx.score = [multi_token_context().score[0]]
    assert fuzzing_windows(ctx) is None


def test_fuzzing_answers_are_validated_and_asked_again(fake_gemini, capsys):
    contexts = synthetic_contexts()[:3]
    explanations = {f: f"Fires on the word {WORDS[i]}." for i, f in enumerate(FEATURES[:3])}

    def skip_a_window_and_add_a_stranger(request):
        reply = json.loads(knows_the_word(request).body["candidates"][0]["content"]["parts"][0]["text"])
        reply["features"][0]["scores"].pop()
        reply["features"].append({"feature": 424242, "scores": [{"window": 0, "score": 1.0}]})
        return json_reply(reply)

    fake_gemini.handler = route(truthful)
    fake_gemini.push(truthful, skip_a_window_and_add_a_stranger)
    results = score_explanations(contexts, explanations, new_client(), baseline=False)
    assert [r.system for r in fake_gemini.requests] == [DETECTION_SYSTEM] + [FUZZING_SYSTEM] * 2
    followup = fake_gemini.requests[2]
    assert "follow-up 1" in followup.prompt and [it["feature"] for it in items(followup)] == FEATURES[:1]
    assert followup.prompt.startswith("Judge the marked tokens in the windows of each of these 1 features")
    assert [it["explanation"] for it in items(followup)] == [explanations[FEATURES[0]]]
    out = capsys.readouterr().out
    assert "424242" in out and "lacked feature(s) [101]" in out
    assert 424242 not in results
    assert all(results[f]["fuzzing"]["balanced_accuracy"] == 1.0 for f in FEATURES[:3])
    # A reader that calls every marking right (or wrong) is at chance; one that inverts the truth is below.
    fake_gemini.handler = route(truthful, scorer(lambda word, text: 1.0 - marks_only(word, text)))
    inverted = score_explanations(contexts, explanations, new_client(), baseline=False, seed=1)
    assert all(inverted[f]["fuzzing"]["auroc"] == 0.0 for f in FEATURES[:3])
    assert all(inverted[f]["fuzzing"]["verdict"] == "below chance" for f in FEATURES[:3])
    skipped = score_explanations(contexts, explanations, new_client(), fuzzing=False)
    assert all(r["fuzzing"] is None and r["fuzzing_source"] == "not run" for r in skipped.values())


def test_wrong_and_missing_feature_ids_are_asked_again(fake_gemini, capsys):
    def one_right_one_stranger(request):
        it = items(request)[0]
        return json_reply(
            {
                "features": [
                    {
                        "feature": it["feature"],
                        "explanation": "Fires on the word apple.",
                        "deception_related": "no",
                        "kind": "none",
                    },
                    {
                        "feature": 424242,
                        "explanation": "not ours",
                        "deception_related": "yes",
                        "kind": "evasion",
                    },
                ]
            }
        )

    fake_gemini.handler = route(truthful)
    fake_gemini.push(one_right_one_stranger)
    contexts = synthetic_contexts()[:3]
    expl = explain_features(contexts, new_client(), features_per_request=3)
    asked = [[it["feature"] for it in items(r)] for r in fake_gemini.requests]
    assert asked == [FEATURES[:3], [FEATURES[1]], [FEATURES[2]]]
    assert "follow-up 1" in fake_gemini.requests[1].prompt
    assert 424242 not in expl and all(expl[f]["explanation"] for f in FEATURES[:3])
    out = capsys.readouterr().out
    assert "not in the batch" in out and "424242" in out and "lacked feature(s)" in out

    # A scoring answer that skips a window does not count: the feature is asked again.
    fake_gemini.requests.clear()

    def skip_a_window(request):
        reply = json.loads(truthful(request).body["candidates"][0]["content"]["parts"][0]["text"])
        reply["features"][0]["scores"].pop()
        return json_reply(reply)

    fake_gemini.push(skip_a_window)
    scores = score_explanations(
        contexts, {f: e["explanation"] for f, e in expl.items()}, new_client(), baseline=False
    )
    assert [r.system for r in fake_gemini.requests] == [DETECTION_SYSTEM] * 2 + [FUZZING_SYSTEM]
    assert all(scores[f]["detection"] and scores[f]["fuzzing"] for f in FEATURES[:3])


def test_a_malformed_answer_is_asked_again_in_smaller_batches(fake_gemini):
    fake_gemini.handler = route(truthful)
    fake_gemini.push(text_reply("not json"), text_reply("still not json"))
    results = explain_features(synthetic_contexts()[:4], new_client())
    assert all(r["explanation"] for r in results.values())
    assert [len(items(r)) for r in fake_gemini.requests] == [4, 4, 2, 2]


def test_settings_or_their_fields_as_keywords_ask_the_same(fake_gemini):
    fake_gemini.handler = route(truthful)
    by_settings = autointerp(
        synthetic_contexts(), new_client(), settings=AutointerpSettings(4, fuzzing=False)
    )
    sizes = [len(items(r)) for r in fake_gemini.requests]
    fake_gemini.requests.clear()
    by_keywords = autointerp(synthetic_contexts(), new_client(), features_per_request=4, fuzzing=False)
    assert by_keywords == by_settings and [len(items(r)) for r in fake_gemini.requests] == sizes
    assert len(sizes) == plan(8, 4, n_controls=0, fuzzing=False)["requests"] == 6 and set(sizes) == {4}
    with pytest.raises(TypeError, match=r"\['fuzing'\].*the autointerp settings are"):
        explain_features(synthetic_contexts(), new_client(), fuzing=False)


def test_a_rerun_is_answered_from_the_cache(fake_gemini, tmp_path):
    fake_gemini.handler = route(truthful)
    first = autointerp(synthetic_contexts(), new_client(cache_path=tmp_path / "cache.sqlite"))
    sent = len(fake_gemini.requests)
    client = new_client(cache_path=tmp_path / "cache.sqlite")
    again = autointerp(synthetic_contexts(), client)
    assert again == first and client.requests_made == 0 and len(fake_gemini.requests) == sent == 5


def test_a_daily_quota_stop_returns_partial_results_and_the_next_run_continues(fake_gemini, tmp_path, capsys):
    cache = tmp_path / "cache.sqlite"
    fake_gemini.handler = route(truthful)
    fake_gemini.push(explain_from_markers, daily_quota_exceeded())
    results = autointerp(synthetic_contexts(), new_client(cache_path=cache), features_per_request=4)
    assert len(fake_gemini.requests) == 2, "nothing is sent after a daily-quota stop"
    assert "daily quota" in capsys.readouterr().out
    for f in FEATURES[:4]:
        assert results[f]["explanation"] and results[f]["detection"] is None and results[f]["fuzzing"] is None
        assert (
            "daily quota" in results[f]["detection_source"] and "daily quota" in results[f]["fuzzing_source"]
        )
    for f in FEATURES[4:]:
        assert results[f]["explanation"] is None and results[f]["kind"] is None
        assert (
            "daily quota" in results[f]["explanation_source"]
            and "unavailable" in results[f]["explanation_source"]
        )

    client = new_client(cache_path=cache)  # the next day
    results = autointerp(synthetic_contexts(), client, features_per_request=4)
    assert client.requests_made == 1 + 4 * 2 and client.cache_hits == 1
    assert all(
        r["detection"]["balanced_accuracy"] == r["fuzzing"]["balanced_accuracy"] == 1.0
        for r in results.values()
    )


def test_a_budget_stop_marks_the_rest_unavailable(fake_gemini):
    fake_gemini.handler = route(truthful)
    results = autointerp(synthetic_contexts(), new_client(max_requests=2), features_per_request=4)
    assert len(fake_gemini.requests) == 2
    assert all(r["explanation"] for r in results.values())
    for r in results.values():
        assert "budget" in r["detection_source"] and r["detection"] is None
        assert "budget" in r["fuzzing_baseline_source"] and r["fuzzing_baseline"] is None


def test_offline_marks_everything_unavailable_and_sends_nothing(fake_gemini, capsys):
    results = autointerp(synthetic_contexts(), None)
    assert fake_gemini.requests == []
    for r in results.values():
        assert [r[k] for k in ("explanation", "deception_related", "kind", "detection", "fuzzing")] == [
            None
        ] * 5
        assert r["explanation_source"] == r["detection_source"] == r["fuzzing_source"] == OFFLINE
        assert r["detection_baseline_source"] == r["fuzzing_baseline_source"] == OFFLINE
    assert (
        score_explanations(synthetic_contexts()[:2], {f: "Fires on x." for f in FEATURES}, None)[FEATURES[0]][
            "fuzzing_source"
        ]
        == OFFLINE
    )
    assert OFFLINE in capsys.readouterr().out


def test_features_without_examples_are_not_sent(fake_gemini):
    fake_gemini.handler = route(truthful)
    contexts = synthetic_contexts()[:4]
    contexts[0].explain = [e for e in contexts[0].explain if e["kind"] != "activating"]
    contexts[1].score = [e for e in contexts[1].score if e["kind"] == "activating"]
    contexts[3].score = [e for e in contexts[3].score if e["kind"] != "activating"] + contexts[3].score[:1]
    results = autointerp(contexts, new_client())
    assert "no activating windows" in results[FEATURES[0]]["explanation_source"]
    assert results[FEATURES[0]]["detection"] is None and results[FEATURES[0]]["fuzzing"] is None
    # Only activating windows: no detection, but fuzzing (which uses only those).
    assert results[FEATURES[1]]["explanation"] and results[FEATURES[1]]["detection"] is None
    assert "needs activating and non-activating" in results[FEATURES[1]]["detection_source"]
    assert results[FEATURES[1]]["fuzzing"]["balanced_accuracy"] == 1.0
    # One activating window: detection, but no right/wrong pair for fuzzing.
    assert results[FEATURES[3]]["detection"]["n_activating"] == 1 and results[FEATURES[3]]["fuzzing"] is None
    assert "fuzzing needs two activating" in results[FEATURES[3]]["fuzzing_source"]
    assert [it["feature"] for it in items(fake_gemini.requests[0])] == FEATURES[1:4]
    by_system = {}
    for r in fake_gemini.requests:
        by_system.setdefault(r.system, []).append([it["feature"] for it in items(r)])
    assert by_system[DETECTION_SYSTEM] == [[FEATURES[2], FEATURES[3]]] * 2
    assert by_system[FUZZING_SYSTEM] == [[FEATURES[1], FEATURES[2]]] * 2
    assert results[FEATURES[2]]["baseline_explanation_of"] == FEATURES[3]


def test_plan_fits_a_typical_run_into_the_free_tier():
    typical = plan(8, n_saes=3)  # 8 features and 2 random controls explained per SAE
    keys = ["explain", "detection", "detection_baseline", "fuzzing", "fuzzing_baseline"]
    assert [typical[f"{k}_requests"] for k in keys] == [6, 3, 3, 3, 3]
    assert typical["requests"] == 18 and typical["days_on_free_tier"] == 1
    assert plan(6, n_saes=3)["requests"] == 15, "6 features + 2 controls fit one request per SAE"
    assert plan(20, 8, baseline=False)["requests"] == 3 + 3 + 3
    assert plan(20, 8, baseline=False, fuzzing=False)["requests"] == 3 + 3
    assert plan(20, 8, score_features_per_request=4)["requests"] == 3 + 4 * 5
    with pytest.raises(ValueError, match="features_per_request"):
        plan(8, 0)
