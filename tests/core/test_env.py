"""setup(), the dtype rule, the run folder, secrets and smoke overrides."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

import helpers
from helpers import env
from helpers import run as runs


@pytest.mark.parametrize(
    ("capability", "family", "expected"),
    [
        ((7, 5), "nanochat", torch.float32),  # T4: relu² overflows fp16
        ((7, 5), "llama", torch.float16),  # T4, other families: fp16 (verified finite at load)
        ((8, 0), "nanochat", torch.bfloat16),  # A100
        ((8, 0), "llama", torch.bfloat16),
        ((9, 0), "qwen2", torch.bfloat16),
    ],
)
def test_dtype_rule_for_simulated_gpus(capability, family, expected, monkeypatch):
    # The rule must never consult is_bf16_supported (True on a T4, where bf16 is emulated).
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("consulted is_bf16_supported")
    )
    assert env.choose_dtype("cuda", family, capability) == expected


def test_dtype_on_cpu_is_fp32():
    assert env.choose_dtype("cpu", "nanochat") == torch.float32
    with pytest.raises(ValueError, match="'cuda' or 'cpu'"):
        env.choose_dtype("tpu", "llama")


def test_run_dir_override_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("NB_RUN_DIR", str(tmp_path / "r1"))
    assert env.resolve_run_dir("x") == (tmp_path / "r1").resolve()
    monkeypatch.delenv("NB_RUN_DIR")
    monkeypatch.chdir(tmp_path)
    assert env.resolve_run_dir("exp1") == (tmp_path / "runs" / "exp1").resolve()
    assert env.resolve_run_dir("exp2", runs_root=tmp_path / "drive") == tmp_path / "drive" / "exp2"
    with pytest.raises(ValueError, match="plain folder name"):
        env.resolve_run_dir("a/b")


def test_run_dir_on_unmounted_drive_names_the_fix(monkeypatch):
    monkeypatch.setenv("NB_RUN_DIR", "/content/drive/MyDrive/deception-sae-lab/runs/x")
    with pytest.raises(RuntimeError, match=r"setup\(use_drive=True\)"):
        env.resolve_run_dir("x")


def test_mount_drive_outside_colab_names_the_fix():
    with pytest.raises(RuntimeError, match="NB_RUN_DIR"):
        env.mount_drive()


def test_setup_prints_summary_but_never_a_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NB_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("NB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GEMINI_API_KEY", "sk-very-secret-value-123")
    e = helpers.setup()
    out = capsys.readouterr().out
    assert e.device == "cpu" and not e.drive_mounted and str(tmp_path / "run") in out
    assert e.run_folder("demo") == (tmp_path / "run").resolve() and "run folder:" in capsys.readouterr().out
    assert e.cache_dir == tmp_path / "cache"
    assert f"helpers {helpers.__version__}" in out and "RAM:" in out and "disk free" in out and "GPU" in out
    assert "GEMINI_API_KEY set" in out and "sk-very-secret" not in out
    assert helpers.get_secret("GEMINI_API_KEY") == "sk-very-secret-value-123"
    monkeypatch.delenv("GEMINI_API_KEY")
    assert helpers.get_secret("GEMINI_API_KEY") is None


def test_smoke_overrides(monkeypatch, capsys):
    ns = {"MODEL": "karpathy/nanochat-d32", "N": 100}
    monkeypatch.setenv("NB_SMOKE", "0")
    assert helpers.smoke_overrides(ns, MODEL="offline", N=2) == {} and ns["N"] == 100
    monkeypatch.setenv("NB_SMOKE", "1")
    assert helpers.smoke_overrides(ns, MODEL="offline", N=2) == {"MODEL": "offline", "N": 2}
    assert ns == {"MODEL": "offline", "N": 2} and "smoke overrides applied" in capsys.readouterr().out
    with pytest.raises(KeyError, match="NNN"):
        helpers.smoke_overrides(ns, NNN=3)


def test_run_json_merges_and_refuses_to_overwrite_corruption(tmp_path):
    runs.update_run_json(tmp_path, model={"spec": "a", "dtype": "float32"}, seed=1)
    runs.mark_stage(tmp_path, "load_checkpoint")
    run = runs.update_run_json(tmp_path, model={"dtype": "bfloat16"})
    assert run["model"] == {"spec": "a", "dtype": "bfloat16"} and run["seed"] == 1
    assert runs.stage_done(tmp_path, "load_checkpoint") and not runs.stage_done(tmp_path, "train")
    assert json.loads((tmp_path / "run.json").read_text())["package_version"] == helpers.__version__
    assert not list(tmp_path.glob("*.tmp")), "temp files left behind"
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="not overwritten"):
        runs.update_run_json(tmp_path, seed=2)
    assert (tmp_path / "run.json").read_text() == "{not json"


class _FakeColab:
    """A stand-in for `google.colab` with the two modules setup() uses: drive and userdata."""

    class SecretNotFoundError(Exception):
        pass

    class NotebookAccessError(Exception):
        pass

    def __init__(self, secrets=None, denied=(), mount_error=None):
        self.secrets, self.denied, self.mount_error = secrets or {}, set(denied), mount_error
        self.drive = types.SimpleNamespace(mount=self._mount)
        self.userdata = types.SimpleNamespace(get=self._get)

    def _mount(self, path):
        if self.mount_error:
            raise self.mount_error
        (Path(path) / "MyDrive").mkdir(parents=True, exist_ok=True)

    def _get(self, name):
        if name in self.denied:
            raise self.NotebookAccessError(name)
        if name not in self.secrets:
            raise self.SecretNotFoundError(name)
        return self.secrets[name]


@pytest.fixture()
def colab(monkeypatch, tmp_path):
    """Install a fake google.colab (so in_colab() is true) with Drive mounted under tmp_path/drive."""

    def install(**kw):
        fake = _FakeColab(**kw)
        pkg = types.ModuleType("google.colab")
        pkg.drive, pkg.userdata = fake.drive, fake.userdata
        monkeypatch.setitem(sys.modules, "google.colab", pkg)
        monkeypatch.setitem(sys.modules, "google.colab.drive", fake.drive)
        monkeypatch.setitem(sys.modules, "google.colab.userdata", fake.userdata)
        monkeypatch.setenv("NB_DRIVE_ROOT", str(tmp_path / "drive"))
        monkeypatch.delenv("NB_RUN_DIR", raising=False)
        monkeypatch.setenv("NB_CACHE_DIR", str(tmp_path / "cache"))
        for name in env.SECRET_NAMES:
            monkeypatch.delenv(name, raising=False)
        env._WARNED.clear()
        return fake

    return install


def test_colab_run_folder_lives_on_drive_and_secrets_come_from_userdata(colab, tmp_path, capsys):
    colab(secrets={"GEMINI_API_KEY": "colab-secret-value"})
    e = helpers.setup()
    assert e.in_colab and e.drive_mounted
    assert e.run_folder("demo") == (tmp_path / "drive/MyDrive/deception-sae-lab/runs/demo").resolve()
    out = capsys.readouterr().out
    assert "GEMINI_API_KEY set" in out and "colab-secret-value" not in out
    assert env.get_secret("HF_TOKEN") is None, "an absent secret is simply absent"


def test_a_secret_without_notebook_access_is_a_message_not_a_traceback(colab, capsys):
    colab(denied={"GEMINI_API_KEY"})
    assert env.get_secret("GEMINI_API_KEY") is None
    assert env.get_secret("GEMINI_API_KEY") is None
    out = capsys.readouterr().out
    assert out.count("Notebook access") == 1 and "GEMINI_API_KEY" in out, "said once, with the fix"


def test_a_refused_drive_mount_names_the_fix_without_a_traceback(colab):
    colab(mount_error=ValueError("mount failed"))
    with pytest.raises(env.NotebookError, match="use_drive=False") as err:
        helpers.setup()
    (line,) = err.value._render_traceback_()  # what IPython shows instead of the stack
    assert line.startswith("NotebookError: Google Drive was not mounted (ValueError: mount failed)")


def test_a_notebook_for_another_release_stops_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NB_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(env.NotebookError, match=r"for helpers 9\.9\.9, but helpers .* is installed") as err:
        helpers.setup(notebook_version="9.9.9", quiet=True)
    assert "--force-reinstall" in str(err.value) and "@v9.9.9" in str(err.value)
    assert helpers.setup(notebook_version=helpers.__version__, quiet=True).device == "cpu"


def test_setup_reports_the_free_space_of_the_run_folders_disk_not_the_caches(tmp_path, monkeypatch, capsys):
    runs, cache = tmp_path / "runs_disk" / "run", tmp_path / "cache_disk"
    runs.parent.mkdir()  # the run folder itself does not exist yet: its disk is its parent's
    monkeypatch.setenv("NB_RUN_DIR", str(runs))
    monkeypatch.setenv("NB_CACHE_DIR", str(cache))
    gib = 2**30

    def usage(path):
        free = {runs.parent: 3 * gib, cache: 70 * gib}[Path(path)]
        return types.SimpleNamespace(total=100 * gib, used=100 * gib - free, free=free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    helpers.setup()
    out = capsys.readouterr().out
    assert "disk free for the runs folder: 3.0 GiB" in out and "(70.0 GiB free there)" in out
