"""Cut the demo corpus shipped in ``assets/demo-corpus/texts`` from the default model's built corpus.

    python scripts/build_corpus.py          # once: builds .corpus/<domain>/{train,valid}.jsonl
    python scripts/build_demo_corpus.py     # writes assets/demo-corpus/texts/<domain>/NN.txt

The documents come only from each domain's held-out ``valid.jsonl`` (chunks the default model
never saw in training). Each is one chunk trimmed to at most ``--max-chars`` characters at a line
boundary (whole lines kept; a single line longer than that is cut hard); pieces shorter than
``MIN_CHARS`` are skipped. A domain takes the first piece of each of its valid chunks, in file
order, until it has ``--per-domain`` documents; a domain with too few valid chunks (``chinese``
has 7) then takes each chunk's next piece, in the same order, so it still gets its share.

The output is deterministic: the same ``.corpus`` gives byte-identical files. Old ``.txt`` files
under ``--out`` are deleted first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_viz.training.corpus import ALL_DOMAINS

MIN_CHARS = 200


def pieces(chunk: str, max_chars: int) -> list[str]:
    """``chunk`` cut at line boundaries into successive pieces of at most ``max_chars`` characters
    (a line longer than that is cut hard), each without leading or trailing blank lines; pieces
    shorter than ``MIN_CHARS`` are dropped."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for line in chunk.split("\n"):
        while len(line) > max_chars:
            if current:
                groups.append(current)
            groups.append([line[:max_chars]])
            current, size, line = [], 0, line[max_chars:]
        if current and size + len(line) > max_chars:
            groups.append(current)
            current, size = [], 0
        current.append(line)
        size += len(line) + 1  # the newline that joins it to the next line
    if current:
        groups.append(current)
    out = []
    for lines in groups:
        text = "\n".join(lines[_first_filled(lines) : len(lines) - _first_filled(lines[::-1])])
        if len(text) >= MIN_CHARS:
            out.append(text)
    return out


def _first_filled(lines: list[str]) -> int:
    """How many blank lines ``lines`` starts with."""
    n = 0
    while n < len(lines) and not lines[n].strip():
        n += 1
    return n


def select_documents(valid_chunks: list[str], per_domain: int, max_chars: int) -> list[str]:
    """The domain's demo documents: piece 0 of each chunk in order, then piece 1 of each, ..."""
    cut = [pieces(c, max_chars) for c in valid_chunks]
    chosen: list[str] = []
    rank = 0
    while len(chosen) < per_domain and any(len(p) > rank for p in cut):
        for p in cut:
            if len(chosen) >= per_domain:
                break
            if len(p) > rank:
                chosen.append(p[rank])
        rank += 1
    return chosen


def read_jsonl_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_demo_corpus(
    corpus: str | Path = ".corpus",
    out: str | Path = "assets/demo-corpus/texts",
    per_domain: int = 12,
    max_chars: int = 1500,
    domains: tuple[str, ...] = ALL_DOMAINS,
) -> dict[str, list[Path]]:
    """Write ``out/<domain>/NN.txt`` from ``corpus/<domain>/valid.jsonl``; returns the files per
    domain. FileNotFoundError when a domain's ``valid.jsonl`` is missing."""
    corpus, out = Path(corpus), Path(out)
    missing = [str(corpus / d / "valid.jsonl") for d in domains if not (corpus / d / "valid.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"built corpus not found: {', '.join(missing)}")
    if out.is_dir():
        for old in sorted(out.rglob("*.txt")):
            old.unlink()
        for folder in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
    written: dict[str, list[Path]] = {}
    for domain in domains:
        docs = select_documents(read_jsonl_texts(corpus / domain / "valid.jsonl"), per_domain, max_chars)
        folder = out / domain
        folder.mkdir(parents=True, exist_ok=True)
        written[domain] = []
        for i, text in enumerate(docs):
            path = folder / f"{i:02d}.txt"
            path.write_text(text + "\n", encoding="utf-8", newline="\n")
            written[domain].append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=".corpus", help="the built corpus (default: .corpus)")
    parser.add_argument(
        "--out", default="assets/demo-corpus/texts", help="where the documents go (default: assets/demo-corpus/texts)"
    )
    parser.add_argument("--per-domain", type=int, default=12, help="documents per domain (default: 12)")
    parser.add_argument("--max-chars", type=int, default=1500, help="most characters per document (default: 1500)")
    args = parser.parse_args(argv)
    if args.per_domain < 1 or args.max_chars < MIN_CHARS:
        parser.error(f"--per-domain must be >= 1 and --max-chars >= {MIN_CHARS}")
    if not Path(args.corpus).is_dir():
        print(
            f"no built corpus at {args.corpus!r}: run `python scripts/build_corpus.py` first "
            "(or pass --corpus with its folder)",
            file=sys.stderr,
        )
        return 2
    try:
        written = build_demo_corpus(args.corpus, args.out, args.per_domain, args.max_chars)
    except FileNotFoundError as exc:
        print(f"{exc}: run `python scripts/build_corpus.py` first", file=sys.stderr)
        return 2
    total_files = total_bytes = 0
    for domain, paths in written.items():
        size = sum(p.stat().st_size for p in paths)
        chars = sum(len(p.read_text(encoding="utf-8")) for p in paths)
        total_files, total_bytes = total_files + len(paths), total_bytes + size
        print(f"{domain:12s} {len(paths):3d} documents  {chars:7,d} chars  {size:8,d} bytes")
    print(f"{'total':12s} {total_files:3d} documents  {total_bytes:,d} bytes in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
