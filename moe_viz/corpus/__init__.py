"""Corpus-scale routing statistics: run a model over a corpus, keep aggregates, compute
statistics with bootstrap confidence intervals.

    from moe_viz import load_model
    from moe_viz.corpus import open_source, run_corpus, corpus_report
    agg = run_corpus(load_model(), open_source("assets/demo-corpus/texts"), out="runs/demo")
    report = corpus_report(agg)

Modules: ``sources`` (reading a corpus), ``aggregates`` (the counts and their merge, Parquet
files), ``reduce`` (one batch to counts), ``run`` (the run: chunking, batching, checkpoints),
``stats`` (the statistics and their intervals).
"""

from .aggregates import CorpusAggregates, CorpusMeta, load, merge, save
from .run import Progress, run_corpus
from .sources import CorpusSource, Document, demo_corpus_path, open_source

__all__ = [
    "CorpusAggregates",
    "CorpusMeta",
    "CorpusSource",
    "Document",
    "Progress",
    "demo_corpus_path",
    "load",
    "merge",
    "open_source",
    "run_corpus",
    "save",
]
