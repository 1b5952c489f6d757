"""``moe-viz import FORMAT FILE --out trace.parquet``: an engine's routing record as a moe-viz
trace (per-token formats) or corpus aggregates (count-only dumps), optionally compared with
moe-viz's own recomputation on the model (``--compare``)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .. import trace_io
from ..agreement import agreement
from ..corpus import aggregates
from . import ModelShape, formats, import_routing, parse_token_ids, recompute


def add_parser(sub: argparse._SubParsersAction, model_help: str, device_help: str, remote_code_help: str) -> None:
    known = formats()
    names = ", ".join(f"{n} ({f.label})" for n, f in known.items())
    parser = sub.add_parser(
        "import",
        help="import the routing a serving or training engine recorded (vLLM, SGLang, Megatron-LM, llama.cpp)",
        description=f"Formats: {names}.",
    )
    parser.add_argument("format", help="one of " + ", ".join(known))
    parser.add_argument("file", type=Path, help="the engine's file, or a folder of its per-rank files")
    parser.add_argument(
        "--model", help=model_help + "; gives the MoE layers, experts, top-k and token text (recommended)"
    )
    parser.add_argument("--device", help=device_help)
    parser.add_argument("--trust-remote-code", action="store_true", help=remote_code_help)
    parser.add_argument(
        "--token-ids",
        help="the token ids the routing belongs to, comma-separated, or @FILE holding them (the request's prompt "
        "and output ids), for formats that do not carry them",
    )
    parser.add_argument("--top-k", type=int, help="experts per token, for count-only files without --model")
    parser.add_argument("--sequence", type=int, default=0, help="which sequence of the file --out writes (default 0)")
    parser.add_argument("--out", type=Path, help="write the sequence's trace to this .parquet or .json file")
    parser.add_argument("--counts-out", type=Path, help="write a count-only file's aggregates to this folder")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="recompute the routing with --model on the same token ids and print the agreement per layer",
    )


def token_ids_argument(text: str | None) -> list[int] | None:
    """``--token-ids``: ids from '1,2,3' (or '1 2 3'), or from the file named after an '@'."""
    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ValueError(f"--token-ids file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
    ids = parse_token_ids(text, "--token-ids")
    if not ids:
        raise ValueError("--token-ids must hold at least one id")
    return ids


def command(args: argparse.Namespace, load_model) -> int:  # noqa: ANN001 - the CLI's model loader
    if args.format not in formats():
        raise ValueError(f"format must be one of {sorted(formats())}; got {args.format!r}")
    if args.out is None and args.counts_out is None and not args.compare:
        raise ValueError("say what to do with the import: --out FILE, --counts-out DIR and/or --compare")
    if args.out is not None and args.out.suffix not in (".parquet", ".json"):
        raise ValueError(f"--out must end in .parquet or .json; got {str(args.out)!r}")
    if args.compare and args.model is None:
        raise ValueError("--compare needs --model: the model to recompute the routing with")
    model = load_model(args.model) if args.model is not None else None
    shape = ModelShape.of(model) if model is not None else ModelShape()
    if args.top_k is not None:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1; got {args.top_k}")
        shape = replace(shape, top_k=args.top_k)
    imported = import_routing(args.format, args.file, shape, token_ids_argument(args.token_ids))
    for note in imported.notes:
        print(f"note: {note}")
    for i, (label, trace) in enumerate(imported.traces):
        print(
            f"sequence {i}: {label}: {trace.num_tokens} tokens, MoE layers {trace.layer_ids[:8]}"
            + (" …" if len(trace.layer_ids) > 8 else "")
        )
    if imported.counts is not None:
        agg = imported.counts
        print(f"counts: {agg.chunks_done:,} steps, {len(agg.meta.layers)} MoE layers, {agg.num_experts} experts")
    if args.out is not None or args.compare:
        trace = imported.trace(args.sequence) if imported.traces else None
        if trace is None:
            raise ValueError("this file holds counts only: write them with --counts-out DIR")
        if args.out is not None:
            (trace_io.save_parquet if args.out.suffix == ".parquet" else trace_io.save_json)(trace, args.out)
            print(f"wrote {args.out}")
        if args.compare:
            ag = agreement(trace, recompute(trace, model), a_name=args.format, b_name="moe-viz")
            print(f"{'layer':>5}  {'top-k overlap':>13}  {'top-1 match':>11}")
            for row in ag.per_layer.itertuples():
                print(f"{row.layer:>5}  {row.topk_overlap:>13.1%}  {row.top1_match:>11.1%}")
    if args.counts_out is not None:
        if imported.counts is None:
            raise ValueError("this file holds per-token routing, not counts: write it with --out FILE")
        aggregates.save(imported.counts, args.counts_out)
        print(f"wrote {args.counts_out}")
    return 0
