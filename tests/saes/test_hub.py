"""Publishing: the dry run's card and files (loaded back with sae_lens itself), bad input stopped before any
network call, the single-commit upload (against a recording fake of HfApi), and the run zip."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from helpers.model.hooks import hook_name
from helpers.release import GITHUB_REPO, INSTALL_URL, __version__
from helpers.run import DRY_RUN_DIR
from helpers.saes import JumpReLUSAE, TopKSAE
from helpers.saes.hub import check_repo_id, model_card, publish_saes
from helpers.saes.io import load_sae, save_sae

DATA = Path(__file__).parent / "data"
SPEC = "HuggingFaceTB/SmolLM2-135M-Instruct"
IDS = ["SmolLM2_topk_L3_mixed", "SmolLM2_jumprelu_L5_deceptive_only"]
NETWORK = (
    "create_repo",
    "create_commit",
    "upload_folder",
    "upload_file",
    "whoami",
    "repo_info",
    "preupload_lfs_files",
)


@pytest.fixture()
def run(tmp_path):
    root = tmp_path / "my_run"
    (root / "saes").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"model": {"spec": SPEC}}))
    saes = {
        IDS[0]: (TopKSAE(16, 40, l0=4, seed=1), 3, "mixed"),
        IDS[1]: (JumpReLUSAE(16, 40, l0=4, seed=2), 5, "deceptive_only"),
    }
    for i, (sid, (sae, layer, cond)) in enumerate(saes.items()):
        with torch.no_grad():  # non-trivial biases so a wrong load would show
            sae.b_dec.normal_(generator=torch.Generator().manual_seed(i))
            sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(i + 5))
        save_sae(
            sae,
            root / "saes" / sid,
            hook_name=hook_name(layer),
            model_name=SPEC,
            scale=2.0,
            metadata={"sae_id": sid, "condition": cond},
        )
        metrics = {
            "sae_id": sid,
            "architecture": sae.architecture,
            "layer": layer,
            "condition": cond,
            "activations": {"explained_variance": 0.8123 - i / 10, "l0": 12.5, "dead_fraction": 0.25},
            "training": {"tokens": 20480},
            "lm": {"loss_recovered": 0.9},
        }
        (root / "saes" / sid / "metrics.json").write_text(json.dumps(metrics))
    (root / "saes" / IDS[0] / "checkpoint.pt").write_bytes(b"stale")
    save_sae(TopKSAE(16, 8, l0=2), root / "saes" / "not_chosen", hook_name=hook_name(1), model_name=SPEC)
    comps = [
        {
            "id": f"s{i}/q0#0",
            "prompt_id": f"s{i}/q0",
            "source": "builtin:scenarios",
            "label": ("honest", "deceptive", "ambiguous")[i % 3],
            "label_source": "rules",
        }
        for i in range(6)
    ]
    (root / "completions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in comps))
    probes = [
        {
            "layer": 3,
            "kind": "raw",
            "balanced_accuracy": 0.7,
            "ba_ci": [0.6, 0.8],
            "auroc": 0.75,
            "auroc_ci": [0.65, 0.85],
        },
        {
            "layer": 3,
            "kind": "sae",
            "sae_id": IDS[0],
            "balanced_accuracy": 0.66,
            "ba_ci": [0.55, 0.77],
            "auroc": 0.7,
            "auroc_ci": [0.6, 0.8],
            "verdict": "no significant difference",
            "extra": 1,
        },
    ]
    (root / "probes.json").write_text(json.dumps({"rows": probes}))
    (root / "features").mkdir()
    feats = [
        {
            "feature": 7,
            "rank": 1,
            "cohens_d": 1.1,
            "d_ci": [0.8, 1.4],
            "q_value": 0.002,
            "explanation": "denial of a secret",
        }
    ]
    (root / "features" / f"{IDS[0]}.jsonl").write_text(json.dumps(feats[0]) + "\n")
    return root


@pytest.fixture()
def no_network(monkeypatch):
    """Any HfApi network method fails the test."""
    for name in NETWORK:
        monkeypatch.setattr(
            huggingface_hub.HfApi, name, lambda *a, _n=name, **k: pytest.fail(f"HfApi.{_n} called")
        )


def card_text(run_dir: Path, sae_ids: list[str]) -> str:
    """The model card with the release's values as placeholders, so a version bump leaves the golden cards."""
    card = model_card(run_dir, sae_ids, "someone/deception-saes")
    card = card.replace(INSTALL_URL, "<INSTALL_URL>").replace(GITHUB_REPO, "<GITHUB_REPO>")
    return card.replace(__version__, "<VERSION>")


def test_model_card_matches_the_golden_cards(run):
    """Byte for byte the cards written before the card became a template: the full run, then a run with
    no completions, probes or features but an explorer, whose model comes from the SAE's cfg."""
    assert card_text(run, IDS) == (DATA / "model_card_full.txt").read_text()
    for name in ("completions.jsonl", "probes.json"):
        (run / name).unlink()
    (run / "features" / f"{IDS[0]}.jsonl").unlink()
    (run / "run.json").write_text("{}")
    (run / "explorer").mkdir()
    (run / "explorer" / "index.html").write_text("<html></html>")
    assert card_text(run, IDS[1:]) == (DATA / "model_card_bare.txt").read_text()


