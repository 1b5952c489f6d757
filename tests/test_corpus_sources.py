"""Every corpus source format (text file, folder, JSONL, CSV, Parquet, a dataset saved with
``datasets``' ``save_to_disk``) read as a stream of documents, and the errors ``open_source``
gives for sources that are not a corpus. Small files in tmp_path; no model."""

from __future__ import annotations

import json
import string
import sys

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_viz.corpus import Document, open_source

ROWS = [
    {"text": "def add(a, b): return a + b", "domain": "code", "id": 1},
    {"text": "In the beginning God created the heaven and the earth.", "domain": "scripture", "id": 2},
    {"text": "3 + 4 = 7", "domain": "numbers", "id": 3},
]


def docs(source) -> list[Document]:
    return list(source.documents())


def triples(source) -> list[tuple[str, str, str]]:
    return [(d.name, d.domain, d.text) for d in source.documents()]


def write_table(path, rows: list[dict]) -> None:
    """``rows`` as a .jsonl, .csv or .parquet file, by ``path``'s suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)


# --- text files ----------------------------------------------------------------------------------


def test_text_file_gives_one_document_per_blank_line_separated_block_named_by_file_and_index(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("alpha one\nalpha two\n\nbeta\n\n\n   \n\t\ngamma\n", encoding="utf-8")
    source = open_source(path)
    assert source.kind == "text"
    assert docs(source) == [
        Document(0, "notes.txt:0", "notes", "alpha one\nalpha two\n"),
        Document(1, "notes.txt:1", "notes", "beta\n"),
        Document(2, "notes.txt:2", "notes", "gamma\n"),
    ]


def test_text_file_skips_empty_blocks_and_numbers_what_is_left_without_gaps(tmp_path):
    path = tmp_path / "sparse.md"
    path.write_text("\n\n  \n\nfirst\n\n\n\n \t \n\nsecond\nstill second", encoding="utf-8")
    got = docs(open_source(path))
    assert [d.ordinal for d in got] == [0, 1]
    assert [d.name for d in got] == ["sparse.md:0", "sparse.md:1"]
    assert [d.text for d in got] == ["first\n", "second\nstill second"]  # last block without a final newline
    assert {d.domain for d in got} == {"sparse"}


LINE = st.text(alphabet=string.ascii_letters + string.digits + " .,;:-'", min_size=1, max_size=20).filter(str.strip)
BLANK = st.sampled_from(["\n", " \n", "\t\n", "  \t \n"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.lists(st.lists(LINE, min_size=1, max_size=4), min_size=1, max_size=6),
    gaps=st.lists(st.lists(BLANK, min_size=1, max_size=3), min_size=6, max_size=6),
    lead=st.lists(BLANK, max_size=2),
)
def test_text_file_blocks_are_exactly_the_blocks_written(tmp_path, blocks, gaps, lead):
    content = "".join(lead)
    for i, lines in enumerate(blocks):
        content += "".join(line + "\n" for line in lines) + "".join(gaps[i])
    path = tmp_path / "generated.txt"
    path.write_text(content, encoding="utf-8")
    got = docs(open_source(path))
    assert [d.text for d in got] == ["".join(line + "\n" for line in lines) for lines in blocks]
    assert [d.ordinal for d in got] == list(range(len(blocks)))
    assert [d.name for d in got] == [f"generated.txt:{i}" for i in range(len(blocks))]


# --- folders -------------------------------------------------------------------------------------


def test_folder_gives_one_document_per_file_in_sorted_order_with_the_first_sub_folder_as_domain(tmp_path):
    root = tmp_path / "corpus"
    files = {
        "scripture/genesis.txt": "In the beginning.\n\nSecond paragraph of the same file.\n",
        "code/b.py": "print('b')\n",
        "code/a.py": "print('a')\n",
        "code/deep/nested/c.rs": "fn main() {}\n",
        "readme.md": "A file directly in the corpus folder.\n",
        "code/empty.txt": "  \n\n",  # empty: skipped, the ordinals stay contiguous
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    source = open_source(root)
    assert source.kind == "folder"
    got = docs(source)
    assert [(d.ordinal, d.name, d.domain) for d in got] == [
        (0, "code/a.py", "code"),
        (1, "code/b.py", "code"),
        (2, "code/deep/nested/c.rs", "code"),
        (3, "readme.md", "corpus"),  # directly in the root: the folder's own name
        (4, "scripture/genesis.txt", "scripture"),
    ]
    assert got[4].text == files["scripture/genesis.txt"]  # a whole file is one document, blank lines and all


def test_folder_skips_hidden_files_hidden_folders_and_binary_suffixes(tmp_path):
    root = tmp_path / "mixed"
    (root / "news").mkdir(parents=True)
    (root / "news" / "story.txt").write_text("The only document.\n")
    (root / "news" / ".draft.txt").write_text("hidden file\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "news" / ".cache").mkdir()
    (root / "news" / ".cache" / "page.txt").write_text("inside a hidden folder\n")
    (root / "news" / "meta.json").write_text('{"text": "not a document"}')
    (root / "news" / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (root / "news" / "weights.bin").write_bytes(bytes(64))
    (root / "news" / "archive.GZ").write_bytes(b"\x1f\x8b")  # suffixes compare case-insensitively
    assert triples(open_source(root)) == [("news/story.txt", "news", "The only document.\n")]


def test_folder_without_any_text_file_is_not_a_corpus(tmp_path):
    root = tmp_path / "binaries"
    root.mkdir()
    (root / "a.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("hidden\n")
    with pytest.raises(ValueError, match="no non-empty document"):
        open_source(root)


# --- tables: JSONL, CSV, Parquet ------------------------------------------------------------------

TABLE_SUFFIXES = ["jsonl", "csv", "parquet"]


@pytest.mark.parametrize("suffix", TABLE_SUFFIXES)
def test_table_rows_are_documents_with_the_domain_column_read_per_row(tmp_path, suffix):
    path = tmp_path / f"rows.{suffix}"
    write_table(path, ROWS)
    source = open_source(path, domain_column="domain")
    assert source.kind == "table"
    assert docs(source) == [Document(i, f"rows.{suffix}:{i + 1}", r["domain"], r["text"]) for i, r in enumerate(ROWS)]


@pytest.mark.parametrize("suffix", TABLE_SUFFIXES)
def test_table_without_a_domain_column_takes_the_file_stem_as_domain(tmp_path, suffix):
    path = tmp_path / f"wiki.{suffix}"
    write_table(path, [{"text": r["text"]} for r in ROWS])
    got = docs(open_source(path))
    assert [d.text for d in got] == [r["text"] for r in ROWS]
    assert {d.domain for d in got} == {"wiki"}
    # a domain column present in the file is only read when asked for
    write_table(path, ROWS)
    assert {d.domain for d in open_source(path).documents()} == {"wiki"}


@pytest.mark.parametrize("suffix", TABLE_SUFFIXES)
def test_table_reads_a_custom_text_column(tmp_path, suffix):
    path = tmp_path / f"custom.{suffix}"
    write_table(path, [{"body": r["text"], "topic": r["domain"]} for r in ROWS])
    got = triples(open_source(path, text_column="body", domain_column="topic"))
    assert got == [(f"custom.{suffix}:{i + 1}", r["domain"], r["text"]) for i, r in enumerate(ROWS)]


@pytest.mark.parametrize("suffix", TABLE_SUFFIXES)
def test_table_skips_empty_texts_and_keeps_the_row_number_in_the_name(tmp_path, suffix):
    path = tmp_path / f"holes.{suffix}"
    write_table(path, [{"text": "first"}, {"text": "   "}, {"text": ""}, {"text": "fourth"}])
    got = docs(open_source(path))
    assert [(d.ordinal, d.name, d.text) for d in got] == [
        (0, f"holes.{suffix}:1", "first"),
        (1, f"holes.{suffix}:4", "fourth"),  # the name points at the row; the ordinal counts documents
    ]


def test_jsonl_skips_blank_lines_and_names_documents_by_line_number(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"text": "one"}\n\n   \n{"text": "two"}\n', encoding="utf-8")
    assert triples(open_source(path)) == [("lines.jsonl:1", "lines", "one"), ("lines.jsonl:4", "lines", "two")]


def test_csv_keeps_commas_quotes_and_newlines_inside_a_field(tmp_path):
    rows = [{"text": 'He said, "stop".\nThen left.', "domain": "prose"}, {"text": "a,b,c", "domain": "csv"}]
    path = tmp_path / "quoted.csv"
    write_table(path, rows)
    assert [(d.domain, d.text) for d in open_source(path, domain_column="domain").documents()] == [
        (r["domain"], r["text"]) for r in rows
    ]


def test_parquet_domain_column_of_numbers_becomes_strings(tmp_path):
    path = tmp_path / "years.parquet"
    write_table(path, [{"text": "old", "year": 1999}, {"text": "new", "year": 2024}])
    assert [d.domain for d in open_source(path, domain_column="year").documents()] == ["1999", "2024"]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", TABLE_SUFFIXES)
def test_missing_text_column_is_a_value_error_naming_the_column(tmp_path, suffix):
    path = tmp_path / f"notext.{suffix}"
    write_table(path, ROWS)
    with pytest.raises(ValueError, match="'body'") as info:
        open_source(path, text_column="body")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", TABLE_SUFFIXES)
def test_missing_domain_column_is_a_value_error_naming_the_column(tmp_path, suffix):
    path = tmp_path / f"nodomain.{suffix}"
    write_table(path, ROWS)
    with pytest.raises(ValueError, match="'topic'") as info:
        open_source(path, domain_column="topic")
    assert str(path) in str(info.value)


def test_nonexistent_path_is_a_value_error_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    with pytest.raises(ValueError, match="existing file or folder") as info:
        open_source(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("name", ["blank.txt", "blank.jsonl", "blank.csv"])
def test_file_of_only_whitespace_holds_no_non_empty_document(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n   \n\t\n\n" if not name.endswith(".csv") else "text\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty document") as info:
        open_source(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("line", ["42", '["text", "a list"]', '"just a string"', "null"])
def test_jsonl_line_that_is_not_an_object_is_a_value_error(tmp_path, line):
    path = tmp_path / "scalars.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a JSON object"):
        open_source(path)


def test_malformed_jsonl_and_undecodable_csv_are_value_errors(tmp_path):
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text('{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(ValueError, match="could not be read as a table"):
        open_source(bad_json)
    bad_bytes = tmp_path / "latin1.csv"
    bad_bytes.write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(ValueError, match="could not be read as a table"):
        open_source(bad_bytes)


# --- datasets saved with save_to_disk -------------------------------------------------------------


@pytest.fixture()
def saved_dataset(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.fixture()
def saved_dataset_dict(tmp_path):
    import datasets

    path = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "test": datasets.Dataset.from_list([{"text": "held out", "domain": "eval", "id": 9}]),
        }
    ).save_to_disk(str(path))
    return path


def test_saved_dataset_rows_are_documents(saved_dataset):
    source = open_source(saved_dataset, domain_column="domain")
    assert source.kind == "dataset"
    assert docs(source) == [Document(i, f"saved:{i + 1}", r["domain"], r["text"]) for i, r in enumerate(ROWS)]
    assert {d.domain for d in open_source(saved_dataset).documents()} == {"saved"}  # no domain column: folder name


def test_saved_dataset_dict_reads_train_by_default_and_the_split_asked_for(saved_dataset_dict):
    train = open_source(saved_dataset_dict, domain_column="domain")
    assert train.kind == "dataset"
    assert [d.text for d in train.documents()] == [r["text"] for r in ROWS]
    test = open_source(saved_dataset_dict, domain_column="domain", split="test")
    assert triples(test) == [("splits:1", "eval", "held out")]


def test_saved_dataset_dict_without_train_reads_its_first_split(tmp_path):
    import datasets

    path = tmp_path / "nottrain"
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_list([{"text": "v"}]),
            "extra": datasets.Dataset.from_list([{"text": "x"}]),
        }
    ).save_to_disk(str(path))
    assert [d.text for d in open_source(path).documents()] == ["v"]


def test_saved_dataset_dict_unknown_split_is_a_value_error_naming_it(saved_dataset_dict):
    with pytest.raises(ValueError, match="'validation'") as info:
        open_source(saved_dataset_dict, split="validation")
    assert "train" in str(info.value) and "test" in str(info.value)  # the splits there are


def test_saved_dataset_custom_and_missing_columns(saved_dataset):
    assert [d.text for d in open_source(saved_dataset, text_column="domain").documents()] == [r["domain"] for r in ROWS]
    with pytest.raises(ValueError, match="'body'"):
        open_source(saved_dataset, text_column="body")
    with pytest.raises(ValueError, match="'topic'"):
        open_source(saved_dataset, domain_column="topic")


def test_saved_dataset_without_the_datasets_package_is_a_value_error_saying_what_to_install(saved_dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ValueError, match="pip install datasets"):
        open_source(saved_dataset)


# --- determinism ----------------------------------------------------------------------------------


def test_reading_a_source_twice_gives_identical_documents(tmp_path, saved_dataset_dict):
    root = tmp_path / "folder"
    for rel in ["b/2.txt", "a/1.txt", "a/0.txt", "top.txt", "c/x/y.md"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"text of {rel}\n")
    text = tmp_path / "blocks.txt"
    text.write_text("one\n\ntwo\n\nthree\n")
    sources = [open_source(root), open_source(text), open_source(saved_dataset_dict, split="test")]
    for suffix in TABLE_SUFFIXES:
        write_table(tmp_path / f"t.{suffix}", ROWS)
        sources.append(open_source(tmp_path / f"t.{suffix}", domain_column="domain"))
    for source in sources:
        first, second = docs(source), docs(source)
        assert first and first == second, source.describe()
        assert [d.ordinal for d in first] == list(range(len(first)))
    # a fresh source on the same path reads the same stream too
    assert docs(open_source(root)) == docs(sources[0])
