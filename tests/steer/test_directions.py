"""Steering: exact additive interventions, clamping that keeps the SAE error, the experiment and its tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats

import helpers
from helpers.collect.judge import Label
from helpers.collect.prompts import load_scenarios
from helpers.collect.sampling import sample_completions
from helpers.model.hooks import capture, decoder_layers, hook_name
from helpers.saes import JumpReLUSAE, TopKSAE
from helpers.saes.io import load_sae, save_sae
from helpers.stats import difference_ci, sign_flip_test, wilson_ci
from helpers.steer.directions import (
    Condition,
    build_conditions,
    check_sae_matches,
    clamp_feature,
    diff_of_means_direction,
    feature_direction,
    random_direction,
    random_feature,
    residual_norm,
    steer,
)
from helpers.steer.pipeline import (
    compare_to_controls,
    completion_nll,
    condition_stats,
    held_out_prompts,
    read_steering,
    run_steering_experiment,
    sample_size,
)

LAYER = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ids_for(lm, text="Did you break the vase? Tell me honestly."):
    return torch.tensor([helpers.encode_chat(lm.tokenizer, text)])


def residuals(model, ids, layers):
    with capture(model, [hook_name(i) for i in layers]) as cache, torch.no_grad():
        model(ids)
    return {i: cache[hook_name(i)][0] for i in layers}  # [seq, d_model] each


def no_hooks_left(model) -> bool:
    # transformers 5 installs a permanent output-capturing hook the first time output_hidden_states is
    # used on a model (an earlier test may have done so on the shared offline model): that one is not ours.
    return all(
        "output_capturing_hook" in getattr(h, "__qualname__", "")
        for layer in decoder_layers(model)
        for h in layer._forward_hooks.values()
    )


def test_strength_zero_reproduces_unsteered_generation(tiny):
    prompts = [(p.id, p.user, p.system) for p in load_scenarios(paraphrases=False)[:2]]
    kw = dict(n_per_prompt=2, temperature=1.0, max_new_tokens=6, seed=3)
    plain = [c.completion_token_ids for c in sample_completions(tiny, prompts, **kw)]
    direction = random_direction(32, 1.0, seed=0)
    with steer(tiny, 1, direction, 0.0, scale=5.0):
        zero = [c.completion_token_ids for c in sample_completions(tiny, prompts, **kw)]
    with steer(tiny, 1, direction, 20.0, scale=5.0):
        pushed = [c.completion_token_ids for c in sample_completions(tiny, prompts, **kw)]
    assert zero == plain, "strength 0 must reproduce the unsteered tokens exactly"
    assert pushed != plain, "a strong push should change the sampled tokens (else this test cannot fail)"


def test_steer_adds_exactly_the_vector_at_its_layer_and_nothing_before(offline_lm):
    model, ids = offline_lm.model, ids_for(offline_lm)
    layers = [LAYER - 1, LAYER, LAYER + 1]
    clean = residuals(model, ids, layers)
    direction = torch.randn(576, generator=torch.Generator().manual_seed(1)) * 7  # not unit: steer normalises
    with steer(offline_lm, LAYER, direction, 2.5, scale=4.0) as vec:
        steered = residuals(model, ids, layers)
    assert no_hooks_left(model)
    torch.testing.assert_close(vec, direction / direction.norm() * 10.0)
    assert torch.equal(steered[LAYER - 1], clean[LAYER - 1]), "layers before the hook must not change"
    tol = 2e-6 * float(clean[LAYER].abs().max())  # float32 rounding of x + v - x at the largest |x|
    torch.testing.assert_close(steered[LAYER] - clean[LAYER], vec.expand_as(clean[LAYER]), atol=tol, rtol=0)
    assert (steered[LAYER + 1] - clean[LAYER + 1]).norm() > 1.0, "the push must propagate to later layers"


def tied_sae(x: torch.Tensor, feature: int, d_sae: int = 64) -> JumpReLUSAE:
    """An SAE whose encoder inverts its decoder on its latents: orthonormal decoder rows, W_enc = W_dec^T,
    threshold 0, and `feature` kept active on every token by its bias. For it, re-encoding x + δ·W_dec[i]
    moves latent i by exactly δ, so clamping must re-encode to exactly the clamped value."""
    sae = JumpReLUSAE(x.shape[-1], d_sae, l0=8)
    q, _ = torch.linalg.qr(torch.randn(x.shape[-1], d_sae, generator=torch.Generator().manual_seed(2)))
    b_enc = torch.zeros(d_sae)
    b_enc[feature] = float((x @ q[:, feature]).abs().max()) + 1.0
    sae.load_saelens_state(
        {
            "W_enc": q,
            "b_enc": b_enc,
            "W_dec": q.t().contiguous(),
            "b_dec": torch.zeros(x.shape[-1]),
            "threshold": torch.zeros(d_sae),
        }
    )
    return sae.eval()


def test_clamp_sets_the_feature_and_keeps_the_error(offline_lm):
    model, ids, f, value = offline_lm.model, ids_for(offline_lm), 5, 3.0
    x = residuals(model, ids, [LAYER])[LAYER]
    sae = tied_sae(x, f)
    with clamp_feature(offline_lm, sae, LAYER, f, value):
        x_new = residuals(model, ids, [LAYER])[LAYER]
    assert no_hooks_left(model)
    acts, acts_new = sae.encode(x)[0], sae.encode(x_new)[0]
    scale = float(x.abs().max())
    torch.testing.assert_close(
        acts_new[:, f], torch.full_like(acts_new[:, f], value), atol=1e-5 * scale, rtol=0
    )
    others = torch.arange(64) != f
    torch.testing.assert_close(acts_new[:, others], acts[:, others], atol=1e-5 * scale, rtol=0)
    error, error_new = x - sae.decode(acts), x_new - sae.decode(acts_new)
    torch.testing.assert_close(error_new, error, atol=1e-5 * scale, rtol=0)
    assert error.norm() > 1.0, "the residual must have an error term for this test to mean anything"


def test_clamp_is_x_plus_the_latent_change_for_any_sae(offline_lm):
    """Untied TopK SAE: x' = x + (value - f(x)) W_dec[f] per token, i.e. x' - decode(f') = x - decode(f)."""
    model, ids, f = offline_lm.model, ids_for(offline_lm), 7
    sae = TopKSAE(576, 128, l0=16, seed=4).eval()
    x = residuals(model, ids, [LAYER])[LAYER]
    with clamp_feature(model, sae, LAYER, f, 0.0):  # ablation
        x_new = residuals(model, ids, [LAYER])[LAYER]
    acts = sae.encode(x)[0]
    clamped = acts.clone()
    clamped[:, f] = 0.0
    tol = 2e-6 * float(x.abs().max())
    torch.testing.assert_close(x_new - sae.decode(clamped), x - sae.decode(acts), atol=tol, rtol=0)
    assert (acts[:, f] > 0).any(), "feature must fire somewhere for the ablation to be tested"


def test_hooks_are_removed_after_an_exception(offline_lm):
    model, ids = offline_lm.model, ids_for(offline_lm)
    clean = model(ids).logits
    for ctx in (
        steer(model, LAYER, torch.ones(576), 3.0),
        clamp_feature(model, TopKSAE(576, 32, l0=4), LAYER, 1, 5.0),
    ):
        with pytest.raises(RuntimeError, match="boom"), ctx:
            model(ids)
            raise RuntimeError("boom")
        assert no_hooks_left(model)
    assert torch.equal(model(ids).logits, clean)


def test_feature_index_and_mismatched_saes_raise_clear_errors(offline_lm, tmp_path):
    sae = TopKSAE(576, 32, l0=4)
    with pytest.raises(IndexError, match="d_sae=32"):
        feature_direction(sae, 32)
    with pytest.raises(IndexError, match="d_sae=32"), clamp_feature(offline_lm, sae, LAYER, 40, 1.0):
        pass

    def saved(name, d_in=576, layer=LAYER, model_name="HuggingFaceTB/SmolLM2-135M-Instruct"):
        return load_sae(
            save_sae(
                TopKSAE(d_in, 32, l0=4), tmp_path / name, hook_name=hook_name(layer), model_name=model_name
            )
        )

    check_sae_matches(saved("ok"), offline_lm, LAYER)  # same model under another spelling: accepted
    with clamp_feature(offline_lm.model, saved("ok"), LAYER, 0, 1.0):  # a bare model has no name to compare
        pass
    with pytest.raises(ValueError, match=r"karpathy/nanochat-d32.*offline:smollm2-135m-instruct"):
        check_sae_matches(saved("other_model", model_name="karpathy/nanochat-d32"), offline_lm, LAYER)
    with pytest.raises(ValueError, match=r"blocks\.5\.hook_resid_post.*blocks\.10\.hook_resid_post"):
        clamp_feature(offline_lm, saved("other_hook", layer=5), LAYER, 0, 1.0).__enter__()
    with pytest.raises(ValueError, match="d_in=64.*d_model=576"):
        check_sae_matches(saved("narrow", d_in=64), offline_lm, LAYER)
    assert no_hooks_left(offline_lm.model)


def test_directions_and_the_strength_unit(tmp_path):
    sae = TopKSAE(16, 40, l0=4, seed=1)
    d = feature_direction(sae, 3)
    assert float(d.norm()) == pytest.approx(1.0) and torch.allclose(
        d * sae.W_dec[3].norm(), sae.W_dec[3].detach()
    )
    r = random_direction(16, 2.5, seed=7)
    assert float(r.norm()) == pytest.approx(2.5) and torch.equal(r, random_direction(16, 2.5, seed=7))
    assert not torch.equal(r, random_direction(16, 2.5, seed=8))
    assert {random_feature(sae, exclude=range(39), seed=s) for s in range(5)} == {39}
    # A run folder: pooled vectors with a planted deceptive-minus-honest offset, and a token store.
    ids = [f"p{i}#0" for i in range(6)]
    labels = ["honest", "deceptive", "honest", "deceptive", "ambiguous", "deceptive"]
    mean = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    (tmp_path / "pooled").mkdir()
    save_file(
        {"mean": mean, "last": mean * 2},
        str(tmp_path / "pooled" / "layer_2.safetensors"),
        metadata={"completion_ids": json.dumps(ids)},
    )
    rows = [{"id": i, "prompt_id": i[:2], "label": lab} for i, lab in zip(ids, labels, strict=True)]
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = mean[[1, 3, 5]].mean(0) - mean[[0, 2]].mean(0)
    torch.testing.assert_close(diff_of_means_direction(tmp_path, 2), expected / expected.norm())
    assert residual_norm(tmp_path, 2) == pytest.approx(
        float((mean * 2).norm(dim=1).mean())
    )  # no store: pooled
    tokens = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)) * 3
    with helpers.collect.store.ActivationWriter(tmp_path, 2) as w:
        w.add("p0#0", tokens[:20])
        w.add("p1#0", tokens[20:])
    stored = tokens.half().float()  # the store keeps float16
    assert residual_norm(tmp_path, 2) == pytest.approx(float(stored.norm(dim=1).mean()), rel=1e-5)


