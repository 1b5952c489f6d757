"""All corpus statistics of a run in one value, and its JSON form (the CLI's report.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import stats
from .aggregates import CorpusAggregates


@dataclass(frozen=True)
class CorpusReport:
    """The statistics of one run, each with its bootstrap interval (see ``stats``)."""

    meta: dict[str, Any]
    tokens: int
    documents: int
    documents_per_domain: dict[str, int]
    replicates: int
    level: float
    seed: int
    domain: stats.DomainSpecialisation
    loss: stats.DomainLoss
    balance: stats.CorpusBalance
    vocabulary: dict[str, stats.VocabularySpecialisation]
    coactivation: stats.CorpusCoactivation
    coactivation_adjacent: stats.CorpusCoactivation
    reuse: stats.CorpusReuse
    coverage: stats.Coverage
    dormant: stats.Dormant
    saturation: stats.Saturation | None
    importance: stats.CorpusImportance | None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(x: Any) -> Any:
    """A JSON-able form: dataclasses as dicts, arrays as lists, NaN as None, tables as records."""
    if isinstance(x, stats.Estimate):
        return x.to_dict()
    if hasattr(x, "__dataclass_fields__"):
        return {f.name: _plain(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return stats._jsonable(x) if x.dtype.kind == "f" else x.tolist()
    if hasattr(x, "to_dict") and hasattr(x, "columns"):  # a DataFrame: the first rows only
        return x.head(200).to_dict(orient="records")
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def corpus_report(
    agg: CorpusAggregates,
    replicates: int = stats.DEFAULT_REPLICATES,
    seed: int = 0,
    level: float = stats.DEFAULT_LEVEL,
    vocab_min_count: int = stats.VOCAB_MIN_COUNT,
) -> CorpusReport:
    """Every statistic of ``agg`` with ``level`` bootstrap intervals from ``replicates`` seeded resamples."""
    rs = stats.Resampler(agg, replicates, seed, level)
    return CorpusReport(
        meta=agg.meta.to_dict() | {"domains": list(agg.domains)},
        tokens=agg.total_tokens,
        documents=int(len(agg.docs)),
        documents_per_domain={d: int((agg.docs["domain"] == d).sum()) for d in agg.domains},
        replicates=replicates,
        level=level,
        seed=seed,
        domain=stats.domain_specialisation(agg, rs, seed=seed),
        loss=stats.domain_loss(agg, rs),
        balance=stats.balance(agg, rs),
        vocabulary={k: stats.vocabulary_specialisation(agg, rs, k, vocab_min_count) for k in agg.vocab},
        coactivation=stats.coactivation(agg, rs),
        coactivation_adjacent=stats.coactivation(agg, rs, adjacent=True),
        reuse=stats.reuse(agg, rs),
        coverage=stats.coverage(agg, rs),
        dormant=stats.dormant(agg, seed=seed, level=level),
        saturation=stats.saturation(agg, rs, agg.meta.native_top_k or agg.meta.top_k),
        importance=stats.importance(agg, rs),
    )


def write_report(report: CorpusReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=1, allow_nan=False))
    return path
