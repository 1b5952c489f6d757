"""Routing metrics: pure functions on traces and tensors (definitions: docs/routing-metrics.md).

Conventions used throughout (they are also listed in ``CONVENTIONS`` and on ``balance_table``):

* A layer's **assignments** are the (token, expert) pairs its policy routed: ``T * k'`` of them,
  kept plus dropped (k' = the applied k; E for ensemble). The **fair share** of one expert is
  assignments / E.
* **Load** is what each expert actually processed (kept assignments). The imbalance metrics (CV,
  MaxVio, load entropy, Gini, dead fraction, max share, busiest expert) use this **processed**
  load under the run's own policy (the applied routing); what a capacity limit dropped is
  reported by the drop counts, and the routed load (kept + dropped) stays available as ``routed``.
* The **HF aux loss** is transformers' ``load_balancing_loss_func``: E * sum_i f_i P_i with f the
  share of tokens whose softmax top-k (native k) contains i and P the mean softmax probability;
  it is the training-time definition, so it is computed on the native top-k whatever the run's
  policy. Under perfectly even routing it equals k (not a minimum: it can go lower). The
  **normalised** aux loss divides by k (1 under even routing; Switch/Megatron). Over several
  layers, f and P are pooled over all layers' tokens (as transformers does).
* The **z-loss** is mean_t (logsumexp_j z_tj)^2 over the router logits (ST-MoE).
* Entropies are in nats; normalised entropies divide by log E.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch

from ._cache import STATS
from .trace import LayerTrace, Trace

SetKind = Literal["routed", "kept", "native"]
SET_KINDS = ("routed", "kept", "native")


@dataclass(frozen=True)
class MetricDefinition:
    """One balance metric, written once: ``balance_table``'s column, the app's help text and the
    README's table of metrics all read it."""

    name: str  # the column in ``balance_table`` and the field of ``Balance``
    label: str  # a short label for a metric card
    definition: str  # what it is, as a formula in words
    balanced: str  # its value under perfectly even routing (in terms of E and k)


METRICS: tuple[MetricDefinition, ...] = (
    MetricDefinition("cv", "CV", "population std of the processed load per expert / its mean", "0"),
    MetricDefinition("max_vio", "MaxVio", "busiest expert's processed load / the mean load − 1", "0"),
    MetricDefinition("load_entropy", "Load entropy", "H(processed load shares), nats", "log E"),
    MetricDefinition("load_entropy_norm", "Load entropy (norm.)", "H(processed load shares) / log E", "1"),
    MetricDefinition(
        "effective_experts", "Effective experts", "exp(H): how many equally used experts behave alike", "E"
    ),
    MetricDefinition("diversity", "Diversity", "exp(H) / E", "1"),
    MetricDefinition(
        "gini", "Gini", "Σ_i (2i − E − 1) c_(i) / (E Σ c), loads sorted ascending; at most (E − 1)/E", "0"
    ),
    MetricDefinition("dead_fraction", "Dead experts", "share of experts that processed no token", "0"),
    MetricDefinition("max_share", "Max share", "busiest expert's processed load / all processed assignments", "1/E"),
    MetricDefinition(
        "aux_loss_hf",
        "Aux loss (HF)",
        "transformers' load_balancing_loss_func: E · Σ_i f_i P_i, f = share of tokens whose softmax top-k "
        "(native k) holds i, P = mean softmax probability; the training-time definition, so always on the native "
        "routing whatever the mode; even routing gives k, which is not a minimum",
        "k",
    ),
    MetricDefinition("aux_loss_norm", "Aux loss (normalised)", "aux_loss_hf / k (Switch / Megatron convention)", "1"),
    MetricDefinition("z_loss", "Router z-loss", "mean over tokens of logsumexp(router logits)² (ST-MoE)", "—"),
    MetricDefinition("dropped", "Dropped", "assignments over their expert's capacity (capacity mode only)", "0"),
    MetricDefinition("drop_rate", "Drop rate", "dropped assignments / assignments", "0"),
    MetricDefinition(
        "fully_dropped_tokens", "Fully dropped tokens", "tokens that lost every routed expert in the layer", "0"
    ),
)
METRIC_BY_NAME = {m.name: m for m in METRICS}


