"""Corpus runs for the Corpus and Paper pages: shared across sessions, one run per settings.

A corpus run is long (tens of seconds on the demo corpus on a laptop CPU) and its result is
immutable, so finished runs are kept in a small process-wide LRU keyed by everything that
decides them (model, source fingerprint, policy, window, importance sampling, seed): a second
session asking for the same run gets it at once. The session remembers its latest result for the
Paper page.
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from app.resources import compute, config
from moe_viz import MoEModel, Policy, policy_spec
from moe_viz.corpus import CorpusAggregates, CorpusSource, Progress, load, open_source, run_corpus
from moe_viz.corpus.report import CorpusReport, corpus_report
from moe_viz.corpus.run import source_fingerprint

RESULT_KEY = "corpus_result"  # session: the latest CorpusResult
UPLOAD_DIR = "corpus_upload_dir"  # session: where this session's uploads are written
MAX_RUNS = 4  # finished runs kept per process


@dataclass(frozen=True)
class CorpusResult:
    """A finished corpus run, its statistics, and where it came from."""

    label: str
    aggregates: CorpusAggregates
    report: CorpusReport
    source: CorpusSource | None  # None for a run opened from its files


_runs: OrderedDict[tuple, CorpusResult] = OrderedDict()
_runs_lock = threading.Lock()


def run_key(model: MoEModel, source: CorpusSource, policy: Policy | None, **settings: object) -> tuple:
    return (
        model.model_id,
        source.describe(),
        source_fingerprint(source),
        policy_spec(policy),
        tuple(sorted(settings.items())),
    )


def finished_run(key: tuple) -> CorpusResult | None:
    with _runs_lock:
        result = _runs.get(key)
        if result is not None:
            _runs.move_to_end(key)
        return result


def _report(agg: CorpusAggregates, seed: int) -> CorpusReport:
    """The run's statistics, with a spinner that says what the wait is (long on big models)."""
    shape = f"{len(agg.meta.layers)} layers × {agg.num_experts} experts"
    with st.spinner(f"Computing the statistics: bootstrap intervals over {agg.meta.groups} groups ({shape}) …"):
        return corpus_report(agg, seed=seed)


def get_corpus_run(
    model: MoEModel,
    source: CorpusSource,
    policy: Policy | None,
    label: str,
    progress: Callable[[Progress], None] | None = None,
    window: int | None = None,
    importance_every: int = 0,
    seed: int = 0,
    max_documents: int | None = None,
) -> CorpusResult:
    """The run of ``source`` under ``policy`` (from the process cache when it already ran), inside
    the server's compute gate and corpus-size limit."""
    settings = dict(window=window, importance_every=importance_every, seed=seed, max_documents=max_documents)
    key = run_key(model, source, policy, **settings)
    result = finished_run(key)
    if result is None:
        cfg = config()

        def work() -> CorpusResult:
            agg = run_corpus(
                model,
                source,
                policy,
                progress=progress,
                max_tokens=cfg.max_corpus_tokens,
                **settings,  # type: ignore[arg-type]
            )
            return CorpusResult(label, agg, _report(agg, seed), source)

        result = compute(work)
        with _runs_lock:
            _runs[key] = result
            while len(_runs) > MAX_RUNS:
                _runs.popitem(last=False)
    st.session_state[RESULT_KEY] = result
    return result


def open_run(folder: str) -> CorpusResult:
    """A run written by ``moe-viz corpus --out DIR`` (DIR or DIR/aggregates); ValueError if it is not one."""
    path = Path(folder.strip()).expanduser()
    if (path / "aggregates" / "meta.json").is_file():
        path = path / "aggregates"
    agg = load(path)
    result = CorpusResult(f"finished run {path}", agg, _report(agg, agg.meta.seed), None)
    st.session_state[RESULT_KEY] = result
    return result


def uploaded_source(name: str, data: bytes, text_column: str, domain_column: str | None) -> CorpusSource:
    """Write an uploaded corpus file into this session's temporary folder and open it."""
    limit = config().max_corpus_upload_mb
    if len(data) > limit * 2**20:
        raise ValueError(f"the upload is {len(data) / 2**20:.1f} MiB; the limit here is {limit} MiB")
    suffix = Path(name).suffix.lower()
    if suffix not in (".txt", ".md", ".jsonl", ".csv", ".parquet"):
        raise ValueError(f"corpus uploads must be .txt, .md, .jsonl, .csv or .parquet files; got {name!r}")
    folder = st.session_state.get(UPLOAD_DIR)
    if folder is None or not Path(folder).is_dir():
        folder = tempfile.mkdtemp(prefix="moe-viz-corpus-")
        st.session_state[UPLOAD_DIR] = folder
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)[:60] or "upload"
    path = Path(folder) / (stem + suffix)  # a text file's domain is its name
    path.write_bytes(data)
    # A compressed table can hold far more text than its size: bound the text itself (about 40
    # characters per token of the server's corpus limit) before anything reads it all.
    cfg = config()
    max_chars = 40 * cfg.max_corpus_tokens if cfg.max_corpus_tokens else None
    return open_source(path, text_column or "text", domain_column or None, max_chars=max_chars)


def latest_result() -> CorpusResult | None:
    return st.session_state.get(RESULT_KEY)
