"""Reproduce moe-viz's default model: a thin shim over ``moe_viz.training.train_default``.

Kept so the command in the README and the model card keeps working; ``moe-viz train-default``
runs the same code. The training code lives in the package (``moe_viz/training/``)::

    python scripts/train_default_model.py --quick --out /tmp/m   # seconds, tiny config
    python scripts/train_default_model.py --help

Imported as a module (``import train_default_model`` with scripts/ on sys.path), this file *is*
``moe_viz.training.train_default``.
"""

from __future__ import annotations

import sys

from moe_viz.training import train_default

if __name__ == "__main__":
    train_default.main(sys.argv[1:])
else:
    sys.modules[__name__] = train_default
