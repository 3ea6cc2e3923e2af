"""The wheel Colab installs holds every module and data file of the source tree (and nothing of the
developer tools): what is not in the wheel does not exist in Colab."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("deception_sae_lab-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_every_module_and_data_file_is_in_the_wheel(wheel_names):
    source = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "helpers").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert any(name.startswith("helpers/saes/") for name in source), "the source tree has helpers/saes"
    missing = sorted(source - wheel_names)
    assert not missing, f"in the source tree but not in the wheel (so not in Colab): {missing}"
    assert {
        "helpers/collect/data/scenarios.jsonl",
        "helpers/collect/data/contrast_facts.jsonl",
    } <= wheel_names


def test_developer_tools_stay_out_of_the_runtime_package(wheel_names):
    stray = sorted(n for n in wheel_names if n.split("/")[0] in ("scripts", "tests", "bench", "notebooks"))
    assert not stray, f"developer files in the wheel: {stray}"
