"""Reproduce the default model: corpus builder, training run and model card, importable.

``moe-viz train-default [ARGS]`` and ``python scripts/train_default_model.py [ARGS]`` both call
``moe_viz.training.train_default.main``; ``python scripts/build_corpus.py`` calls
``moe_viz.training.corpus.main``. Nothing here is imported by ``import moe_viz``.

Paths never depend on the working directory: the corpus manifest ships beside this module
(package data), and the default output / corpus folders are derived from where the package lives:

* in a source checkout (the package folder sits next to ``pyproject.toml``, e.g. an editable
  install), the model goes to ``<checkout>/assets/moe-viz-mini`` and the corpus to
  ``<checkout>/.corpus``, as before;
* in any other install, there is no shipped model folder to overwrite: ``--out`` is required and
  the corpus goes to ``$XDG_CACHE_HOME/moe-viz/corpus`` (default ``~/.cache/moe-viz/corpus``).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent.parent  # the folder holding the moe_viz package


def in_source_checkout() -> bool:
    """True when the moe_viz package is used from a source checkout (editable install)."""
    return (CHECKOUT_DIR / "pyproject.toml").is_file() and (CHECKOUT_DIR / "moe_viz").is_dir()


def default_corpus_dir() -> Path:
    """Where the corpus is built when no ``--out`` / ``--corpus`` is given."""
    if in_source_checkout():
        return CHECKOUT_DIR / ".corpus"
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "moe-viz" / "corpus"


def default_model_out() -> Path | None:
    """Where a full training run writes the model when no ``--out`` is given: the shipped model's
    folder in a source checkout, else None (the caller must then ask for ``--out``)."""
    if not in_source_checkout():
        return None
    from ..models import SHIPPED_MODEL_DIR

    return SHIPPED_MODEL_DIR
