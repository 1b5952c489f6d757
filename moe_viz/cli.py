"""Command line (MODEL: a hub id or local folder; ``default`` = the shipped model):

* ``moe-viz trace MODEL --prompt TEXT --policy SPEC [--generate N] [--out FILE]`` prints a per-layer
  summary (load per expert, dropped assignments, capacity) and writes the trace as JSON or Parquet.
* ``moe-viz inspect MODEL`` says, per router, how its routing maths was verified at load.
* ``moe-viz importance MODEL --prompt TEXT [--mode reroute|zero] [--out FILE.csv]`` ablates each
  expert of each MoE layer and prints, per layer, the experts by importance (loss change) beside
  their load share and the rank correlation between the two; ``--out`` writes the table as CSV.
* ``moe-viz sweep MODEL --prompt TEXT --over capacity|k [--factors F1,F2,...] [--out FILE.csv]``
  sweeps the capacity factor (drop rate, KL to native, top-1 flips, loss per factor) or k (compute
  share, KL, flips, loss per k) on the prompt; ``--out`` writes the table as CSV.
* ``moe-viz corpus MODEL SOURCE --out DIR [--policy SPEC] [--domain-column COL] ...`` runs a corpus
  and writes its aggregates (Parquet, ``DIR/aggregates``) and statistics with bootstrap intervals
  (``DIR/report.json``); an interrupted run resumes (``moe_viz.corpus.cli``).
* ``moe-viz train-default`` reproduces the shipped default model.

Bad values exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from .corpus import cli as corpus_cli
from .engines import cli as import_cli
from .policies import parse_policy

POLICY_HELP = (
    "routing policy: 'native' (the model's own routing), 'top-k:K' (1 <= K <= experts), "
    "'capacity:FACTOR[:position|probs][:k=K]' (capacity ceil(FACTOR*T*k/E) per expert; over-capacity "
    "assignments are dropped, in token order or by gate weight), 'ensemble:gate' or 'ensemble:uniform' "
    "(every expert contributes). Default: native"
)
MODEL_HELP = "hub id or local folder of an MoE causal LM; 'default' = the shipped model"
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)"
REMOTE_CODE_HELP = "allow the checkpoint's own Python code (off by default)"
SWEEPS = ("capacity", "k")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--trust-remote-code", action="store_true", help=REMOTE_CODE_HELP)


def _load(args: argparse.Namespace, name: str | None = None) -> object:
    """The command's model (or the model ``name``, e.g. a reference checkpoint), with the command's
    device and remote-code setting: ``default`` is the shipped model (or $MOE_VIZ_DEFAULT_MODEL)."""
    from .models import DEFAULT_MODEL, load_model

    name = args.model if name is None else name
    return load_model(
        DEFAULT_MODEL if name == "default" else name,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-viz", description="See how a Mixture-of-Experts LM routes tokens.")
    sub = parser.add_subparsers(dest="command", required=True)
    trace = sub.add_parser("trace", help="run a prompt under a routing policy and write its trace")
    trace.add_argument("model", help=MODEL_HELP)
    trace.add_argument("--prompt", required=True, help="the text to run")
    trace.add_argument("--policy", default="native", help=POLICY_HELP)
    trace.add_argument(
        "--generate", type=int, default=0, metavar="N", help="also generate N new tokens (greedy) under the policy"
    )
    trace.add_argument("--out", type=Path, help="write the trace to this .json or .parquet file")
    trace.add_argument("--device", help=DEVICE_HELP)
    trace.add_argument("--trust-remote-code", action="store_true", help=REMOTE_CODE_HELP)
    inspect = sub.add_parser("inspect", help="load a model and say, per router, how its routing maths was verified")
    _model_arguments(inspect)
    importance = sub.add_parser(
        "importance", help="ablate each expert on a prompt and rank the experts by the loss change"
    )
    _model_arguments(importance)
    importance.add_argument("--prompt", required=True, help="the text to run (at least 2 tokens)")
    importance.add_argument(
        "--mode",
        default="reroute",
        help="how an expert is ablated: 'reroute' (its tokens go to their next-best experts) or 'zero' "
        "(its output is dropped, the other weights kept). Default: reroute",
    )
    importance.add_argument("--out", type=Path, help="write the per (layer, expert) table to this .csv file")
    sweep = sub.add_parser("sweep", help="sweep the capacity factor or k on a prompt, in one batched forward")
    _model_arguments(sweep)
    sweep.add_argument("--prompt", required=True, help="the text to run")
    sweep.add_argument("--over", required=True, help="what to sweep: 'capacity' (the capacity factor) or 'k'")
    sweep.add_argument(
        "--factors",
        help="with --over capacity: comma-separated capacity factors > 0, e.g. 0.25,0.5,1,2,4 "
        "(default: 0.25 to 4, log-spaced); --over k runs every k from 1 to the number of experts",
    )
    sweep.add_argument(
        "--out",
        type=Path,
        help="write the table to this .csv file (capacity: one row per factor and layer, with the factor's "
        "effects; k: one row per k)",
    )
    corpus_cli.add_parser(sub, MODEL_HELP, POLICY_HELP, DEVICE_HELP)
    import_cli.add_parser(sub, MODEL_HELP, DEVICE_HELP, REMOTE_CODE_HELP)
    sub.add_parser(
        "app",
        help="start the web app with its models loaded first (the remaining arguments go to streamlit run; "
        "'moe-viz app --check' exits 0 only when the server is ready)",
        add_help=False,
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
    model = _load(args)
    print(f"model {model.model_id} ({model.architecture}): {model.routing_summary}")
    print("\n".join(router_lines(model)))
    print(head_line(model))
    return 0


def head_line(model: object) -> str:
    """How a run gets its next-token logits: projected for the rows read, or all in the forward."""
    instrumentation = model.instrumentation
    if instrumentation.head is not None:
        return (
            "output head: returns lm_head's output unchanged (checked at load, bit for bit): a run projects the "
            "vocabulary only for the positions whose predictions are read"
        )
    return f"output head: every position's logits computed in the forward ({instrumentation.head_reason})"


def _trace_command(args: argparse.Namespace) -> int:
    from ._runs import generate, run_prompt
    from .trace_io import save_json, save_parquet

    if args.generate < 0:
        raise ValueError(f"--generate must be >= 0; got {args.generate}")
    if args.out is not None and args.out.suffix not in (".json", ".parquet"):
        raise ValueError(f"--out must end in .json or .parquet; got {str(args.out)!r}")
    if not args.prompt.strip():
        raise ValueError("--prompt must be non-empty text")
    policy = parse_policy(args.policy)  # checked before the model loads: bad values fail fast
    model = _load(args)
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


def _check_prompt_and_csv(args: argparse.Namespace) -> None:
    if not args.prompt.strip():
        raise ValueError("--prompt must be non-empty text")
    if args.out is not None and args.out.suffix != ".csv":
        raise ValueError(f"--out must end in .csv; got {str(args.out)!r}")


def _write_csv(table: object, out: Path | None) -> None:
    if out is not None:
        table.to_csv(out, index=False)
        print(f"wrote {out}")


def importance_lines(result: object) -> list[str]:
    """Per layer: the base loss, then the experts by importance (largest first) with the loss change
    on ablating each and its load share, and the layer's Spearman correlation of the two."""
    lines = [f"expert importance on this prompt: next-token loss change when one expert is ablated ({result.mode})"]
    for layer, rows in result.table.groupby("layer", sort=True):
        rho = result.rank_correlation.get(int(layer), float("nan"))
        rho_text = f"{rho:+.2f}" if math.isfinite(rho) else "n/a (importance or load share is constant)"
        lines.append(
            f"layer {int(layer)}: base loss {result.base_loss:.4f} nats; "
            f"Spearman rank correlation of importance with load share {rho_text}"
        )
        lines.append(f"  {'expert':>6}  {'delta_loss':>10}  {'load share':>10}")
        for row in rows.sort_values(["importance", "expert"], ascending=[False, True]).itertuples():
            lines.append(f"  {int(row.expert):>6}  {row.delta_loss:>+10.4f}  {row.load_share:>10.1%}")
    lines.append(
        "This is one prompt: importance and load on other text can differ; rank experts over a corpus "
        "before acting on it."
    )
    return lines