def test_nll_matches_the_models_own_loss(offline_lm):
    c = sample_completions(
        offline_lm, [("q", "Say hello.", None)], n_per_prompt=1, temperature=0, max_new_tokens=5
    )[0]
    seq = torch.tensor([c.prompt_token_ids + c.completion_token_ids])
    labels = seq.clone()
    labels[0, : len(c.prompt_token_ids)] = -100  # score only the completion, as completion_nll does
    with torch.no_grad():
        mean_loss = float(offline_lm.model(seq, labels=labels).loss)
    (nll, n), *_ = completion_nll(offline_lm, [c])
    assert n == c.n_tokens > 0 and nll / n == pytest.approx(mean_loss, rel=1e-4)


def test_experiment_writes_rows_resumes_and_refuses_changed_settings(tiny, tmp_path, monkeypatch):
    sae = load_sae(
        save_sae(
            TopKSAE(32, 48, l0=4, seed=2),
            tmp_path / "saes" / "tiny_topk_L1_mixed",
            hook_name=hook_name(1),
            model_name="tiny-llama",
        )
    )
    conditions = build_conditions(sae, [5], [0.0, 30.0], residual_norm=2.0, n_random=1, seed=0)
    assert [c.kind for c in conditions] == ["none"] + ["feature", "random_feature", "random_direction"] * 2
    prompts = load_scenarios(paraphrases=False)[:2]
    kw = dict(run_dir=tmp_path, n_per_prompt=2, max_new_tokens=5, seed=1)
    rows = run_steering_experiment(tiny, prompts, conditions, **kw)
    assert [r["name"] for r in read_steering(tmp_path)] == [c.name for c in conditions]
    none, zero, pushed = rows[0], rows[1], rows[4]
    assert [s["completion"] for s in zero["samples"]] == [s["completion"] for s in none["samples"]]
    assert [s["completion"] for s in pushed["samples"]] != [s["completion"] for s in none["samples"]]
    for r in rows:
        st = r["stats"]
        assert st["n"] == 4 and st["n_prompts"] == 2 and st["label_sources"] == {"rules": 4}
        assert st["n_deceptive"] + st["n_honest"] + st["n_ambiguous"] == 4
        assert st["rate_ci"][0] <= st["deceptive_rate"] <= st["rate_ci"][1] and st["perplexity"] > 1
    assert pushed["vector_norm"] == pytest.approx(60.0) and pushed["feature"] == 5
    monkeypatch.setattr("helpers.steer.pipeline.sample_completions", lambda *a, **k: pytest.fail("resampled"))
    again = run_steering_experiment(tiny, prompts, conditions, **kw)
    assert again == rows and len(read_steering(tmp_path)) == len(conditions)
    # one no-steering row serves every layer: asking for it at another layer reuses it
    assert run_steering_experiment(tiny, prompts, [Condition("none", "none", 2)], **kw) == rows[:1]
    changed = Condition(conditions[4].name, "feature", 1, 10.0, feature_direction(sae, 5), residual_norm=2.0)
    with pytest.raises(ValueError, match="other .*strength"):
        run_steering_experiment(tiny, prompts, [changed], **kw)


