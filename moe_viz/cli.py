"""Command line: ``moe-viz trace MODEL --prompt TEXT --policy SPEC [--generate N] [--out FILE]``;
``moe-viz inspect MODEL`` says, per router, how its routing maths was verified at load.

Prints a per-layer summary (load per expert, dropped assignments, capacity) and writes the trace
as JSON or Parquet. ``moe-viz train-default`` reproduces the shipped default model. Bad values
exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .policies import parse_policy

POLICY_HELP = (
    "routing policy: 'native' (the model's own routing), 'top-k:K' (1 <= K <= experts), "
    "'capacity:FACTOR[:position|probs][:k=K]' (capacity ceil(FACTOR*T*k/E) per expert; over-capacity "
    "assignments are dropped, in token order or by gate weight), 'ensemble:gate' or 'ensemble:uniform' "
    "(every expert contributes). Default: native"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-viz", description="See how a Mixture-of-Experts LM routes tokens.")
    sub = parser.add_subparsers(dest="command", required=True)
    trace = sub.add_parser("trace", help="run a prompt under a routing policy and write its trace")
    trace.add_argument("model", help="hub id or local folder of an MoE causal LM; 'default' = the shipped model")
    trace.add_argument("--prompt", required=True, help="the text to run")
    trace.add_argument("--policy", default="native", help=POLICY_HELP)
    trace.add_argument(
        "--generate", type=int, default=0, metavar="N", help="also generate N new tokens (greedy) under the policy"
    )
    trace.add_argument("--out", type=Path, help="write the trace to this .json or .parquet file")
    trace.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    trace.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code (off by default)"
    )
    inspect = sub.add_parser("inspect", help="load a model and say, per router, how its routing maths was verified")
    inspect.add_argument("model", help="hub id or local folder of an MoE causal LM; 'default' = the shipped model")
    inspect.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    inspect.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code (off by default)"
    )
    sub.add_parser(
        "train-default",
        help="retrain the default model (the remaining arguments go to moe_viz.training.train_default; see --help)",
        add_help=False,
    )
    return parser


def _summary(trace: object) -> str:
    lines = [f"model {trace.model_id} ({trace.architecture}), policy {trace.policy}, {trace.num_tokens} tokens"]
    lines.append(f"{'layer':>5}  {'E':>3}  {'k':>2}  {'dropped':>7}  {'capacity':>8}  load per expert")
    for lt in trace.layers:
        capacity = "-" if not lt.capacity else str(lt.capacity[0] if len(set(lt.capacity)) == 1 else lt.capacity)
        load = " ".join(str(int(c)) for c in lt.load().tolist())
        note = "  (capture-only)" if lt.capture_only else ""
        lines.append(
            f"{lt.layer:>5}  {lt.num_experts:>3}  {lt.top_k:>2}  {lt.dropped_count:>7}  {capacity:>8}  {load}{note}"
        )
    return "\n".join(lines)


def router_lines(model: object) -> list[str]:
    """One line per router: path, class, layer, E, k, spec, how it was verified, what can run."""
    lines = []
    for site in model.sites:
        v = site.verification
        spec = site.spec
        if v.status == "verified":
            how = f"verified ({v.source}) on {v.tokens_checked} tokens: experts 100% equal, weights max diff {v.max_weight_diff:.2g}"
            runs = f"every policy (top-k 1..{spec.num_experts}, capacity, ensemble)"
        elif v.status == "partial":
            how = f"partial: {v.reason}"
            runs = f"native, capacity at k={spec.top_k}"
        else:
            how = f"capture-only: {v.reason}"
            runs = "native only"
        lines.append(
            f"{site.path}  {site.router_class}  layer {site.layer}  E={spec.num_experts} k={spec.top_k}  "
            f"spec: {v.spec_text}  |  {how}  |  runs: {runs}"
        )
    return lines


def _inspect_command(args: argparse.Namespace) -> int:
    from .models import DEFAULT_MODEL, load_model

    model = load_model(
        DEFAULT_MODEL if args.model == "default" else args.model,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"model {model.model_id} ({model.architecture}): {model.routing_summary}")
    print("\n".join(router_lines(model)))
    return 0


def _trace_command(args: argparse.Namespace) -> int:
    from ._runs import generate, run_prompt
    from .models import DEFAULT_MODEL, load_model
    from .trace_io import save_json, save_parquet

    if args.generate < 0:
        raise ValueError(f"--generate must be >= 0; got {args.generate}")
    if args.out is not None and args.out.suffix not in (".json", ".parquet"):
        raise ValueError(f"--out must end in .json or .parquet; got {str(args.out)!r}")
    if not args.prompt.strip():
        raise ValueError("--prompt must be non-empty text")
    policy = parse_policy(args.policy)  # checked before the model loads: bad values fail fast
    model = load_model(
        DEFAULT_MODEL if args.model == "default" else args.model,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    if args.generate:
        result = generate(model, args.prompt, policy, max_new_tokens=args.generate)
        trace = result.trace
    else:
        trace = run_prompt(model, args.prompt, policy)
    print(_summary(trace))
    if trace.generated_text is not None:
        print(f"generated: {trace.generated_text!r}")
    top = ", ".join(f"{tok!r} {p:.1%}" for tok, p in trace.predictions(n=5))
    print(f"next token: {top}")
    if args.out is not None:
        if args.out.suffix == ".json":
            save_json(trace, args.out)
        else:
            save_parquet(trace, args.out)
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-default"]:
        from .training.train_default import main as train_default

        try:
            train_default(argv[1:], prog="moe-viz train-default")
        except ValueError as err:
            print(f"moe-viz train-default: error: {err}", file=sys.stderr)
            return 2
        return 0
    args = _parser().parse_args(argv)
    try:
        return _inspect_command(args) if args.command == "inspect" else _trace_command(args)
    except ValueError as err:
        print(f"moe-viz: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