def _importance_command(args: argparse.Namespace) -> int:
    from .importance import expert_importance
    from .interventions import ABLATION_MODES

    if args.mode not in ABLATION_MODES:
        raise ValueError(f"--mode must be one of {', '.join(ABLATION_MODES)}; got {args.mode!r}")
    _check_prompt_and_csv(args)
    model = _load(args)
    result = expert_importance(model, args.prompt, mode=args.mode)
    print(f"model {model.model_id} ({model.architecture})")
    print("\n".join(importance_lines(result)))
    _write_csv(result.table, args.out)
    return 0


def parse_factors(text: str) -> tuple[float, ...]:
    """``"0.25,0.5,1"`` -> (0.25, 0.5, 1.0); ValueError, naming the text, unless every item is a
    distinct finite number > 0."""
    bad = ValueError(f"--factors must be distinct numbers > 0, comma-separated (e.g. 0.25,0.5,1,2,4); got {text!r}")
    try:
        factors = tuple(float(item) for item in text.split(","))
    except ValueError:
        raise bad from None
    if any(not (math.isfinite(f) and f > 0) for f in factors) or len(set(factors)) != len(factors):
        raise bad
    return factors


def capacity_sweep_lines(effects: object, drops: object) -> list[str]:
    """Per factor: the capacity, the drop rate averaged over layers, mean KL to native, top-1 flip
    rate and next-token loss."""
    lines = [f"{'factor':>7}  {'capacity':>8}  {'mean drop rate':>14}  {'mean KL':>9}  {'flip rate':>9}  {'loss':>7}"]
    for row in effects.itertuples():
        at = drops[drops.factor == row.factor]
        caps = sorted({int(c) for c in at.capacity.dropna()})
        capacity = "-" if not caps else str(caps[0]) if len(caps) == 1 else f"{caps[0]}-{caps[-1]}"
        lines.append(
            f"{row.factor:>7g}  {capacity:>8}  {at.drop_rate.mean():>14.1%}  {row.mean_kl:>9.4f}  "
            f"{row.flip_rate:>9.1%}  {row.loss:>7.4f}"
        )
    return lines