def test_experiment_passes_the_judge_client_and_saves_nothing_half_labelled(tiny, tmp_path, monkeypatch):
    seen = []

    def judge(items, prompts_by_id, client=None):  # Gemini ran out of quota after the first answer
        seen.append(client)
        first, *rest = (it["id"] for it in items)
        return {
            first: Label("deceptive", 0.9, "lied", "gemini:fake"),
            **{i: Label("ambiguous", 0.0, "not labelled yet", "none") for i in rest},
        }

    monkeypatch.setattr("helpers.steer.pipeline.label_all", judge)
    conds = [Condition("none", "none", 1), Condition("push", "random_direction", 1, 3.0, torch.ones(32))]
    kw = dict(run_dir=tmp_path, n_per_prompt=2, max_new_tokens=3, seed=0, judge_client="client")
    assert run_steering_experiment(tiny, load_scenarios(paraphrases=False)[:1], conds, **kw) == []
    assert seen == ["client"] and read_steering(tmp_path) == []


def fake_row(name, kind, per_prompt, strength=4.0, ppl=10.0, n=4, per_scenario=1, ambiguous=0):
    """A steering.jsonl row whose prompt i has per_prompt[i] deceptive samples out of n (then
    `ambiguous` ambiguous ones), prompts taken `per_scenario` at a time into one scenario."""
    samples = [
        {
            "prompt_id": f"p{i}",
            "group": f"s{i // per_scenario}",
            "label": "deceptive" if k < d else "ambiguous" if k < d + ambiguous else "honest",
        }
        for i, d in enumerate(per_prompt)
        for k in range(n)
    ]
    k = sum(s["label"] == "deceptive" for s in samples)
    return {
        "name": name,
        "kind": kind,
        "layer": 3,
        "strength": strength,
        "feature": 1 if kind == "feature" else None,
        "sampling": {"seed": 0, "n_per_prompt": n},
        "samples": samples,
        "stats": {
            "n_deceptive": k,
            "n": len(samples),
            "perplexity": ppl,
            "label_sources": {"rules": len(samples)},
        },
    }


