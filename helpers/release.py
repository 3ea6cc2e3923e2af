"""Which release this is and where the notebooks' install cell points: the one place that says so.

Every notebook's first code cell installs `INSTALL_URL` (a regular, non-editable pip install of this
repository at the tag of this version) and passes `__version__` to `helpers.setup(notebook_version=...)`,
which stops with the fix when an older package is already installed. `tests/test_notebooks.py` checks
that each install cell spells exactly these values, and the Colab rehearsal (`scripts/colab_rehearsal.py`)
replaces `INSTALL_URL` in its copies of the notebooks with a `git+file://` URL of the checkout.
"""

__version__ = "0.2.0"
GITHUB_REPO = "deception-sae-lab/deception-sae-lab"
"""Where the notebooks' Colab badges and install cells point (owner/name on GitHub)."""
INSTALL_REF = f"v{__version__}"
INSTALL_URL = f"git+https://github.com/{GITHUB_REPO}@{INSTALL_REF}"
COLAB_KEEP = ("torch", "numpy", "ipywidgets", "plotly")
"""Colab's preinstalled packages that the install cell pins to their installed versions (never upgraded)."""