class Conventions(dict[str, str]):
    """A read-only table of conventions (metric -> how it is computed), shared and never copied.

    pandas deep-copies a frame's ``attrs`` at every operation on it (a slice, a column, ``copy``):
    a plain dict of some thirty sentences there cost a balance table a millisecond of copies. A
    dict still, so that it serialises as one (Streamlit writes a frame's ``attrs`` as JSON)."""

    def _read_only(self, *args: object, **kwargs: object) -> None:
        raise TypeError("the conventions table is read-only; copy it with dict(...) to change it")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _read_only  # type: ignore[assignment]

    def __copy__(self) -> Conventions:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Conventions:
        return self  # read-only: a copy would be the same table

    def __reduce__(self) -> tuple[type[Conventions], tuple[dict[str, str]]]:
        # pickle would rebuild a dict subclass item by item through the refused __setitem__:
        # built from a plain dict instead (a pickled table, Streamlit's cache_data)
        return (Conventions, (dict(self),))


CONVENTIONS = Conventions(
    {
        "assignments": "(token, expert) pairs the policy routed, kept + dropped (T * k')",
        "fair_share": "assignments / E",
        "load": "kept assignments per expert (what each expert processed)",
        "imbalance": "cv, max_vio, load entropy, gini, dead_fraction, max_share, busiest_expert use the load each "
        "expert processed under the run's policy (kept assignments; dropped ones were never processed)",
        "aux_loss": "aux_loss_hf / aux_loss_norm are the training-time definition: always on the router's own softmax "
        "top-k at the native k, whatever the run's policy",
        **{m.name: f"{m.definition}; perfect balance: {m.balanced}" for m in METRICS},
        "all_row": "the 'all' row: sums for counts, pooled aux loss, mean over layers for the other ratios",
    }
)


def metrics_markdown_table() -> str:
    """The README's table of balance metrics (``python -m moe_viz.metrics`` prints it)."""
    rows = ["| metric | column | definition | perfect balance |", "| --- | --- | --- | --- |"]
    rows += [f"| {m.label} | `{m.name}` | {m.definition} | {m.balanced} |" for m in METRICS]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- validation helpers
def _check_layer(layer: object, name: str = "layer") -> LayerTrace:
    if not isinstance(layer, LayerTrace):
        raise ValueError(f"{name} must be a LayerTrace (e.g. trace.layer(0)); got {type(layer).__name__}")
    return layer


def _check_trace(trace: object, name: str = "trace") -> Trace:
    if not isinstance(trace, Trace):
        raise ValueError(f"{name} must be a Trace (from run_prompt or generate); got {type(trace).__name__}")
    return trace


def check_scores(layer: LayerTrace, what: str) -> None:
    """ValueError when ``what`` needs the router's scores and ``layer`` was imported without them."""
    if not layer.scores_recorded:
        raise ValueError(
            f"{what} needs the router's scores, and layer {layer.layer} holds expert ids only (an engine import)"
        )


def _check_kind(which: str) -> None:
    if which not in SET_KINDS:
        raise ValueError(f"which must be one of {SET_KINDS}; got {which!r}")


def membership(layer: LayerTrace, which: SetKind = "routed") -> torch.Tensor:
    """(T, E) bool: token t's expert set S_t.

    ``routed``: every expert the applied policy chose (dropped ones included); ``kept``: only the
    assignments that were processed; ``native``: the model's own router choice.
    """
    _check_layer(layer)
    _check_kind(which)
    T, E = layer.num_tokens, layer.num_experts
    index = layer.native_index if which == "native" else layer.index  # (T, k)
    if which != "kept":
        return torch.zeros(T, E, dtype=torch.bool).scatter_(1, index, True)  # (T, E)
    # dropped assignments are written into a spare column E, then cut off
    sets = torch.zeros(T, E + 1, dtype=torch.bool).scatter_(1, index.masked_fill(layer.dropped, E), True)
    return sets[:, :E]  # (T, E)


def first_choice(layer: LayerTrace, which: SetKind = "routed") -> torch.Tensor:
    """(T,) each token's first-choice expert: the highest router score among the experts in its set.

    Without recorded scores (an engine import) it is the first slot of the set: engines write each
    token's experts in descending score order. A token with an empty set gets expert 0 (as argmax
    of an all-masked row does).

    Computed once per layer trace and kind (a page asks for it from several views); each call
    gets its own copy, so a caller that changes it cannot change what the next one reads."""
    _check_layer(layer)
    _check_kind(which)
    return STATS.get(layer, ("first_choice", which), lambda: _first_choice(layer, which)).clone()


def _first_choice(layer: LayerTrace, which: SetKind) -> torch.Tensor:
    sets = membership(layer, which)  # (T, E)
    if not layer.first_choice_known:
        raise ValueError(
            f"layer {layer.layer} has no first choice: the engine listed each token's experts by id, without scores"
        )
    if not layer.scores_recorded:
        index = layer.native_index if which == "native" else layer.index  # (T, k)
        keep = torch.ones_like(index, dtype=torch.bool) if which != "kept" else ~layer.dropped  # (T, k)
        first_slot = keep.int().argmax(dim=-1, keepdim=True)  # (T, 1): first kept slot (0 if none)
        return index.gather(1, first_slot).squeeze(1).masked_fill(~keep.any(dim=-1), 0)
    return layer.router_probs.float().masked_fill(~sets, -1.0).argmax(dim=-1)


