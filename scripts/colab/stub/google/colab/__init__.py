"""A stand-in for Colab's `google.colab` package, for the Colab rehearsal (scripts/colab_rehearsal.py).

It is not Colab: it gives the package and the notebooks the few entry points they use, so that the
"in Colab" branches run on a CPU machine. The rehearsal puts the folder above `google/` on the
kernel's PYTHONPATH and imports this package from an IPython startup file, so `"google.colab" in
sys.modules` is true from the first cell, as in Colab.

- `drive.mount(path)` creates `<path>/MyDrive` (the package mounts at `$NB_DRIVE_ROOT`, a temp folder
  in the rehearsal, instead of /content/drive); `drive.flush_and_unmount()` records the call.
- `userdata.get(name)` returns `$COLAB_SECRET_<NAME>` or raises `SecretNotFoundError`, as Colab's
  secrets panel does.
- `data_table`, `output`, `files`: no-ops that record what they were asked.

Only `google/colab/` is here, with no `google/__init__.py`: `google` stays the namespace package that
google-genai and protobuf share.
"""

from google.colab import data_table, drive, files, output, userdata  # noqa: F401

__version__ = "0.0.1a2"
"""Colab's own google.colab reports this version."""
REHEARSAL_STUB = True
"""Lets a test tell the stand-in from the real package."""
