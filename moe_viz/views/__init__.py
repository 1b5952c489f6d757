"""Views: each chart of the app as one unit — figure, explanation and title computed together.

A view is a function of a trace (or a pair of traces) and its own arguments that returns a
``View``. The explanation cites numbers of its own figure: both are built from the same
statistics. Pages, ``bench/page.py`` and the HTML download all iterate the page lists below, so
a chart and its sentence can never be paired by hand. Needs plotly (the ``app`` extra).

    from moe_viz import views
    for view in views.explore_views(trace, layer=0):
        view.figure or view.html, view.explanation
"""

from __future__ import annotations

from collections.abc import Iterator

from ..fragility import NoiseSensitivity
from ..trace import Trace
from ._display import BIN_THRESHOLD, code_token, display_token, pct, per_layer_counts, token_bins
from ._experts import MANY_EXPERTS, SHOWN_EXPERTS, ExpertFocus, expert_focus
from ._plotly import array_values, expert_colors
from ._view import View
from .agreement import agreement_by_layer, agreement_tokens
from .balance import (
    Card,
    balance_table,
    coactivation,
    expert_load,
    layer_load,
    metric_cards,
    reuse,
    router_confidence,
)
from .compare import mode_effect, routing_diff
from .corpus import corpus_views
from .fragility import edit_diff, margin_ranking, noise_sensitivity, token_fragility
from .importance import importance_heatmap, importance_vs_load
from .imported import count_views, import_views, routed_heatmap, unavailable
from .paper import paper_views
from .paths import expert_paths, paths_table
from .phases import prefill_decode
from .routing import coloured_text, predictions, router_distribution, routing_heatmap
from .sweeps import capacity_sweep, k_sweep


def explore_views(
    trace: Trace, layer: int, experts: list[int] | None = None, tokens: tuple[int, int] | None = None
) -> list[View]:
    """The Explore page, top to bottom (the token close-up is ``token_views``). ``experts``: the
    heatmap's rows on a model with many experts (default: the busiest); ``tokens`` = (start, stop):
    the heatmap and the text zoom into those positions of a long prompt (the rest use all tokens)."""
    return list(iter_explore_views(trace, layer, experts, tokens))


def iter_explore_views(
    trace: Trace, layer: int, experts: list[int] | None = None, tokens: tuple[int, int] | None = None
) -> Iterator[View]:
    """``explore_views`` one at a time, each built when asked for: a page shows the first chart
    while the rest are still to be computed."""
    zoomed = trace.window(*tokens) if tokens is not None else trace
    yield routing_heatmap(zoomed, layer, experts)
    yield coloured_text(zoomed, layer)
    yield layer_load(trace)
    yield expert_paths(trace)


def token_views(trace: Trace, layer: int, position: int, noise: NoiseSensitivity | None = None) -> list[View]:
    """One token up close: its router distribution, the next-token predictions after it, and how
    fragile its routing is in every layer (with the noise measurement when one is given)."""
    return [
        router_distribution(trace, layer, position),
        predictions(trace, position),
        token_fragility(trace, position, noise),
    ]


def generation_views(trace: Trace, layer: int) -> list[View]:
    """A generation's routing: the heatmap with the prompt / generated boundary, and prefill
    against decode load."""
    return [routing_heatmap(trace, layer), prefill_decode(trace, layer)]


def balance_views(trace: Trace, layer: int) -> list[View]:
    """The Load balance page, top to bottom (the metric cards are ``metric_cards``); router
    confidence only where the layer holds the router's scores (not in an engine import)."""
    views = [expert_load(trace, layer), layer_load(trace), balance_table(trace)]
    if trace.layer(layer).scores_recorded:
        views.append(router_confidence(trace, layer))
    return [*views, coactivation(trace, layer), reuse(trace, layer)]


def compare_views(reference: Trace, other: Trace, layer: int) -> list[View]:
    """Compare modes, for one policy against the reference: routing diff and prediction effect
    (the effect needs both traces' full next-token distributions)."""
    views = [routing_diff(reference, other, layer)]
    if reference.output.has_distribution and other.output.has_distribution:
        views.append(mode_effect(reference, other))
    return views


def run_summary(trace: Trace) -> str:
    """One line that identifies a run: policy, tokens, drops per layer, top next token, fingerprint.

    The load test reads it back from the page to check that every session got its own result.
    """
    dropped = per_layer_counts(trace.layer_ids, [lt.dropped_count for lt in trace.layers], "dropped")
    top = (
        f"top next token id {int(trace.output.at(trace.num_tokens - 1).top_ids[0, 0])}"
        if trace.has_predictions
        else "no predictions"
    )
    return (
        f"Run summary: `{trace.policy}` · {trace.num_tokens} tokens · {dropped} · "
        f"{top} · routing fingerprint `{trace.fingerprint()}`"
    )


__all__ = [
    "BIN_THRESHOLD",
    "Card",
    "ExpertFocus",
    "MANY_EXPERTS",
    "SHOWN_EXPERTS",
    "View",
    "agreement_by_layer",
    "agreement_tokens",
    "array_values",
    "balance_table",
    "balance_views",
    "capacity_sweep",
    "coactivation",
    "code_token",
    "coloured_text",
    "corpus_views",
    "count_views",
    "compare_views",
    "display_token",
    "edit_diff",
    "expert_colors",
    "expert_focus",
    "expert_load",
    "expert_paths",
    "explore_views",
    "generation_views",
    "import_views",
    "importance_heatmap",
    "importance_vs_load",
    "iter_explore_views",
    "k_sweep",
    "layer_load",
    "margin_ranking",
    "metric_cards",
    "mode_effect",
    "noise_sensitivity",
    "paper_views",
    "paths_table",
    "pct",
    "predictions",
    "prefill_decode",
    "reuse",
    "router_confidence",
    "router_distribution",
    "routing_diff",
    "routed_heatmap",
    "routing_heatmap",
    "run_summary",
    "token_bins",
    "token_fragility",
    "token_views",
    "unavailable",
]