# ----------------------------------------------------------------------------- load and balance
def expert_load(layer: LayerTrace, which: SetKind = "kept") -> torch.Tensor:
    """(E,) long: assignments per expert. ``kept`` (default) = processed, ``routed`` = kept +
    dropped, ``native`` = the model's own top-k."""
    _check_layer(layer)
    _check_kind(which)
    if which == "native":
        return torch.bincount(layer.native_index.reshape(-1), minlength=layer.num_experts)
    if which == "routed":
        return torch.bincount(layer.index.reshape(-1), minlength=layer.num_experts)
    return layer.load()


def load_shares(load: torch.Tensor) -> torch.Tensor:
    """(E,) float: load / total (zeros if the total is 0)."""
    total = float(load.sum())
    return load.double() / total if total > 0 else torch.zeros(load.shape, dtype=torch.float64)


def cv(load: torch.Tensor) -> float:
    """Coefficient of variation: population std / mean of the load (0 when balanced)."""
    x = load.double()
    mean = float(x.mean())
    return float(x.std(unbiased=False)) / mean if mean > 0 else 0.0


def max_vio(load: torch.Tensor) -> float:
    """MaxVio = max load / mean load - 1 (0 when balanced)."""
    x = load.double()
    mean = float(x.mean())
    return float(x.max()) / mean - 1.0 if mean > 0 else 0.0


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats of distributions along ``dim`` (0 log 0 = 0)."""
    p = p.double()
    return -(p * p.clamp_min(1e-300).log()).where(p > 0, torch.zeros((), dtype=p.dtype)).sum(dim=dim)


def gini(load: torch.Tensor) -> float:
    """Gini coefficient of the load: sum_i (2i - N - 1) c_(i) / (N sum c), ascending; 0 = equal."""
    x = load.double().sort().values
    n, total = x.numel(), float(x.sum())
    if total <= 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * x).sum()) / (n * total)


def aux_loss_hf(logits: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...], top_k: int) -> float:
    """transformers' ``load_balancing_loss_func`` on router logits (T, E), or a sequence of them
    (pooled over layers): E * sum_i f_i P_i; the uniform optimum is ``top_k``."""
    parts = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not parts or any(p.dim() != 2 for p in parts):
        raise ValueError("logits must be a (T, E) tensor or a non-empty sequence of them")
    E = parts[0].shape[1]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must satisfy 1 <= top_k <= {E}; got {top_k}")
    return _aux_from_parts([_aux_parts(z, top_k) for z in parts], E)


def _aux_parts(z: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One layer's share of the aux loss: (E,) float64 top-k counts, (E,) float64 summed softmax
    probabilities, and its rows."""
    p = z.float().softmax(dim=-1)  # (T, E)
    chosen = p.topk(top_k, dim=-1).indices  # (T, k)
    return torch.bincount(chosen.reshape(-1), minlength=z.shape[1]).double(), p.double().sum(dim=0), z.shape[0]


