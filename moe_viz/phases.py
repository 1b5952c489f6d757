"""Prefill vs decode: the routing of a generation split into the prompt's tokens and the
generated ones.

Serving engines run the two phases differently (one big prefill batch, then one token at a
time), and routing can differ between them: generated text drifts from the prompt's topic, and
capacity policies see a growing sequence. Per MoE layer: each phase's load shares, its balance
(CV and MaxVio, as in ``metrics``), and the Jensen-Shannon divergence between the two load
distributions (nats, 0 = identical, at most ln 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from . import metrics
from .trace import Trace


@dataclass(frozen=True)
class PhaseSplit:
    """``boundary``: the first generated token's position (= prompt tokens); ``prompt_shares`` and
    ``generated_shares`` (L, E) per layer in ``layers`` order; ``table``: layer, phase, tokens,
    cv, max_vio, then js_divergence per layer."""

    boundary: int
    layers: list[int]
    prompt_shares: torch.Tensor  # (L, E) float64
    generated_shares: torch.Tensor  # (L, E) float64
    js_divergence: dict[int, float]
    table: pd.DataFrame


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats) between two distributions over the same experts."""
    p, q = p.double() / p.double().sum(), q.double() / q.double().sum()
    m = (p + q) / 2
    half = lambda x: float((x * (x / m).log()).where(x > 0, torch.zeros((), dtype=x.dtype)).sum())  # noqa: E731
    return max(0.0, (half(p) + half(q)) / 2)


def phase_split(trace: Trace) -> PhaseSplit:
    """Split a generation's trace at its first generated token. ValueError for a trace with no
    generated tokens (a plain prompt run)."""
    if not isinstance(trace, Trace):
        raise ValueError(f"trace must be a Trace from generate(); got {type(trace).__name__}")
    boundary = trace.prompt_length
    generated = trace.num_tokens - boundary
    if generated < 1:
        raise ValueError(
            "trace has no generated tokens to compare with the prompt (it is a prompt run); "
            "generate at least 2 new tokens (the last new token is never fed back, so it has no routing)"
        )
    rows, js = [], {}
    prompt_shares, generated_shares = [], []
    for lt in trace.layers:
        kept = metrics.membership(lt, "kept").double()  # (T, E)
        loads = {"prompt": kept[:boundary].sum(dim=0), "generated": kept[boundary:].sum(dim=0)}  # (E,) each
        prompt_shares.append(metrics.load_shares(loads["prompt"]))
        generated_shares.append(metrics.load_shares(loads["generated"]))
        for phase, load in loads.items():
            rows.append(
                {
                    "layer": lt.layer,
                    "phase": phase,
                    "tokens": boundary if phase == "prompt" else generated,
                    "assignments": int(load.sum()),
                    "cv": metrics.cv(load),
                    "max_vio": metrics.max_vio(load),
                }
            )
        both = loads["prompt"].sum() > 0 and loads["generated"].sum() > 0
        js[lt.layer] = js_divergence(loads["prompt"], loads["generated"]) if both else math.nan
    table = pd.DataFrame(rows, columns=["layer", "phase", "tokens", "assignments", "cv", "max_vio"])
    table["js_divergence"] = table["layer"].map(js)
    return PhaseSplit(
        boundary=boundary,
        layers=trace.layer_ids,
        prompt_shares=torch.stack(prompt_shares),
        generated_shares=torch.stack(generated_shares),
        js_divergence=js,
        table=table,
    )
