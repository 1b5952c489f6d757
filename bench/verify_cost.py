"""What does verifying the router maths at load cost? Fresh processes, the default model.

Each of ``--runs`` fresh Python processes imports moe_viz, then times ``load_model()`` (tokenizer,
weights, router discovery and verification, hooks) and, inside it, ``discover_and_verify`` (the
calibration forward, the random router inputs, the spec search) and ``find_output_head`` (the
proof that the forward returns its output head's projection unchanged: one more calibration
forward, asked for its last position). Prints the medians and the share of the load the
verification takes, both proofs together (target: under 2%). Run: ``python bench/verify_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, time
import moe_viz, moe_viz._hooks as hooks
spent = {}
def timed(name):
    original = getattr(hooks, name)
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = time.perf_counter() - start
    setattr(hooks, name, run)
timed("discover_and_verify")
timed("find_output_head")
start = time.perf_counter()
model = moe_viz.load_model()
load = time.perf_counter() - start
print(json.dumps({"load_s": load, "verify_s": spent["discover_and_verify"], "head_s": spent["find_output_head"],
                  "routers": len(model.sites)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=300)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(
            f"  run {i + 1}/{args.runs}: load {rows[-1]['load_s']:.3f} s, routers {rows[-1]['verify_s'] * 1e3:.1f} ms, "
            f"output head {rows[-1]['head_s'] * 1e3:.1f} ms"
        )
    load = statistics.median(r["load_s"] for r in rows)
    verify = statistics.median(r["verify_s"] for r in rows)
    head = statistics.median(r["head_s"] for r in rows)
    share = statistics.median((r["verify_s"] + r["head_s"]) / r["load_s"] for r in rows)
    print(
        f"default model, {rows[0]['routers']} routers: load {load:.3f} s, router verification {verify * 1e3:.1f} ms, "
        f"output head {head * 1e3:.1f} ms"
    )
    print(f"verification / load: {share:.2%} (target < 2%: {'met' if share < 0.02 else 'NOT met'})")


if __name__ == "__main__":
    main()
