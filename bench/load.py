"""Many concurrent sessions on one hosted-mode server: latency, throughput, correctness.

Starts the app as it is served (``moe-viz app``: model loaded and warm before the server is
ready) on loopback in hosted mode, runs one session alone (the baseline), then
N sessions at once over Streamlit's own websocket protocol, each with its own prompt and policy,
and checks every session's run summary against a single-session reference. Prints p50/p95
latency, throughput and throughput relative to one session. Bounded: one round of N sessions.

    python bench/load.py --sessions 32
    python bench/load.py --sessions 64 --tokens 512     # prompts at the hosted limit
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from load_scenarios import HOSTED_ENV, query, references, scenarios  # noqa: E402
from streamlit_client import Server, run_sessions  # noqa: E402


def lengthen(prompt: str, tokens: int) -> str:
    """``prompt`` repeated and cut to about ``tokens`` tokens of the served model (its own subject
    first, so every session's prompt stays distinct)."""
    from transformers import AutoTokenizer

    tokenizer = _tokenizer(AutoTokenizer)
    ids: list[int] = []
    while len(ids) < tokens:
        ids += tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: tokens - 2], skip_special_tokens=True)  # room for special tokens


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(auto):  # noqa: ANN001, ANN202 - transformers' AutoTokenizer; the served model's tokenizer
    if "t" not in _TOKENIZERS:
        _TOKENIZERS["t"] = auto.from_pretrained(HOSTED_ENV["MOE_VIZ_MODEL"])
    return _TOKENIZERS["t"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--slots", default=HOSTED_ENV["MOE_VIZ_COMPUTE_SLOTS"], help="MOE_VIZ_COMPUTE_SLOTS")
    parser.add_argument(
        "--tokens", type=int, default=0, help="make every prompt about this many tokens long (hosted limit: 512)"
    )
    args = parser.parse_args()
    pairs = scenarios(args.sessions)
    if args.tokens:
        pairs = [(lengthen(prompt, args.tokens), spec) for prompt, spec in pairs]
    print(f"computing {len(pairs)} single-session references ...", file=sys.stderr, flush=True)
    expected = references(pairs)
    env = {**HOSTED_ENV, "MOE_VIZ_COMPUTE_SLOTS": str(args.slots)}
    with Server(env=env, launcher=True) as server:
        print("warming the server (one session) ...", file=sys.stderr, flush=True)
        asyncio.run(run_sessions(server.port, [query(*pairs[0])]))
        alone = [asyncio.run(run_sessions(server.port, [query(*pairs[i % 4])]))[0].seconds for i in range(4)]
        print(f"running {len(pairs)} sessions at once ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        results = asyncio.run(run_sessions(server.port, [query(p, s) for p, s in pairs]))
        wall = time.perf_counter() - t0
    latencies = sorted(r.seconds for r in results)
    errors = sum(1 for r in results if r.exceptions or not r.finished)
    wrong = sum(1 for r, want in zip(results, expected) if r.find("Run summary:") != want)
    single = statistics.median(alone)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    print(f"\nsessions {len(results)}  compute slots {args.slots}  torch threads/slot 1")
    print(f"one session alone      median {single:6.2f} s  ({1 / single:.2f} sessions/s)")
    print(
        f"{len(results)} at once            p50 {statistics.median(latencies):6.2f} s   p95 {p95:6.2f} s   "
        f"max {latencies[-1]:6.2f} s   wall {wall:6.2f} s"
    )
    print(
        f"throughput             {len(results) / wall:.2f} sessions/s = {len(results) / wall * single:.2f}x one session"
    )
    print(f"errors {errors}   wrong results {wrong}")


if __name__ == "__main__":
    main()