def _layer_aux_parts(layer: LayerTrace, top_k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``_aux_parts`` of a layer's router logits, once per layer trace: the layer's own aux loss
    and the pooled one of the balance table's "all" row add up the same parts."""
    return STATS.get(layer, ("aux_parts", top_k), lambda: _aux_parts(layer.router_logits, top_k))


def _aux_from_parts(parts: list[tuple[torch.Tensor, torch.Tensor, int]], E: int) -> float:
    counts = torch.zeros(E, dtype=torch.float64)
    prob_sum = torch.zeros(E, dtype=torch.float64)
    rows = 0
    for layer_counts, layer_probs, layer_rows in parts:
        counts += layer_counts
        prob_sum += layer_probs
        rows += layer_rows
    if rows == 0:
        return float("nan")
    return float(E * ((counts / rows) * (prob_sum / rows)).sum())


def z_loss(logits: torch.Tensor) -> float:
    """ST-MoE router z-loss: mean_t (logsumexp_j z_tj)^2 (fp32 logits)."""
    if logits.numel() == 0:
        return float("nan")
    return float(torch.logsumexp(logits.double(), dim=-1).square().mean())


@dataclass(frozen=True)
class Balance:
    """Load-balance metrics of one layer (conventions: ``CONVENTIONS``)."""

    layer: int
    num_experts: int
    k: int  # applied k' (E for ensemble)
    num_tokens: int
    load: torch.Tensor  # (E,) kept assignments
    routed: torch.Tensor  # (E,) kept + dropped
    assignments: int  # routed total, T * k'
    fair_share: float  # assignments / E
    cv: float
    max_vio: float
    load_entropy: float
    load_entropy_norm: float
    effective_experts: float
    diversity: float
    gini: float
    dead_fraction: float
    max_share: float
    busiest_expert: int
    aux_loss_hf: float
    aux_loss_norm: float
    z_loss: float
    dropped: int
    drop_rate: float
    fully_dropped_tokens: int
    partially_dropped_tokens: int
    capacity: list[int] | None


def balance(layer: LayerTrace) -> Balance:
    """All load-balance metrics of ``layer`` (see the module docstring for conventions).

    Computed once per layer trace (pages ask for a layer's balance from several views) and shared:
    its ``load`` and ``routed`` tensors are read-only by contract, like the layer's own."""
    _check_layer(layer)
    return STATS.get(layer, "balance", lambda: _balance(layer))


def _balance(layer: LayerTrace) -> Balance:
    E, T = layer.num_experts, layer.num_tokens
    kk = int(layer.index.shape[1]) if layer.index.dim() == 2 else 0
    routed = expert_load(layer, "routed")  # (E,)
    kept = layer.load()  # (E,)
    assignments = int(routed.sum())
    processed = int(kept.sum())
    # Imbalance is measured on the applied routing: the load each expert processed (kept). Under a
    # capacity limit a dropped assignment was asked for but never processed; the drop counts report it.
    h = float(entropy(load_shares(kept))) if processed else 0.0
    per_token_dropped = layer.dropped.sum(dim=1)  # (T,)
    dropped = int(per_token_dropped.sum())
    # The HF auxiliary loss and the z-loss need the router's logits: NaN for an import of ids only.
    aux = _aux_from_parts([_layer_aux_parts(layer, layer.top_k)], E) if T and layer.scores_recorded else float("nan")
    return Balance(
        layer=layer.layer,
        num_experts=E,
        k=kk,
        num_tokens=T,
        load=kept,
        routed=routed,
        assignments=assignments,
        fair_share=assignments / E,
        cv=cv(kept),
        max_vio=max_vio(kept),
        load_entropy=h,
        load_entropy_norm=h / math.log(E) if E > 1 else 1.0,
        effective_experts=math.exp(h),
        diversity=math.exp(h) / E,
        gini=gini(kept),
        dead_fraction=float((kept == 0).double().mean()),
        max_share=float(kept.max()) / processed if processed else 0.0,
        busiest_expert=int(kept.argmax()),
        aux_loss_hf=aux,
        aux_loss_norm=aux / layer.top_k,
        z_loss=z_loss(layer.router_logits) if layer.scores_recorded else float("nan"),
        dropped=dropped,
        drop_rate=dropped / assignments if assignments else 0.0,
        fully_dropped_tokens=int((per_token_dropped == kk).sum()) if kk else 0,
        partially_dropped_tokens=int(((per_token_dropped > 0) & (per_token_dropped < kk)).sum()),
        capacity=layer.capacity,
    )


TABLE_COLUMNS = [
    "layer",
    "tokens",
    "k",
    "assignments",
    "fair_share",
    "cv",
    "max_vio",
    "load_entropy",
    "load_entropy_norm",
    "effective_experts",
    "diversity",
    "gini",
    "dead_fraction",
    "max_share",
    "busiest_expert",
    "aux_loss_hf",
    "aux_loss_norm",
    "z_loss",
    "dropped",
    "drop_rate",
    "fully_dropped_tokens",
    "partially_dropped_tokens",
    "capacity",
]


def balance_table(trace: Trace) -> pd.DataFrame:
    """One row per MoE layer plus an ``"all"`` row; ``df.attrs["conventions"]`` states the
    conventions (the ``all`` row: sums for counts, pooled HF aux loss, means over layers otherwise).

    Computed once per trace (a trace is not changed after it is made) and returned as a copy.
    """
    return STATS.get(trace, "balance_table", lambda: _balance_table(trace)).copy()


def balance_records(trace: Trace) -> list[dict[str, object]]:
    """The rows of ``balance_table(trace)`` as plain dicts, the "all" row last (copies): for code
    that reads a few numbers, which cost more to look up in a frame than to compute."""
    return [dict(row) for row in STATS.get(trace, "balance_records", lambda: _balance_records(trace))]


def _mean_skipping_nan(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is), as pandas' ``Series.mean``."""
    kept = [float(v) for v in values if not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else float("nan")


def _balance_table(trace: Trace) -> pd.DataFrame:
    _check_trace(trace)
    df = balance_frame(trace, balance_records(trace))
    if not trace.layers:  # with the "all" row the layer column is mixed, so already of object dtype
        df["layer"] = df["layer"].astype(object)
    return df


def balance_frame(trace: Trace, records: list[dict[str, object]]) -> pd.DataFrame:
    """``records`` (``balance_records(trace)``, as they are or relabelled for display) as a balance
    table: its columns in order, the conventions and the policy in ``attrs``."""
    df = pd.DataFrame(records, columns=TABLE_COLUMNS)
    df.attrs["conventions"] = CONVENTIONS
    df.attrs["policy"] = trace.policy
    return df


def _balance_records(trace: Trace) -> list[dict[str, object]]:
    _check_trace(trace)
    rows: list[dict[str, object]] = []
    stats = [balance(lt) for lt in trace.layers]
    for b in stats:
        cap = None if b.capacity is None else (b.capacity[0] if len(b.capacity) == 1 else max(b.capacity))
        rows.append(
            {
                "layer": b.layer,
                "tokens": b.num_tokens,
                "k": b.k,
                "assignments": b.assignments,
                "fair_share": b.fair_share,
                "cv": b.cv,
                "max_vio": b.max_vio,
                "load_entropy": b.load_entropy,
                "load_entropy_norm": b.load_entropy_norm,
                "effective_experts": b.effective_experts,
                "diversity": b.diversity,
                "gini": b.gini,
                "dead_fraction": b.dead_fraction,
                "max_share": b.max_share,
                "busiest_expert": b.busiest_expert,
                "aux_loss_hf": b.aux_loss_hf,
                "aux_loss_norm": b.aux_loss_norm,
                "z_loss": b.z_loss,
                "dropped": b.dropped,
                "drop_rate": b.drop_rate,
                "fully_dropped_tokens": b.fully_dropped_tokens,
                "partially_dropped_tokens": b.partially_dropped_tokens,
                "capacity": cap,
            }
        )
    if stats:
        column = {c: [row[c] for row in rows] for c in TABLE_COLUMNS}  # plain lists: pandas per column costs ms
        top_k = trace.layers[0].top_k
        same_shape = len({lt.router_logits.shape[1] for lt in trace.layers}) == 1
        E = trace.layers[0].router_logits.shape[1]
        pooled = (
            _aux_from_parts([_layer_aux_parts(lt, top_k) for lt in trace.layers], E) if same_shape else float("nan")
        )
        total_assign = int(sum(column["assignments"]))
        dropped = int(sum(column["dropped"]))
        all_row: dict[str, object] = {
            c: _mean_skipping_nan(column[c]) for c in TABLE_COLUMNS[4:] if c not in ("busiest_expert", "capacity")
        }
        all_row.update(
            layer="all",
            tokens=int(max(column["tokens"])),
            k=int(max(column["k"])),
            assignments=total_assign,
            aux_loss_hf=pooled,
            aux_loss_norm=pooled / top_k,
            busiest_expert=None,
            capacity=None,
            dropped=dropped,
            drop_rate=dropped / total_assign if total_assign else 0.0,
            fully_dropped_tokens=int(sum(column["fully_dropped_tokens"])),
            partially_dropped_tokens=int(sum(column["partially_dropped_tokens"])),
        )
        rows.append(all_row)
    return rows


def layer_loads(trace: Trace, which: SetKind = "kept") -> torch.Tensor:
    """(L, E) long: per-layer expert loads (``expert_load``) stacked in ``trace.layers`` order."""
    _check_trace(trace)
    return torch.stack([expert_load(lt, which) for lt in trace.layers]) if trace.layers else torch.zeros(0, 0)


@dataclass(frozen=True)
class CapacityCheck:
    """What a capacity factor would drop on this layer's native routing (counterfactual)."""

    factor: float
    capacity: int  # C = ceil(factor * T * k / E)
    load: torch.Tensor  # (E,) native load
    overflow: torch.Tensor  # (E,) max(0, load - C)
    dropped: int
    drop_rate: float


def capacity_check(layer: LayerTrace, factor: float) -> CapacityCheck:
    """Per-expert overflow max(0, c_i - C) with C = ceil(factor * T * k / E) on the native load.

    For either drop priority an over-full expert drops exactly its overflow; for layers after the
    first a real capacity run also changes the hidden states, so this is exact only for layer 0.
    """
    _check_layer(layer)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"factor must be a finite number > 0; got {factor!r}")
    from ._router_math import capacity_for

    load = expert_load(layer, "native")
    C = capacity_for(float(factor), layer.num_tokens, layer.top_k, layer.num_experts)
    overflow = (load - C).clamp_min(0)
    total = int(load.sum())
    return CapacityCheck(
        float(factor), C, load, overflow, int(overflow.sum()), int(overflow.sum()) / total if total else 0.0
    )


# ----------------------------------------------------------------------------- per-token router statistics
def router_entropy(layer: LayerTrace, normalised: bool = True) -> torch.Tensor:
    """(T,) entropy of each token's router distribution (nats; / log E when ``normalised``).

    Sigmoid scores are renormalised to sum to one first."""
    _check_layer(layer)
    check_scores(layer, "router entropy")
    p = layer.router_probs.double()  # (T, E)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    h = entropy(p)  # (T,)
    if normalised:
        h = h / math.log(layer.num_experts) if layer.num_experts > 1 else torch.zeros_like(h)
    return h.float()


def topk_margin(layer: LayerTrace, k: int | None = None) -> torch.Tensor:
    """(T,) p_(k) - p_(k+1): the last chosen minus the first rejected router probability (native
    k by default). With k = E nothing is rejected and the margin is p_(E)."""
    _check_layer(layer)
    check_scores(layer, "the top-k margin")
    E = layer.num_experts
    k = layer.top_k if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must satisfy 1 <= k <= {E}; got {k!r}")
    best = layer.router_probs.float().topk(min(k + 1, E), dim=-1).values  # (T, k + 1): no full sort needed
    rejected = best[:, k] if k < E else torch.zeros(best.shape[0])
    return best[:, k - 1] - rejected


# ----------------------------------------------------------------------------- co-activation and reuse
@dataclass(frozen=True)
class Coactivation:
    """A[a, b] = #{t: a, b in S_t} / #{t: a in S_t} (NaN on the diagonal and for unused a)."""

    matrix: torch.Tensor  # (E, E) float
    counts: torch.Tensor  # (E, E) long; diagonal = tokens per expert
    baseline: float  # (k - 1) / (E - 1): A under independent uniform routing
    k: int
    which: str
    top_pair: tuple[int, int, float] | None  # (a, b, A[a, b]): the largest A among well-used experts a
    min_tokens: int = 1  # tokens an expert a needed to be considered for ``top_pair``


COACTIVATION_MIN_TOKENS = 3  # an expert needs this many tokens (and COACTIVATION_MIN_SHARE of them)
COACTIVATION_MIN_SHARE = 0.05  # before its co-activation share is cited as the strongest pair


def coactivation(layer: LayerTrace, which: SetKind = "routed") -> Coactivation:
    """Directed co-activation of experts within a token's set (OLMoE), with the independence
    baseline (k - 1)/(E - 1)."""
    sets = membership(layer, which).long()  # (T, E)
    E = layer.num_experts
    counts = sets.t() @ sets  # (E, E)
    per_expert = counts.diagonal().double()  # (E,)
    matrix = counts.double() / per_expert.unsqueeze(1)  # rows: conditioned on a
    matrix = matrix.where(per_expert.unsqueeze(1) > 0, torch.full((), float("nan"), dtype=torch.float64))
    matrix.fill_diagonal_(float("nan"))
    k = int(layer.native_index.shape[1]) if which == "native" else int(layer.index.shape[1])
    # The pair to cite: highest share among experts a with enough tokens that the share means
    # something (a share of 1 of 1 token is 100% and says nothing); ties go to the larger count.
    support = max(COACTIVATION_MIN_TOKENS, math.ceil(COACTIVATION_MIN_SHARE * layer.num_tokens))
    if not bool((per_expert >= support).any()):
        support = 1
    eligible = (per_expert >= support).unsqueeze(1).expand(E, E)  # (E, E) rows with enough tokens
    score = matrix.nan_to_num(-1.0).masked_fill(~eligible, -1.0) + counts.double() * 1e-9  # (E, E)
    top_pair = None
    if E > 1 and float(score.max()) >= 0:
        flat = int(score.argmax())
        top_pair = (flat // E, flat % E, float(matrix.reshape(-1)[flat]))
    return Coactivation(
        matrix=matrix.float(),
        counts=counts,
        baseline=(k - 1) / (E - 1) if E > 1 else float("nan"),
        k=k,
        which=which,
        top_pair=top_pair,
        min_tokens=support,
    )


@dataclass(frozen=True)
class Reuse:
    """Consecutive-token expert reuse (Mixtral Table 5) with random-routing baselines."""

    pairs: int  # T - 1 consecutive pairs
    k: int
    num_experts: int
    first_choice_same: float  # P[e1(t) = e1(t+1)]
    sets_intersect: float  # P[S_t and S_t+1 share an expert]
    mean_overlap: float  # E|S_t & S_t+1|
    first_choice_baseline: float  # 1/E
    intersect_baseline: float  # 1 - C(E-k, k) / C(E, k)
    overlap_baseline: float  # k^2 / E


def reuse_baselines(num_experts: int, k: int) -> tuple[float, float, float]:
    """(1/E, 1 - C(E-k, k)/C(E, k), k^2/E): reuse under independent uniform top-k routing."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must satisfy 1 <= k <= {num_experts}; got {k}")
    E = num_experts
    return 1 / E, 1 - math.comb(E - k, k) / math.comb(E, k), k * k / E


def reuse(layer: LayerTrace, which: SetKind = "routed") -> Reuse:
    """How often consecutive tokens reuse experts: same first choice (highest router probability
    within the set), intersecting sets, mean overlap; NaN with fewer than two tokens."""
    sets = membership(layer, which)  # (T, E)
    E, T = layer.num_experts, layer.num_tokens
    k = int(layer.native_index.shape[1]) if which == "native" else int(layer.index.shape[1])
    first = first_choice(layer, which)  # (T,)
    b1, bk, bo = reuse_baselines(E, k)
    if T < 2:
        nan = float("nan")
        return Reuse(0, k, E, nan, nan, nan, b1, bk, bo)
    overlap = (sets[:-1] & sets[1:]).sum(dim=-1).double()  # (T-1,)
    return Reuse(
        pairs=T - 1,
        k=k,
        num_experts=E,
        first_choice_same=float((first[:-1] == first[1:]).double().mean()),
        sets_intersect=float((overlap > 0).double().mean()),
        mean_overlap=float(overlap.mean()),
        first_choice_baseline=b1,
        intersect_baseline=bk,
        overlap_baseline=bo,
    )


# ----------------------------------------------------------------------------- comparing two runs
@dataclass(frozen=True)
class ModeEffect:
    """How ``other``'s next-token predictions differ from ``reference``'s on the same tokens."""

    reference_policy: str
    other_policy: str
    kl: torch.Tensor  # (T,) KL(reference || other), nats
    mean_kl: float
    flips: torch.Tensor  # (T,) bool: top-1 prediction differs
    flip_rate: float
    flipped_positions: list[int]
    delta_logprob: torch.Tensor  # (T,) other - reference log p(actual next token); NaN at the last position
    mean_delta_logprob: float  # over positions with a next token (NaN if none)


def _same_tokens(reference: Trace, other: Trace) -> None:
    _check_trace(reference, "reference")
    _check_trace(other, "other")
    if list(reference.token_ids) != list(other.token_ids):
        raise ValueError(
            f"other must run on the same token ids as reference (got {other.num_tokens} tokens vs "
            f"{reference.num_tokens}, or different ids); compare runs of the same prompt"
        )


def mode_effect(reference: Trace, other: Trace) -> ModeEffect:
    """KL(reference || other) per position from the full next-token log-distributions, top-1 flips
    and the change in log-prob of the actual next token (other - reference). Computed once per
    pair of traces."""
    return STATS.get(other, "mode_effect", lambda: _mode_effect(reference, other), partner=reference)


def _mode_effect(reference: Trace, other: Trace) -> ModeEffect:
    _same_tokens(reference, other)
    for name, tr in (("reference", reference), ("other", other)):
        if not tr.output.has_distribution:
            raise ValueError(
                f"{name} has no vocab_logprobs (the full next-token distribution was not kept; "
                f"T * V must be <= the runner's VOCAB_KEEP_LIMIT); got None for policy {tr.policy!r}"
            )
    lp = reference.output.vocab_logprobs.double()  # (T, V)
    lq = other.output.vocab_logprobs.double()  # (T, V)
    p = lp.exp()
    kl = (p * (lp - lq)).where(p > 0, torch.zeros((), dtype=p.dtype)).sum(dim=-1).clamp_min(0)  # (T,)
    flips = lp.argmax(dim=-1) != lq.argmax(dim=-1)  # (T,)
    delta = other.output.target_logprob.float() - reference.output.target_logprob.float()  # (T,)
    valid = ~delta.isnan()
    T = reference.num_tokens
    return ModeEffect(
        reference_policy=reference.policy,
        other_policy=other.policy,
        kl=kl.float(),
        mean_kl=float(kl.mean()) if T else float("nan"),
        flips=flips,
        flip_rate=float(flips.double().mean()) if T else float("nan"),
        flipped_positions=flips.nonzero().flatten().tolist(),
        delta_logprob=delta,
        mean_delta_logprob=float(delta[valid].mean()) if bool(valid.any()) else float("nan"),
    )


@dataclass(frozen=True)
class RoutingDiff:
    """Per-token expert sets of two runs at one layer (kept assignments) and what changed."""

    layer: int
    reference_sets: torch.Tensor  # (T, E) bool, experts that processed the token in reference
    other_sets: torch.Tensor  # (T, E) bool, the same in other
    changed: torch.Tensor  # (T,) bool: the sets differ
    num_changed: int  # tokens whose set changed
    added: torch.Tensor  # (T,) long: experts in other only
    removed: torch.Tensor  # (T,) long: experts in reference only
    reference_dropped: torch.Tensor  # (T,) long: dropped assignments per token in reference
    other_dropped: torch.Tensor  # (T,) long: the same in other


def routing_diff(reference: Trace, other: Trace, layer: int) -> RoutingDiff:
    """Compare the experts that processed each token (kept assignments) at ``layer``."""
    _same_tokens(reference, other)
    ref_lt, oth_lt = reference.layer(layer), other.layer(layer)
    a = membership(ref_lt, "kept")  # (T, E)
    b = membership(oth_lt, "kept")  # (T, E)
    changed = (a != b).any(dim=-1)  # (T,)
    return RoutingDiff(
        layer=layer,
        reference_sets=a,
        other_sets=b,
        changed=changed,
        num_changed=int(changed.sum()),
        added=(b & ~a).sum(dim=-1),
        removed=(a & ~b).sum(dim=-1),
        reference_dropped=ref_lt.dropped.sum(dim=-1),
        other_dropped=oth_lt.dropped.sum(dim=-1),
    )


if __name__ == "__main__":
    print(metrics_markdown_table())


# ----------------------------------------------------------------------------- expert paths across layers
@dataclass(frozen=True)
class Paths:
    """Each token's first-choice expert in every MoE layer, read as a path through the layers."""

    layers: list[int]
    positions: list[int]  # the token positions the paths are of (all, or a chosen subset)
    paths: torch.Tensor  # (T, L) long: first-choice expert per token and layer, rows in ``positions`` order
    marginals: torch.Tensor  # (L, E) float64: share of tokens with each first choice, per layer
    top: list[tuple[tuple[int, ...], int, float, float]]  # (path, tokens, share, share under independence)
    path_entropy: float  # H(path) in nats
    independent_entropy: float  # sum over layers of H(first choice): the path entropy if layers were independent
    total_correlation: float  # independent_entropy - path_entropy >= 0: how much the layers agree


def independence_probability(marginals: torch.Tensor, path: tuple[int, ...]) -> float:
    """The probability of ``path`` if every layer picked independently: the product of the marginals."""
    return float(torch.prod(torch.stack([marginals[layer, e] for layer, e in enumerate(path)])))


def positions_matching(trace: Trace, pattern: str) -> list[int]:
    """Positions whose token text matches the regular expression ``pattern`` (``re.search``, on
    the token as the tokenizer decodes it, leading space included). ValueError for a bad pattern."""
    _check_trace(trace)
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty regular expression; got {pattern!r}")
    if len(pattern) > 200:
        raise ValueError(f"pattern must be at most 200 characters; got {len(pattern)}")
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {err}") from None
    return [t for t, token in enumerate(trace.tokens) if compiled.search(token)]


def expert_paths(trace: Trace, which: SetKind = "routed", top: int = 10, positions: list[int] | None = None) -> Paths:
    """First-choice paths of the traced tokens (or only those at ``positions``), the most frequent
    ones against the independence baseline (product of per-layer marginals, over the same tokens),
    and how concentrated they are (total correlation)."""
    _check_trace(trace)
    if not trace.layers:
        raise ValueError("trace has no MoE layers: there are no expert paths")
    E = max(lt.num_experts for lt in trace.layers)
    paths = torch.stack([first_choice(lt, which) for lt in trace.layers], dim=1)  # (T, L)
    chosen = list(range(trace.num_tokens))
    if positions is not None:
        chosen = sorted({trace.check_position(p) for p in positions})
        if not chosen:
            raise ValueError("positions must name at least one token (no token matched)")
        paths = paths[chosen]  # (T', L)
    T, L = paths.shape
    marginals = torch.stack([torch.bincount(paths[:, i], minlength=E).double() / T for i in range(L)])  # (L, E)
    counts: dict[tuple[int, ...], int] = {}
    for row in paths.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    shares = torch.tensor([c / T for c in counts.values()], dtype=torch.float64)
    h_path = max(0.0, float(entropy(shares)))
    h_indep = float(sum(entropy(marginals[i]) for i in range(L)))
    return Paths(
        layers=trace.layer_ids,
        positions=chosen,
        paths=paths,
        marginals=marginals,
        top=[(p, c, c / T, independence_probability(marginals, p)) for p, c in ranked],
        path_entropy=h_path,
        independent_entropy=h_indep,
        total_correlation=max(0.0, h_indep - h_path),
    )
