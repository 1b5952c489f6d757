"""Small helpers shared by the AppTest suites: the app and the model they run, a page run's
outcome, a button press."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "streamlit_app.py"  # what AppTest runs
if str(ROOT) not in sys.path:  # the suites import the app's modules too
    sys.path.insert(0, str(ROOT))

from moe_viz import DEFAULT_MODEL  # noqa: E402

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
needs_model = pytest.mark.skipif(not (Path(MODEL) / "config.json").is_file(), reason=f"no model at {MODEL}")


def clean(at) -> None:
    """The run raised no exception (an exception box would be a crash the user sees)."""
    assert not at.exception, [e.message for e in at.exception]


def click(at, label: str):
    """Press the one button labelled ``label`` and rerun."""
    [button] = [b for b in at.button if b.label == label]
    return button.click().run()


def headings(at) -> list[str]:
    return [s.value for s in at.subheader]


def errors(at) -> list[str]:
    return [e.value for e in at.error]
