"""Where a corpus comes from: a text file, a folder of files, a table (JSONL, CSV, Parquet) or a
local ``datasets`` dataset, read as a stream of ``Document``s in a fixed order.

* A text file (``.txt``, ``.md`` or any other suffix not listed below): one document per block of
  text between blank lines; the domain is the file's stem.
* A folder: every text file under it (sorted paths) is one document; its domain is the name of
  the sub-folder directly under the corpus folder (files directly in it take the folder's name).
* ``.jsonl`` / ``.csv`` / ``.parquet``: one document per row, from ``text_column``; the domain is
  ``domain_column`` when given, else the file's stem.
* A folder holding a dataset saved with ``datasets``' ``save_to_disk`` (it has
  ``dataset_info.json`` or ``dataset_dict.json``): rows as for tables; of a ``DatasetDict`` the
  ``split`` is read (default: ``train``, else the first split).

Reading is lazy (a stream, never the whole corpus in memory) and deterministic: the same source
gives the same documents in the same order, which is what makes a run resumable and its
aggregates reproducible. Empty documents are skipped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")
csv.field_size_limit(2**31 - 1)  # a document is one CSV field: the default 128 KiB cap refuses long ones
SKIPPED_SUFFIXES = (".json", ".pkl", ".pt", ".bin", ".safetensors", ".arrow", ".zip", ".gz", ".png", ".jpg")


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its place in the stream, a name a person can find, its domain."""

    ordinal: int  # 0, 1, 2, ... in stream order
    name: str  # e.g. "code/os.py" or "data.jsonl:17"
    domain: str
    text: str


@dataclass(frozen=True)
class CorpusSource:
    """A corpus on disk and how to read it; ``documents()`` streams it from the start."""

    path: Path
    text_column: str = "text"
    domain_column: str | None = None
    split: str | None = None
    max_chars: int | None = None  # refuse a corpus with more characters (untrusted, compressed uploads)

    @property
    def kind(self) -> str:
        """'dataset', 'folder', 'table' or 'text'."""
        if self.path.is_dir():
            is_dataset = (self.path / "dataset_info.json").is_file() or (self.path / "dataset_dict.json").is_file()
            return "dataset" if is_dataset else "folder"
        return "table" if self.path.suffix.lower() in TABLE_SUFFIXES else "text"

    def describe(self) -> str:
        extra = f", text column {self.text_column!r}" if self.kind in ("table", "dataset") else ""
        if self.domain_column:
            extra += f", domain column {self.domain_column!r}"
        return f"{self.kind} {self.path}{extra}"

    def documents(self) -> Iterator[Document]:
        """The documents in stream order, numbered from 0 (empty ones skipped)."""
        readers = {"dataset": _dataset_rows, "folder": _folder_docs, "table": _table_rows, "text": _text_blocks}
        ordinal, chars = 0, 0
        rows = readers[self.kind](self)
        while True:
            try:  # a bad row anywhere in the file is the user's input: a ValueError naming it
                item = next(rows, None)
            except (KeyError, UnicodeDecodeError, json.JSONDecodeError, csv.Error, OSError) as exc:
                raise ValueError(
                    f"corpus source {str(self.path)!r} could not be read as a {self.kind}: {exc}"
                ) from None
            if item is None:
                return
            name, domain, text = item
            if isinstance(text, str) and text.strip():
                chars += len(text)
                if self.max_chars is not None and chars > self.max_chars:
                    raise ValueError(
                        f"corpus source {str(self.path)!r} holds more than {self.max_chars:,} characters of text; "
                        "the limit here is that"
                    )
                yield Document(ordinal, name, domain, text)
                ordinal += 1


def demo_corpus_path() -> Path:
    """The demo corpus shipped beside the default model (held-out samples of its seven domains)."""
    from ..models import SHIPPED_MODEL_DIR

    return SHIPPED_MODEL_DIR.parent / "demo-corpus" / "texts"


def open_source(
    path: str | Path,
    text_column: str = "text",
    domain_column: str | None = None,
    split: str | None = None,
    max_chars: int | None = None,
) -> CorpusSource:
    """A ``CorpusSource`` for ``path``; ValueError naming the path when it does not exist or is not
    a corpus (a table without ``text_column``, a folder without text files)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"corpus source must be an existing file or folder; got {str(path)!r}")
    source = CorpusSource(p, text_column, domain_column or None, split, max_chars)
    first = next(iter(source.documents()), None)
    if first is None:
        raise ValueError(f"corpus source {str(path)!r} holds no non-empty document")
    return source


def _text_blocks(source: CorpusSource) -> Iterator[tuple[str, str, str]]:
    block: list[str] = []
    index = 0
    with source.path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                block.append(line)
                continue
            if block:
                yield f"{source.path.name}:{index}", source.path.stem, "".join(block)
                index, block = index + 1, []
    if block:
        yield f"{source.path.name}:{index}", source.path.stem, "".join(block)


def _is_text_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() not in SKIPPED_SUFFIXES


def _folder_docs(source: CorpusSource) -> Iterator[tuple[str, str, str]]:
    root = source.path
    for path in sorted(p for p in root.rglob("*") if _is_text_file(p)):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        domain = rel.parts[0] if len(rel.parts) > 1 else root.name
        yield rel.as_posix(), domain, path.read_text(encoding="utf-8", errors="replace")


def _row_fields(source: CorpusSource, row: dict, where: str) -> tuple[str, str]:
    if source.text_column not in row:
        raise KeyError(f"no text column {source.text_column!r} at {where} (columns: {sorted(row)})")
    domain = source.path.stem
    if source.domain_column:
        if source.domain_column not in row:
            raise KeyError(f"no domain column {source.domain_column!r} at {where} (columns: {sorted(row)})")
        domain = str(row[source.domain_column])
    return row[source.text_column], domain


def _table_rows(source: CorpusSource) -> Iterator[tuple[str, str, str]]:
    suffix = source.path.suffix.lower()
    name = source.path.name
    if suffix == ".jsonl":
        with source.path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise KeyError(f"line {i + 1} is not a JSON object (got {type(row).__name__})")
                    text, domain = _row_fields(source, row, f"line {i + 1}")
                    yield f"{name}:{i + 1}", domain, text
    elif suffix == ".csv":
        with source.path.open(encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                text, domain = _row_fields(source, row, f"row {i + 1}")
                yield f"{name}:{i + 1}", domain, text
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(source.path)
        columns = [c for c in (source.text_column, source.domain_column) if c]
        missing = [c for c in columns if c not in table.schema_arrow.names]
        if missing:
            raise KeyError(f"no column {missing[0]!r} (columns: {table.schema_arrow.names})")
        i = 0
        for batch in table.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                text, domain = _row_fields(source, row, f"row {i + 1}")
                i += 1
                yield f"{name}:{i}", domain, text


def _dataset_rows(source: CorpusSource) -> Iterator[tuple[str, str, str]]:
    try:
        import datasets
    except ImportError:
        raise KeyError("reading a saved dataset needs the `datasets` package (pip install datasets)") from None
    data = datasets.load_from_disk(str(source.path))
    if isinstance(data, datasets.DatasetDict):
        split = source.split or ("train" if "train" in data else next(iter(data)))
        if split not in data:
            raise KeyError(f"no split {split!r} (splits: {sorted(data)})")
        data = data[split]
    for i, row in enumerate(data):
        text, domain = _row_fields(source, row, f"row {i + 1}")
        yield f"{source.path.name}:{i + 1}", domain, text
