"""The Learn page's teaching sentences: each concept said as it is true for *this* router family,
with the live numbers (softmax or sigmoid scores, selection bias and group limits, shared experts,
auxiliary loss or bias balancing, capacity drops)."""

from __future__ import annotations

from .. import metrics
from ..trace import LayerTrace, Trace
from ._display import code_token, plural
from .routing import selection_rule


def router_concept(lt: LayerTrace) -> str:
    """§1: how this router turns its logits into scores and a choice."""
    start = (
        "Each MoE layer starts with a **router**: a small linear layer that gives every expert a score (a logit) for "
        "the current token. "
    )
    if lt.capture_only:
        return start + (
            "moe-viz records what this router decides but does not re-implement its maths, so the bars show a plain "
            "softmax of its logits for reference."
        )
    if lt.router_family == "topk_softmax":
        return start + (
            f"This router first picks the {lt.top_k} experts with the highest logits, then takes a softmax over those "
            f"{lt.top_k} alone to get their gate weights. The bars show a softmax over all {lt.num_experts} experts, "
            "for comparison only."
        )
    if lt.score_name == "score":
        how = (
            "A **sigmoid** turns each logit into a score between 0 and 1 on its own"
            if lt.router_family == "sigmoid"
            else "A **square root of a softplus** turns each logit into a positive score on its own"
        )
        text = start + how + ": the scores of one token do not sum to 1, so they are not probabilities."
        if not lt.scores_decide:
            text += (
                f" To choose, this router also uses {selection_rule(lt)}: the chosen experts are not always the "
                "highest-scoring ones, and their gate weights come from the unbiased scores."
            )
        return text
    text = start + "A **softmax** turns the logits into probabilities that sum to 1; the highest ones win."
    if not lt.scores_decide:
        text += f" To choose, this router also uses {selection_rule(lt)}."
    return text


def gate_sum_concept(trace: Trace, layer: int, position: int) -> str:
    """§2: the output as a gate-weighted sum, and which experts do no work."""
    lt = trace.layer(layer)
    t = trace.check_position(position)
    chosen = lt.index[t].tolist()
    weights = lt.weights[t].tolist()
    rest = lt.num_experts - len(chosen)
    text = (
        f"The token {code_token(trace.tokens[t])} is processed only by the {plural(len(chosen), 'expert')} its router "
        f"chose, and their outputs are added up, each multiplied by its **gate weight**; the weights add up to "
        f"**{sum(weights):.3f}**."
    )
    if rest:
        text += f" The other {plural(rest, 'routed expert')} do no work for this token"
        text += (
            ", while the **shared expert** runs for every token beside them"
            if lt.shared_expert
            else ": that is what makes the layer *sparse* and cheap"
        )
        text += "."
    return text


def balance_concept(lt: LayerTrace) -> str:
    """§4: how this model family was kept balanced in training, and the live aux loss."""
    b = metrics.balance(lt)
    k = lt.top_k
    numbers = (
        f"transformers' load-balancing loss on this layer is **{b.aux_loss_hf:.3f}** ({k} under perfectly even "
        f"routing; lower values are possible), **{b.aux_loss_norm:.3f}** normalised."
    )
    if lt.selection_bias:
        return (
            "This router family (DeepSeek-V3 style) is balanced **without an auxiliary loss**: during training a "
            "per-expert bias is raised for idle experts and lowered for busy ones, and only the choice uses it. "
            "For comparison, " + numbers
        )
    return "During training an **auxiliary loss** pushes the router towards equal loads. Here " + numbers


CAPACITY_WHY = (
    "Why a capacity at all? Training and serving systems often give each expert a **fixed-size buffer**: the "
    "computation then has static shapes, and with **expert parallelism** every device knows how many tokens it will "
    "receive from the all-to-all exchange. Each expert gets C = ⌈factor × T × k / E⌉ slots; an assignment beyond "
    "its expert's C is **dropped**."
)


def capacity_concept(capped: Trace, layer: int) -> str:
    """§5: what the capacity run did in this layer, and what a dropped assignment means."""
    lt = capped.layer(layer)
    b = metrics.balance(lt)
    C = lt.capacity[0] if lt.capacity else None
    total = sum(item.dropped_count for item in capped.layers)
    carried = "the residual path and the shared expert" if lt.shared_expert else "the residual path alone"
    if not b.dropped:
        return (
            f"With C = {C} slots per expert no expert of layer {layer} overflows: nothing is dropped here "
            f"({total} over all layers). Lower the factor to see drops."
        )
    return (
        f"With C = {C} slots per expert, the busiest experts of layer {layer} overflow: **{b.dropped}** assignments are "
        f"dropped ({total} over all layers). A dropped assignment loses only that expert: the token keeps its other "
        f"experts, whose weights are not renormalised ({b.partially_dropped_tokens} tokens here). Only a token whose "
        f"every assignment is dropped is carried by {carried} ({b.fully_dropped_tokens} tokens here)."
    )
