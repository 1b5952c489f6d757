"""Build the default model's training corpus: a thin shim over ``moe_viz.training.corpus``.

    python scripts/build_corpus.py --help

Imported as a module (``import build_corpus`` with scripts/ on sys.path), this file *is*
``moe_viz.training.corpus``.
"""

from __future__ import annotations

import sys

from moe_viz.training import corpus

if __name__ == "__main__":
    corpus.main(sys.argv[1:])
else:
    sys.modules[__name__] = corpus
