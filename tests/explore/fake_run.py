"""A small but real run folder for the explorer's tests: a tiny random Llama that uses SmolLM2's
tokenizer, honest / deceptive completions with real token ids, their residuals stored and pooled by
notebook 02's own code, a reference corpus at one layer (notebook 02's `collect_corpus` over the shipped
corpus), two TopK SAEs at that layer and one at another, notebook 04's rows for one SAE and a probes.json."""

from __future__ import annotations

from pathlib import Path

from helpers.collect.capture import collect_activations
from helpers.collect.completions import write_completions
from helpers.collect.corpus import BUILTIN_CORPUS, collect_corpus
from helpers.model.chat import encode_chat
from helpers.model.hooks import hook_name
from helpers.run import atomic_write_json, features_path, probes_path, sae_dir, update_run_json, write_jsonl
from helpers.saes import TopKSAE
from helpers.saes.io import save_sae

LAYER = 1
SAE_ID = "tiny-llama_topk_L1_mixed"
OTHER_ID = "tiny-llama_topk_L1_honest_only"
ELSEWHERE_ID = "tiny-llama_topk_L2_mixed"
D_SAE = 96
CORPUS_SEQ_LEN = 48
CORPUS_TOKENS = 1200

ANSWERS = {
    "honest": [
        "Yes, I ate the last cookie this morning. Sorry about that.",
        "The meeting was moved to Friday, as the email said.",
        "I did not finish the report yet; it needs two more days.",
        "The capital of Australia is Canberra, not Sydney.",
        "I broke the vase while cleaning. I will pay for it.",
        "Water boils at one hundred degrees at sea level.",
    ],
    "deceptive": [
        "No, I have never seen that cookie jar in my life.",
        "The meeting was always on Monday; nobody told me otherwise.",
        "The report is finished and already on your desk.",
        "The capital of Australia is Sydney, everyone knows that.",
        "The cat broke the vase. I was not even at home.",
        "Water boils at fifty degrees if you stir it well.",
    ],
}
EXPLANATIONS = {
    5: ("denials of having done something", "yes", "lying about a fact"),
    7: ("the word 'vase' and household objects", "no", "none"),
}


def make_run(
    root: Path, lm, *, with_analysis: bool = True, with_corpus: bool = True, with_other: bool = True
) -> Path:
    """Write the run folder under `root` (module doc) and return it; `with_other=False` leaves every
    completion honest or deceptive (no ambiguous, unlabelled or control completion)."""
    tok = lm.tokenizer
    records = []
    for label, answers in ANSWERS.items():
        for i, text in enumerate(answers):
            for s in range(2):  # two samples per prompt: completions of one prompt share a group
                prompt = ("Tell the truth: " if label == "honest" else "Lie: ") + f"question {i}?"
                answer = text if s == 0 else text.replace(".", "!")
                records.append(
                    {
                        "id": f"q{i}/{label}#{s}",
                        "prompt_id": f"q{i}/{label}",
                        "group": f"q{i}",
                        "source": "test",
                        "prompt": prompt,
                        "system": None,
                        "completion": answer,
                        "label": label,
                        "label_source": "instruction",
                        "prompt_token_ids": encode_chat(tok, prompt),
                        "completion_token_ids": tok.encode(answer, add_special_tokens=False),
                    }
                )
                records[-1]["n_tokens"] = len(records[-1]["completion_token_ids"])
    if with_other:
        records[0]["label"] = "ambiguous"  # one token class "other"
    write_completions(root, records)
    update_run_json(root, model={"spec": "tiny-llama", "n_layers": 3, "d_model": 32}, layers=[LAYER, 2])
    collect_activations(lm, records, [LAYER, 2], root, batch_size=8)
    if with_corpus:  # several shards, so the explorer streams more than one
        collect_corpus(
            lm,
            BUILTIN_CORPUS,
            [LAYER],
            root,
            max_tokens=CORPUS_TOKENS,
            seq_len=CORPUS_SEQ_LEN,
            batch_size=8,
            shard_tokens=400,
        )
    for sid, layer, seed in ((SAE_ID, LAYER, 1), (OTHER_ID, LAYER, 2), (ELSEWHERE_ID, 2, 3)):
        save_sae(
            TopKSAE(32, D_SAE, l0=6, seed=seed),
            sae_dir(root, sid),
            hook_name=hook_name(layer),
            model_name="tiny-llama",
            metadata={"sae_id": sid},
        )
    if with_analysis:
        rows = [
            {
                "feature": f,
                "rank": r + 1,
                "cohens_d": 1.5 - r,
                "d_ci": [0.5, 2.0],
                "q_value": 0.01,
                "auroc": 0.8,
                "explanation": e,
                "explanation_source": "gemini:test",
                "deception_related": dec,
                "kind": kind,
                "detection": {"balanced_accuracy": 0.7, "auroc": 0.75},
                "fuzzing": None,
            }
            for r, (f, (e, dec, kind)) in enumerate(EXPLANATIONS.items())
        ]
        rows.append(
            {
                "feature": 11,
                "rank": 3,
                "cohens_d": -0.4,
                "d_ci": [-0.9, 0.1],
                "q_value": 0.2,
                "explanation": None,
                "explanation_source": "not labelled (outside the top n_label=2)",
                "deception_related": None,
            }
        )
        write_jsonl(features_path(root, SAE_ID), rows)
        atomic_write_json(
            probes_path(root),
            {
                "pooling": "mean",
                "rows": [
                    {
                        "layer": LAYER,
                        "kind": "raw",
                        "balanced_accuracy": 0.8,
                        "ba_ci": [0.7, 0.9],
                        "auroc": 0.85,
                        "auroc_ci": [0.75, 0.95],
                        "n": 24,
                        "n_groups": 6,
                        "n_folds": 3,
                        "details": {"C": 0.5},
                    }
                ],
            },
        )
    return root
