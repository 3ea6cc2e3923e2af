"""IPython startup file of the Colab rehearsal (copied to <IPYTHONDIR>/profile_default/startup/).

Colab's kernel has `google.colab` imported before the first cell runs; the stand-in from
scripts/colab/stub/ is on PYTHONPATH, so importing it here gives the notebooks the same view. The
kernel's interpreter is recorded so the rehearsal can check that the notebooks ran in its venv.
"""

import sys

import google.colab  # noqa: F401
from google.colab._log import record

record("kernel.start", executable=sys.executable, prefix=sys.prefix)
