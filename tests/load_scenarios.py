"""Sessions for the load test and bench/load.py: distinct prompts and policies, with references."""

from __future__ import annotations

import os
from urllib.parse import urlencode

import torch

from moe_viz import DEFAULT_MODEL, load_model, parse_policy, run_prompt
from moe_viz.views import run_summary

POLICIES = [
    "top-k:1",
    "top-k:2",
    "capacity:0.5:position",
    "capacity:1:probs",
    "ensemble:gate",
    "ensemble:uniform",
    "top-k:3",
    "capacity:1.25:position",
]
SUBJECTS = [
    "def add(a, b):\n    return a + b",
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be, that is the question:",
    "床前明月光，疑是地上霜。",
    "1234 + 5678 = 6912",
    "The router sends each token to two experts.",
    "for i in range(10):\n    print(i * i)",
    "Love all, trust a few, do wrong to none.",
]
MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
HOSTED_ENV = {"MOE_VIZ_HOSTED": "1", "MOE_VIZ_TORCH_THREADS": "1", "MOE_VIZ_COMPUTE_SLOTS": "2", "MOE_VIZ_MODEL": MODEL}


def scenarios(n: int) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, policy spec) pairs."""
    return [(f"{SUBJECTS[i % len(SUBJECTS)]} #{i}", POLICIES[i % len(POLICIES)]) for i in range(n)]


def query(prompt: str, policy: str) -> str:
    return urlencode({"prompt": prompt, "policy": policy})


def references(pairs: list[tuple[str, str]], threads: int = 1) -> list[str]:
    """The run summary a single session must show for each pair (same torch thread count as the server)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_model(MODEL)
        return [run_summary(run_prompt(model, prompt, parse_policy(spec))) for prompt, spec in pairs]
    finally:
        torch.set_num_threads(before)