def expected_files() -> list[str]:
    per_sae = ("cfg.json", "metrics.json", "sae_weights.safetensors")
    return sorted(["README.md", *(f"{sid}/{name}" for sid in IDS for name in per_sae)])


def test_dry_run_writes_the_exact_upload_and_a_complete_card(run, no_network):
    out = publish_saes(run, IDS, "someone/deception-saes", dry_run=True)
    folder = run / DRY_RUN_DIR
    assert out["uploaded"] is False and out["folder"] == folder and out["files"] == expected_files()
    assert (
        sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == expected_files()
    )
    text = (folder / "README.md").read_text()
    card = huggingface_hub.ModelCard(text)
    assert card.data.library_name == "saelens" and card.data.base_model == SPEC
    assert {"saelens", "sparse-autoencoder", "topk", "jumprelu"} <= set(card.data.tags)
    for needed in (
        "`blocks.3.hook_resid_post`",
        "`blocks.5.hook_resid_post`",
        "| 16 -> 40 |",
        "| 0.812 |",
        "20,480",
        "deceptive_only`: trained on the tokens of deceptive completions only",
        "6 completions of 6 prompts",
        "honest: 2",
        "offline regex judge",
        "0.660 [0.550, 0.770]",
        "0.700 [0.600, 0.800]",
        "latent 7: d = 1.100 [0.800, 1.400]",
        "denial of a secret",
        f'SAE.from_pretrained(release="someone/deception-saes", sae_id="{IDS[0]}")',
        "SAE.load_from_disk",
        f'load_sae("someone/deception-saes/{IDS[0]}")',
    ):
        assert needed in text, needed
    # A second dry run replaces the first: the folder always lists exactly one upload.
    publish_saes(run, IDS[:1], "someone/deception-saes", dry_run=True)
    assert not (folder / IDS[1]).exists()


def test_dry_run_saes_load_with_sae_lens_and_helpers(run, no_network, monkeypatch):
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders

    publish_saes(run, IDS, "someone/deception-saes", dry_run=True)
    folder = run / DRY_RUN_DIR
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0)) * 3

    def hub_from_dry_run(repo_id, filename, **_):
        assert repo_id == "someone/deception-saes"
        if not (folder / filename).exists():
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return str(folder / filename)

    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", hub_from_dry_run)
    for sid in IDS:
        ours = load_sae(run / "saes" / sid).sae
        ref_acts = ours.encode(x)[0]
        assert (ref_acts > 0).any()
        for theirs in (
            SAE.load_from_disk(str(folder / sid)),
            SAE.from_pretrained("someone/deception-saes", sid),
        ):
            torch.testing.assert_close(theirs.encode(x), ref_acts, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(theirs.decode(ref_acts), ours.decode(ref_acts), atol=1e-5, rtol=1e-5)
        again = load_sae(folder / sid)
        assert again.hook_name == load_sae(run / "saes" / sid).hook_name
        torch.testing.assert_close(again.sae.encode(x)[0], ref_acts)


@pytest.mark.parametrize(
    "bad", ["no-slash", "a/b/c", "owner/bad name", "owner/x..y", "-owner/x", "", "owner/", None]
)
def test_malformed_repo_id_is_refused_before_any_network_call(run, no_network, bad):
    with pytest.raises(ValueError, match="owner/name"):
        publish_saes(run, IDS, bad, token="hf_fake")
    assert check_repo_id("owner-1/name_2.v3") == "owner-1/name_2.v3"


def test_missing_token_uploads_nothing(run, no_network, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(
        PermissionError, match="HF_TOKEN.*nothing was uploaded|nothing was uploaded.*HF_TOKEN"
    ):
        publish_saes(run, IDS, "someone/deception-saes")
    with pytest.raises(FileNotFoundError, match="not_chosen"):
        publish_saes(run, ["missing_sae"], "someone/deception-saes", token="hf_fake")


def test_upload_is_one_commit_of_exactly_the_dry_run_files(run, monkeypatch):
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw, self.token)),
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_commit",
        lambda self, repo_id, operations, **kw: (
            calls.append(("commit", repo_id, operations, kw))
            or SimpleNamespace(commit_url="https://hf.co/c/1")
        ),
    )
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    out = publish_saes(run, IDS, "someone/deception-saes", private=True)
    assert [c[0] for c in calls] == ["repo", "commit"], "all files must go up in a single commit"
    assert calls[0][2]["private"] is True and calls[0][3] == "hf_from_env"
    ops = {op.path_in_repo: op for op in calls[1][2]}
    assert sorted(ops) == out["files"] == expected_files() and out["url"] == "https://hf.co/c/1"
    dry = publish_saes(run, IDS, "someone/deception-saes", dry_run=True)["folder"]
    assert ops["README.md"].path_or_fileobj == (dry / "README.md").read_bytes()
    assert (
        Path(ops[f"{IDS[0]}/sae_weights.safetensors"].path_or_fileobj).read_bytes()
        == (dry / IDS[0] / "sae_weights.safetensors").read_bytes()
    )
