"""The shipped demo corpus (assets/demo-corpus) reads as a folder source with every domain of the
default model, and its LICENSES.md covers each domain."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from moe_viz.corpus import open_source
from moe_viz.training.corpus import ALL_DOMAINS

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-corpus"


def test_demo_corpus_reads_as_a_folder_with_every_domain():
    source = open_source(DEMO_DIR / "texts")
    assert source.kind == "folder"
    docs = list(source.documents())
    per_domain = Counter(d.domain for d in docs)
    assert set(per_domain) == set(ALL_DOMAINS)
    assert all(n >= 10 for n in per_domain.values()), per_domain
    assert all(len(d.text) <= 1501 for d in docs)  # --max-chars 1500, plus the final newline


def test_demo_corpus_licences_name_every_domain():
    licences = (DEMO_DIR / "LICENSES.md").read_text(encoding="utf-8")
    headings = {line[3:].strip() for line in licences.splitlines() if line.startswith("## ")}
    assert set(ALL_DOMAINS) <= headings
