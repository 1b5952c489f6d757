"""AppTest of the Corpus and Paper pages: a corpus run shows every statistic with its sentence and
downloads, a finished run opens from its folder, the Paper page regenerates the papers' figures
(on the demo corpus out of the box), and bad input or hosted limits show a message, never an
exception."""

from __future__ import annotations

import pytest
from apptest_helpers import APP, MODEL, clean, click, errors, headings, needs_model

pytestmark = needs_model

DOCS = {
    "code": [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * i)\n",
        "import os\nprint(os.getcwd())\n",
    ],
    "verse": [
        "And God said, Let there be light: and there was light.",
        "In the beginning was the Word.",
        "Blessed are the meek.",
    ],
}


@pytest.fixture()
def corpus_dir(tmp_path):
    for domain, texts in DOCS.items():
        (tmp_path / "c" / domain).mkdir(parents=True)
        for i, text in enumerate(texts):
            (tmp_path / "c" / domain / f"{i}.txt").write_text(text)
    return tmp_path / "c"


def start(monkeypatch, **env):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(str(APP), default_timeout=240)
    return at.run()


def run_path(at, path: str):
    at = at.switch_page("app_pages/corpus.py").run()
    at.radio(key="corpus_source_kind").set_value("path").run()
    at.text_input(key="corpus_path_path").set_value(path)
    return click(at, "Run the corpus")


def test_corpus_page_runs_a_folder_and_shows_every_statistic_with_its_sentence(monkeypatch, corpus_dir):
    at = run_path(start(monkeypatch), str(corpus_dir))
    clean(at)
    assert not errors(at), errors(at)
    shown = set(headings(at))
    assert {"Domain information per layer", "Expert share per domain (layer 0)", "Loss per domain"} <= shown
    assert {"Vocabulary specialisation per layer", "Co-activation (layer 0)", "Consecutive-token reuse"} <= shown
    assert {"Coverage curves", "Dormant experts as tokens accumulate", "Routing by position (layer 0)"} <= shown
    assert any(
        "Intervals: 95% bootstrap percentile intervals" in m.value and "6 documents" in m.value for m in at.markdown
    )
    assert {m.label for m in at.metric} >= {"Tokens", "Documents", "I(domain; expert), layer 0"}
    labels = {b.label for b in at.get("download_button")}
    assert {"Statistics (report.json)", "Aggregates (Parquet, zip)"} <= labels
    # The sidebar's layer picks the per-layer charts; the run is reused, not rerun.
    at.sidebar.selectbox(key="layer").set_value(2).run()
    clean(at)
    assert "Expert share per domain (layer 2)" in headings(at)


def test_corpus_page_with_a_missing_path_or_a_bad_table_column_shows_a_message(monkeypatch, tmp_path, corpus_dir):
    at = run_path(start(monkeypatch), str(tmp_path / "nowhere"))
    clean(at)
    assert any("corpus source must be an existing file or folder" in e for e in errors(at)), errors(at)
    table = tmp_path / "t.jsonl"
    table.write_text('{"body": "hello"}\n')
    at.text_input(key="corpus_path_path").set_value(str(table))
    at = click(at, "Run the corpus")
    clean(at)
    assert any("no text column 'text'" in e for e in errors(at)), errors(at)


def test_corpus_page_opens_a_finished_run_from_its_folder(monkeypatch, tmp_path, corpus_dir):
    import moe_viz
    from moe_viz.corpus import open_source, run_corpus

    run_corpus(moe_viz.load_model(MODEL), open_source(corpus_dir), out=tmp_path / "run")
    at = start(monkeypatch).switch_page("app_pages/corpus.py").run()
    at.radio(key="corpus_source_kind").set_value("run").run()
    at.text_input(key="corpus_path_run").set_value(str(tmp_path / "run"))
    at = click(at, "Open the run")
    clean(at)
    assert "Domain information per layer" in headings(at)
    at.text_input(key="corpus_path_run").set_value(str(tmp_path))
    at = click(at, "Open the run")
    assert any("is not a corpus run folder" in e for e in errors(at)), errors(at)


def test_hosted_corpus_page_offers_demo_and_upload_only_and_bounds_the_corpus(monkeypatch):
    at = (
        start(monkeypatch, MOE_VIZ_HOSTED="1", MOE_VIZ_MAX_CORPUS_TOKENS="500").switch_page("app_pages/corpus.py").run()
    )
    clean(at)
    assert at.radio(key="corpus_source_kind").options == [
        "The demo corpus (84 held-out documents, 7 domains)",
        "Upload a file",
    ]
    assert any("at most 500 tokens" in c.value for c in at.caption)
    at = click(at, "Run the corpus")
    clean(at)
    assert any("the limit here is 500 tokens" in e for e in errors(at)), errors(at)


def test_paper_page_runs_the_demo_corpus_and_regenerates_the_papers_figures(monkeypatch):
    at = start(monkeypatch).switch_page("app_pages/paper.py").run()
    clean(at)
    assert any("No corpus run for this model yet" in i.value for i in at.info)
    at = click(at, "Run the demo corpus")
    clean(at)
    assert not errors(at), errors(at)
    shown = set(headings(at))
    assert {
        "Mixtral Fig. 8: text coloured by first choice, layer 0",
        "Mixtral Fig. 7: expert share per domain, layer 3",
    } <= shown
    assert {
        "Mixtral Table 5: repeated assignments of consecutive tokens",
        "OLMoE: vocabulary specialisation per layer",
    } <= shown
    assert "OLMoE: expert co-activation (adjacent ranks), layer 2" in shown
    assert any(m.value.startswith("**Follows** Jiang et al.") for m in at.markdown)
    assert any(m.value.startswith("**Follows** Muennighoff et al.") for m in at.markdown)
    # The demo corpus is specialised by domain: OLMoE's domain chart names an expert far above k/E.
    assert any("Here the most specialised pair is" in m.value for m in at.markdown)
    # The coloured text can take another document of the corpus.
    options = at.selectbox(key="paper_document").options
    assert len(options) == 85 and options[0] == "the prompt"
    at.selectbox(key="paper_document").set_value(options[40]).run()
    clean(at)
