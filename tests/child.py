"""Child processes of the tests import the same patchcore_fast as the tests themselves.

CI installs the package (``pip install .``) and runs pytest from the repository root,
whose ``patchcore_fast/`` has no compiled library; a developer may instead have built it
in place. A child started with ``python -m`` or ``-c`` puts its working directory first
on its path, so a child started in the repository root would import the source tree and
fall back to the pure-torch reference (a warning on stderr, slightly different floating
point): children run in :data:`CHILD_CWD`, with the tested package's folder first on
``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import patchcore_fast

PACKAGE_PARENT = Path(patchcore_fast.__file__).resolve().parents[1]
CHILD_CWD = tempfile.gettempdir()
CLI = [sys.executable, "-m", "patchcore_fast.cli"]


def child_env(env: dict | None = None, *first: str | Path) -> dict:
    """``env`` (default: this process's environment) with ``first`` and then the tested
    package's folder at the front of ``PYTHONPATH``."""
    env = dict(os.environ if env is None else env)
    path = [str(p) for p in (*first, PACKAGE_PARENT)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env
