"""Run one notebook in a fresh Jupyter kernel, for the Colab rehearsal (scripts/colab_rehearsal.py).

The rehearsal runs this file with its virtual environment's python, so nbclient and the kernel come
from the "Colab" environment, and gives it the kernel's environment (the kernel inherits it):

    <venv>/bin/python scripts/colab/execute_notebook.py NOTEBOOK OUT --cwd FOLDER --kernel NAME

The executed copy (with outputs) is written to OUT whether or not a cell failed. Exit status: 0 when
every cell ran, 1 when a cell raised (its error is printed), 2 when the kernel died or timed out.
"""

from __future__ import annotations

import argparse
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebook")
    parser.add_argument("out")
    parser.add_argument("--cwd", required=True, help="the kernel's working directory (Colab's /content)")
    parser.add_argument("--kernel", required=True, help="kernel spec name (the rehearsal writes one)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(
        nb, timeout=args.timeout, kernel_name=args.kernel, resources={"metadata": {"path": args.cwd}}
    )
    status = 0
    try:
        client.execute()
    except CellExecutionError as err:
        print(err, file=sys.stderr)
        status = 1
    except (CellTimeoutError, DeadKernelError, RuntimeError) as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        status = 2
    finally:
        nbformat.write(nb, args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
