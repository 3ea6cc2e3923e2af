"""The notebook runner: progress bars saved where they ended, kernels on Unix
sockets, the demo preset's CLI."""

from __future__ import annotations

import json

import nbformat
import pytest

from scripts.run_notebooks import WIDGET_STATE, WIDGET_VIEW, main, read_params, run_notebook

CELLS = [
    "from tqdm.auto import tqdm\nfor _ in tqdm(range(30), desc='done'):\n    pass",
    "bar = tqdm(total=100, desc='stopped')\nbar.update(50)\nbar.close()",
    "from ipykernel.kernelapp import IPKernelApp\nprint('transport', IPKernelApp.instance().transport)",
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runner")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nbformat.write(nb, folder / "bars.ipynb")
    out = run_notebook(folder / "bars.ipynb", folder / "run", smoke=False, timeout=120)
    return nbformat.read(out, as_version=4)


def _bar_text(cell) -> str:
    (out,) = [o for o in cell.outputs if WIDGET_VIEW in o.get("data", {})]
    return out["data"]["text/plain"]


def test_progress_bars_are_saved_at_their_end_not_their_first_frame(executed):
    assert _bar_text(executed.cells[0]).startswith("done: 100%|██████████| 30/30 [")
    assert _bar_text(executed.cells[1]).startswith("stopped:  50%|█████     | 50/100 [")
    state = executed.metadata["widgets"][WIDGET_STATE]["state"]
    values = sorted(m["state"]["value"] for m in state.values() if m["model_name"] == "FloatProgressModel")
    assert values == [30.0, 50.0], "the widgets' final state is stored for viewers that draw widgets"


def test_the_kernel_listens_on_unix_sockets_not_tcp_ports(executed):
    printed = "".join(o.get("text", "") for o in executed.cells[2].outputs)
    assert "transport ipc" in printed, printed


def test_demo_runs_its_own_preset(tmp_path):
    with pytest.raises(SystemExit, match="--demo runs its own preset"):
        main(["--demo", "--params", str(tmp_path / "mine.json")])
    (tmp_path / "bad.json").write_text(json.dumps({"09": {}}))
    with pytest.raises(SystemExit, match=r"names notebooks \['09'\]"):
        read_params(tmp_path / "bad.json")
