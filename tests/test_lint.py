"""LINT GATE: `ruff check .` and `ruff format --check .` pass on the whole repository.

This is how CI lints: .ci/run runs exactly the README's test command, so the lint step lives in
the test suite (marker ``lint``: run it alone with ``python3 -m pytest -m lint``, or leave it out
with ``-m "not lint"``). Rules and formatting are configured in pyproject.toml ([tool.ruff]); ruff
is pinned in requirements-dev.txt. Fix findings with ``python3 -m ruff check --fix .`` and
``python3 -m ruff format .``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.lint


@pytest.mark.parametrize(
    "command",
    [["check", "--no-fix", "--output-format", "concise", "."], ["format", "--check", "."]],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff(command):
    res = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    if res.returncode != 0:
        pytest.fail(f"ruff {' '.join(command)} failed:\n{res.stdout[-8000:]}{res.stderr[-4000:]}", pytrace=False)