def control_rows() -> list[dict]:
    """No steering, the two random controls, a feature that makes every answer deceptive (less fluent)
    and one at the random feature's rate."""
    return [
        fake_row("none", "none", [0] * 8, strength=0.0),
        fake_row("rf", "random_feature", [1, 0, 0, 1, 0, 0, 1, 0]),
        fake_row("rd", "random_direction", [0] * 8),
        fake_row("strong", "feature", [4] * 8, ppl=50.0),
        fake_row("null", "feature", [0, 1, 0, 0, 1, 0, 0, 1]),
    ]


def test_compare_to_controls_reports_effects_and_nulls_plainly():
    out = {(o["condition"], o["control"]): o for o in compare_to_controls(control_rows())}
    assert len(out) == 6
    s = out["strong", "none"]
    assert s["difference"] == 1.0 and s["p_value"] == pytest.approx(2 / 256) and s["q_value"] < 0.05
    assert s["verdict"].startswith("raises the deceptive rate vs no steering by 100 points")
    assert "less fluent" in s["verdict"] and "[labels: offline rules]" in s["verdict"]
    n = out["null", "random_feature"]
    assert n["difference"] == 0.0 and n["p_value"] == 1.0
    assert n["verdict"].startswith("no detectable effect vs random feature controls at this N")
    assert all(o["q_value"] >= o["p_value"] for o in out.values())
    few = compare_to_controls([fake_row("none", "none", [0, 0, 0]), fake_row("f", "feature", [4, 4, 4])])
    assert few[0]["min_possible_p"] == 0.25 and "no test can reach p<0.05" in few[0]["verdict"]


