"""``moe-viz corpus MODEL SOURCE --out DIR``: run a corpus, write its aggregates and statistics.

``DIR/aggregates/`` holds the counts as Parquet tables (``aggregates.save``), ``DIR/report.json``
every statistic with its bootstrap interval, ``DIR/checkpoint/`` the last saved batch (a second
call with the same settings resumes from it). Progress is shown with tqdm on stderr.

``--engine ray [--address HEAD:6379] [--workers N] [--gpus-per-worker G]`` runs the same batches on
a pool of Ray actors (``moe_viz.corpus.distributed``): this process loads only the tokenizer (to cut
and pack the batches), each actor loads the model once; a Ray run resumes per whole run only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .report import CorpusReport

ENGINES = ("local", "ray")
RAY_ONLY = ("address", "workers", "gpus_per_worker", "cpus_per_worker")
SOURCE_HELP = (
    "a text file (documents split at blank lines), a folder (one document per file, domain = sub-folder), "
    "a .jsonl / .csv / .parquet table, or a folder saved with datasets' save_to_disk"
)


def add_parser(sub: argparse._SubParsersAction, model_help: str, policy_help: str, device_help: str) -> None:
    p = sub.add_parser("corpus", help="run a model over a corpus: aggregates (Parquet) and statistics (JSON)")
    p.add_argument("model", help=model_help)
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (created; a run there with the same settings resumes)"
    )
    p.add_argument("--policy", default="native", help=policy_help)
    p.add_argument(
        "--text-column", default="text", help="tables and datasets: the column holding the text (default: text)"
    )
    p.add_argument(
        "--domain-column", help="tables and datasets: the column naming each row's domain (default: the file's name)"
    )
    p.add_argument("--split", help="saved DatasetDict: the split to read (default: train, else the first)")
    p.add_argument("--window", type=int, help="tokens per chunk (default: 512, or the model's limit)")
    p.add_argument("--token-budget", type=int, default=4096, help="tokens per padded batch (default: 4096)")
    p.add_argument("--max-documents", type=int, help="stop after this many documents")
    p.add_argument(
        "--importance-every", type=int, default=0, help="ablate each expert on every N-th document (0 = off)"
    )
    p.add_argument("--reference", help="another checkpoint of the same architecture: router saturation against it")
    p.add_argument("--replicates", type=int, default=200, help="bootstrap resamples (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the importance sample and the bootstrap (default: 0)")
    p.add_argument("--no-resume", action="store_true", help="start over even when DIR holds a checkpoint")
    p.add_argument("--device", help=device_help)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: in this process (default); ray: on a pool of Ray actors (pip install 'moe-viz[distributed]')",
    )
    p.add_argument("--address", help="--engine ray: the cluster, e.g. HEAD:6379 or auto (default: a local runtime)")
    p.add_argument("--workers", type=int, help="--engine ray: actors, each loading the model once (default: 2)")
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        help="--engine ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)",
    )
    p.add_argument("--cpus-per-worker", type=float, help="--engine ray: CPUs per actor (default: 1)")


def _ci(value: float, low: float, high: float, fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def report_lines(report: CorpusReport) -> list[str]:
    """A short text summary of a corpus report (the numbers of report.json)."""
    level = f"{report.level:.0%}"
    lines = [
        f"{report.tokens:,} tokens in {report.documents:,} documents, domains: {', '.join(report.domain.domains)}",
        f"intervals: {level} bootstrap over groups of documents, {report.replicates} resamples, seed {report.seed}",
        f"loss (nats/token): {_ci(*report.loss.overall.at())}",
        "layer  MI(domain;expert) bits [CI]   chance(95%)  reuse 1st-choice [CI] (random)   vocab spec [CI] (if token did not matter)",
    ]
    for i, layer in enumerate(report.domain.layers):
        mi = _ci(*report.domain.mi_bits.at(i))
        reuse = _ci(*report.reuse.first_choice_same.at(i))
        spec = _ci(*report.vocabulary["input"].mean.at(i))
        lines.append(
            f"{layer:>5}  {mi:<30} {report.domain.mi_null_95[i]:.3f}        {reuse} ({report.reuse.baselines[i, 0]:.3f})"
            f"   {spec} ({report.vocabulary['input'].baseline[i]:.3f})"
        )
    if report.importance is not None:
        rho = ", ".join(
            f"{layer}: {_ci(*report.importance.rank_correlation.at(i), '{:+.2f}')}"
            for i, layer in enumerate(report.importance.layers)
        )
        lines.append(f"importance vs load, Spearman rho per layer ({report.importance.documents} documents): {rho}")
    if report.saturation is not None:
        sat = ", ".join(
            f"{layer}: {_ci(*report.saturation.topk_overlap.at(i))}" for i, layer in enumerate(report.saturation.layers)
        )
        lines.append(f"router saturation against {report.saturation.reference_model}: {sat}")
    dormant = report.dormant.final
    lines.append(f"experts never routed to, per layer: {', '.join(str(int(x)) for x in np.asarray(dormant))}")
    return lines


def command(args: argparse.Namespace, load_model) -> int:  # noqa: ANN001 - the CLI's model loader
    from tqdm import tqdm

    from ..policies import parse_policy
    from .report import corpus_report, write_report
    from .run import run_corpus
    from .sources import open_source

    policy = parse_policy(args.policy)
    source = open_source(args.source, args.text_column, args.domain_column, args.split)
    lowest = {"window": 2, "max_documents": 1, "importance_every": 0, "replicates": 10, "workers": 1}
    for name, low in lowest.items():  # checked before the run: a bad value must not cost a corpus run
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}; got {value}")
    if args.engine == "local":
        given = [f"--{name.replace('_', '-')}" for name in RAY_ONLY if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for --engine ray; got --engine local")
        model = load_model(args.model)
        reference = load_model(args.reference) if args.reference else None
        print(f"model {model.model_id} ({model.architecture}), policy {args.policy}, source {source.describe()}")
    else:  # the driver loads the tokenizer only; each Ray actor loads the model
        print(f"model {args.model} on Ray, policy {args.policy}, source {source.describe()}")
    bar = tqdm(unit="doc", desc="corpus", dynamic_ncols=True)

    def progress(p) -> None:  # noqa: ANN001 - a corpus.run.Progress
        if bar.total is None and p.documents_total:
            bar.total = p.documents_total
        bar.update(p.documents_done - bar.n)
        bar.set_postfix(tokens=f"{p.tokens_done:,}", tok_s=f"{p.tokens_done / max(p.elapsed_s, 1e-9):,.0f}")

    settings = dict(
        out=args.out,
        window=args.window,
        token_budget=args.token_budget,
        seed=args.seed,
        importance_every=args.importance_every,
        max_documents=args.max_documents,
        resume=not args.no_resume,
        progress=progress,
    )
    try:
        if args.engine == "local":
            agg = run_corpus(model, source, policy, reference=reference, **settings)
        else:
            agg = _run_on_ray(args, source, policy, settings)
    finally:
        bar.close()
    report = corpus_report(agg, replicates=args.replicates, seed=args.seed)
    path = write_report(report, Path(args.out) / "report.json")
    print("\n".join(report_lines(report)))
    print(f"wrote {Path(args.out) / 'aggregates'} (Parquet) and {path}")
    return 0


def _run_on_ray(args: argparse.Namespace, source, policy, settings: dict) -> object:  # noqa: ANN001
    """``run_corpus_ray`` with the command's arguments; a missing Ray is a one-line error."""
    from .distributed import run_corpus_ray

    try:
        return run_corpus_ray(
            args.model,
            source,
            policy,
            address=args.address,
            workers=2 if args.workers is None else args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=1 if args.cpus_per_worker is None else args.cpus_per_worker,
            reference_id=args.reference,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
            **settings,
        )
    except ImportError as err:
        raise ValueError(str(err)) from None
