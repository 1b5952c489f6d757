"""Print the README's table of supported MoE families: every family of the installed transformers
that builds tiny, with what moe-viz verified about its router (the same builds as
tests/test_every_family.py). Run: python scripts/family_table.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import family_table  # noqa: E402

if __name__ == "__main__":
    print(family_table())