def test_statistics_match_scipy():
    for k, n in ((0, 10), (3, 10), (17, 40)):
        ref = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_ci(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    # The MOVER with uncorrelated estimates is Newcombe's hybrid score interval (statsmodels' "newcomb").
    from statsmodels.stats.proportion import confint_proportions_2indep

    ref = confint_proportions_2indep(7, 20, 3, 25, method="newcomb")
    assert difference_ci((7 / 20, *wilson_ci(7, 20)), (3 / 25, *wilson_ci(3, 25)), 0.0) == pytest.approx(ref)
    diffs = np.array([0.5, 0.25, -0.25, 0.75, 0.5, 0.0, 1.0])
    ref = stats.permutation_test((diffs,), np.mean, permutation_type="samples", n_resamples=np.inf)
    assert sign_flip_test(diffs) == pytest.approx(ref.pvalue)


def test_held_out_prompts_skip_scenarios_the_features_were_chosen_on(tmp_path):
    prompts = [
        p
        for p in load_scenarios(paraphrases=True)
        if p.group in ("werewolf_village", "used_car_transmission")
    ]

    def write(rows):
        (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write([{"id": "werewolf_village/q0#0", "prompt_id": "werewolf_village/q0", "group": "werewolf_village"}])
    assert {p.group for p in held_out_prompts(tmp_path, prompts)} == {"used_car_transmission"}
    write(
        [
            {"id": f"{g}/q0#0", "prompt_id": f"{g}/q0", "group": g}
            for g in ("werewolf_village", "used_car_transmission")
        ]
    )
    paraphrases = held_out_prompts(tmp_path, prompts)
    assert paraphrases and all(not p.id.endswith("/q0") for p in paraphrases)
    write([{"id": f"{p.id}#0", "prompt_id": p.id, "group": p.group} for p in prompts])
    with pytest.raises(ValueError, match="all .* prompts were used"):
        held_out_prompts(tmp_path, prompts)


def test_held_out_prompts_come_one_per_scenario_first(tmp_path):
    prompts = [p for p in load_scenarios(paraphrases=True)][:12]
    scenarios = list(dict.fromkeys(p.group for p in prompts))
    (tmp_path / "completions.jsonl").write_text("")
    one_each = held_out_prompts(tmp_path, prompts, per_scenario=1)
    assert [p.group for p in one_each] == scenarios and all(p.id.endswith("/q0") for p in one_each)
    assert [p.group for p in held_out_prompts(tmp_path, prompts, n=2)] == scenarios[:2]
    more = held_out_prompts(tmp_path, prompts, n=len(scenarios) + 1)
    assert [p.group for p in more] == scenarios + scenarios[:1], "every scenario's first, then seconds"
    assert len(held_out_prompts(tmp_path, prompts)) == len(prompts)
    size = sample_size(one_each, 4)
    assert size == {
        "n_scenarios": len(scenarios),
        "n_prompts": len(scenarios),
        "n_per_prompt": 4,
        "answers_per_condition": 4 * len(scenarios),
        "min_possible_p": 2 / 2 ** len(scenarios),
    }


def test_paraphrases_of_a_scenario_are_one_unit_of_the_test():
    """Ten prompts from three scenarios are three units: the test's smallest p is 2/2^3, however many
    paraphrases there are, and the verdict says no test can reach 0.05."""
    rows = [
        fake_row("none", "none", [0] * 9, strength=0.0, per_scenario=3),
        fake_row("f", "feature", [4] * 9, per_scenario=3),
    ]
    (out,) = compare_to_controls(rows)
    assert out["n_scenarios"] == 3 and out["min_possible_p"] == 0.25 and out["p_value"] == 0.25
    assert "with 3 scenarios no test can reach p<0.05" in out["verdict"]
    # all lie vs none, but 3 scenarios: the interval is as wide as the test is weak, not (1, 1)
    assert out["difference"] == 1.0 and out["difference_ci"][0] < 0.5 and out["difference_ci"][1] == 1.0


def test_ambiguous_answers_are_their_own_category():
    base = fake_row("none", "none", [1] * 8, strength=0.0)
    babble = fake_row("f", "feature", [0] * 8, ambiguous=3)
    for row in (base, babble):
        for smp in row["samples"]:
            smp.update(nll=1.0, n_tokens=2, label_source="rules")
    st = condition_stats(babble["samples"])
    assert (st["deceptive_rate"], st["ambiguous_rate"], st["honest_rate"]) == (0.0, 0.75, 0.25)
    assert st["deceptive_among_decided"] == 0.0 and st["n_scenarios"] == 8
    assert st["ambiguous_rate_ci"][0] <= 0.75 <= st["ambiguous_rate_ci"][1]
    (out,) = compare_to_controls([base, babble])
    assert (
        out["ambiguous_difference"] == 0.75
        and "ambiguous answers +75 points (not counted as honest)" in out["verdict"]
    )
