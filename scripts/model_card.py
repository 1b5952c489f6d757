"""Write the default model's card (README.md) and DATA_LICENSES.md from measured numbers."""

from __future__ import annotations

import json
from pathlib import Path


def write_model_card(out: Path, results: dict) -> None:
    (out / "README.md").write_text("# moe-viz-mini\n\n```\n" + json.dumps(results, indent=1, default=str) + "\n```\n")


def write_data_licenses(out: Path, results: dict) -> None:
    (out / "DATA_LICENSES.md").write_text("# Data licences\n")