def k_sweep_lines(table: object) -> list[str]:
    """Per k: the share of expert compute (k / E), mean KL to native, top-1 flip rate and loss."""
    lines = [f"{'k':>3}  {'compute share':>13}  {'mean KL':>9}  {'flip rate':>9}  {'loss':>7}"]
    for row in table.itertuples():
        lines.append(
            f"{int(row.k):>3}  {row.compute_share:>13.1%}  {row.mean_kl:>9.4f}  {row.flip_rate:>9.1%}  {row.loss:>7.4f}"
        )
    return lines


def _sweep_command(args: argparse.Namespace) -> int:
    from .sweeps import DEFAULT_FACTORS, capacity_sweep, k_sweep

    if args.over not in SWEEPS:
        raise ValueError(f"--over must be one of {', '.join(SWEEPS)}; got {args.over!r}")
    if args.over == "k" and args.factors is not None:
        raise ValueError(f"--factors applies to --over capacity only; got --over k with --factors {args.factors!r}")
    factors = DEFAULT_FACTORS if args.factors is None else parse_factors(args.factors)
    _check_prompt_and_csv(args)
    model = _load(args)
    print(f"model {model.model_id} ({model.architecture}), sweep over {args.over} on one prompt")
    if args.over == "capacity":
        effects, drops = capacity_sweep(model, args.prompt, factors=factors)
        print("\n".join(capacity_sweep_lines(effects, drops)))
        _write_csv(drops.merge(effects, on="factor", how="left"), args.out)
    else:
        table = k_sweep(model, args.prompt)
        print("\n".join(k_sweep_lines(table)))
        _write_csv(table, args.out)
    return 0


def _corpus_command(args: argparse.Namespace) -> int:
    return corpus_cli.command(args, lambda name: _load(args, name))


def _import_command(args: argparse.Namespace) -> int:
    return import_cli.command(args, lambda name: _load(args, name))


def _app_command(rest: list[str]) -> int:
    """Run the app's launcher (``app/launch.py`` of this checkout) in place of this process."""
    launch = Path(__file__).resolve().parent.parent / "app" / "launch.py"
    if not launch.is_file():
        print(
            "moe-viz app: error: the app is not beside this package (run it from a checkout or the image)",
            file=sys.stderr,
        )
        return 2
    os.execv(sys.executable, [sys.executable, str(launch), *rest])
    return 0  # not reached: execv replaces the process


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
    if argv[:1] == ["app"]:
        return _app_command(argv[1:])
    args = _parser().parse_args(argv)
    commands = {
        "trace": _trace_command,
        "inspect": _inspect_command,
        "importance": _importance_command,
        "sweep": _sweep_command,
        "corpus": _corpus_command,
        "import": _import_command,
    }
    try:
        return commands[args.command](args)
    except ValueError as err:
        print(f"moe-viz: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
