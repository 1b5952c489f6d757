"""What does verifying the router maths at load cost? Fresh processes, the default model.

Each of ``--runs`` fresh Python processes imports moe_viz, then times ``load_model()`` (tokenizer,
weights, router discovery and verification, hooks) and, inside it, ``discover_and_verify`` (the
calibration forward, the random router inputs, the spec search). Prints the medians and the share
of the load the verification takes (target: under 2%). Run: ``python bench/verify_cost.py``.
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
spent = []
original = hooks.discover_and_verify
def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return original(*args, **kwargs)
    finally:
        spent.append(time.perf_counter() - start)
hooks.discover_and_verify = timed
start = time.perf_counter()
model = moe_viz.load_model()
load = time.perf_counter() - start
print(json.dumps({"load_s": load, "verify_s": spent[0], "routers": len(model.sites)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=300)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  run {i + 1}/{args.runs}: load {rows[-1]['load_s']:.3f} s, verify {rows[-1]['verify_s'] * 1e3:.1f} ms")
    load = statistics.median(r["load_s"] for r in rows)
    verify = statistics.median(r["verify_s"] for r in rows)
    share = statistics.median(r["verify_s"] / r["load_s"] for r in rows)
    print(f"default model, {rows[0]['routers']} routers: load {load:.3f} s, verification {verify * 1e3:.1f} ms")
    print(f"verification / load: {share:.2%} (target < 2%: {'met' if share < 0.02 else 'NOT met'})")


if __name__ == "__main__":
    main()
