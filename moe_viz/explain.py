"""Short teaching text beside each chart, citing the live numbers (all computed by ``metrics``).

Every function returns a Markdown string. Token text is shown in code spans (backticks replaced,
whitespace made visible), so untrusted tokens cannot inject Markdown, HTML or LaTeX.
"""

from __future__ import annotations

import math

from . import metrics
from .figures import token_bins as figures_token_bins
from .trace import LayerTrace, Trace

LOW_MARGIN = 0.05  # top-k margins below this count as fragile decisions
COUNTERFACTUAL_FACTOR = 1.0


def _tok(token: str) -> str:
    """A token as an inline code span with visible whitespace."""
    shown = token.replace("`", "ˋ").replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    return f"`{shown or '∅'}`"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.0%}" if abs(x) >= 0.095 or x == 0 else f"{x:.1%}"


def _num(x: float) -> str:
    """Three decimals, or three significant digits for small values."""
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.2g}"


def _check_position(trace: Trace, position: int) -> int:
    T = trace.num_tokens
    if isinstance(position, bool) or not isinstance(position, int) or not -T <= position < T:
        raise ValueError(f"position must be an integer with {-T} <= position < {T}; got {position!r}")
    return position % T


def _is_capacity(trace: Trace) -> bool:
    return any(lt.capacity for lt in trace.layers)


def _k(lt: LayerTrace) -> int:
    return int(lt.index.shape[1])


# ----------------------------------------------------------------------------- one layer
def explain_load(trace: Trace, layer: int) -> str:
    """The busiest expert's share against its fair share, dead experts, and what a capacity limit
    does (or would do at factor 1.0) to it."""
    lt = trace.layer(layer)
    b = metrics.balance(lt)
    e = b.busiest_expert
    routed_e = int(b.routed[e])
    ratio = routed_e / b.fair_share if b.fair_share else 0.0
    text = (
        f"Expert {e} took {_pct(b.max_share)} of assignments in layer {layer} ({routed_e} of {b.assignments}), "
        f"{ratio:.1f}× its fair share of {b.fair_share:.1f} (= {b.assignments} assignments / {b.num_experts} experts)"
    )
    if b.capacity:
        dropped_e = routed_e - int(b.load[e])
        text += (
            f"; with capacity {max(b.capacity)} per expert it dropped {dropped_e} of its {routed_e}, "
            f"and the layer dropped {b.dropped} of {b.assignments} ({_pct(b.drop_rate)})."
        )
    elif _k(lt) < lt.num_experts:
        check = metrics.capacity_check(lt, COUNTERFACTUAL_FACTOR)
        native_e = int(check.load[e])
        basis = "" if _k(lt) == lt.top_k else f" on the model's own top-{lt.top_k} routing"
        text += (
            f"; at capacity factor {COUNTERFACTUAL_FACTOR:.1f}{basis} (C = {check.capacity} per expert) it would drop "
            f"{int(check.overflow[e])} of {native_e}, and the layer {check.dropped} of {int(check.load.sum())}."
        )
    else:
        text += "; in ensemble mode every expert processes every token, so the load is perfectly even."
    dead = round(b.dead_fraction * b.num_experts)
    if dead:
        text += f" {dead} of {b.num_experts} experts got no token at all."
    return text


def explain_heatmap(trace: Trace, layer: int) -> str:
    """What the token x expert heatmap shows: router confidence and fragile decisions."""
    lt = trace.layer(layer)
    T, E = lt.num_tokens, lt.num_experts
    h = metrics.router_entropy(lt)  # (T,)
    margin = metrics.topk_margin(lt)  # (T,)
    top = lt.router_probs.float().max(dim=-1)  # (T,)
    t_conf = int(top.values.argmax())
    fragile = int((margin < LOW_MARGIN).sum())
    size = figures_token_bins(T)
    if size > 1:  # the heatmap groups long prompts into bins and marks no individual choices
        opening = (
            f"Each column is a group of {size} consecutive tokens ({T} tokens in all), each row one of the {E} "
            "experts; brighter means a higher mean router probability (at this zoom single choices are not marked). "
        )
    else:
        opening = (
            f"Each column is one of the {T} tokens, each row one of the {E} experts; brighter means a higher router "
            + (f"probability, and dots mark the {_k(lt)} experts each token is sent to. " if _k(lt) < E
               else "probability; in ensemble mode every expert is used, so nothing is marked. ")
        )
    text = (
        opening
        + f"The mean router entropy is {float(h.mean()):.2f} of its maximum (1 = undecided, 0 = certain). "
        f"The most confident token is {_tok(trace.tokens[t_conf])} (position {t_conf}), giving "
        f"{float(top.values[t_conf]):.2f} to expert {int(top.indices[t_conf])}. "
        f"{fragile} of {T} tokens have a top-{lt.top_k} margin below {LOW_MARGIN} — a small change to the "
        f"router would swap one of their experts."
    )
    if lt.dropped_count:
        text += f" Crosses mark the {lt.dropped_count} assignments dropped because their expert was full."
    return text


def explain_token_text(trace: Trace, layer: int) -> str:
    """What the coloured text shows: top-1 experts and how often consecutive tokens share one."""
    lt = trace.layer(layer)
    r = metrics.reuse(lt)
    sets = metrics.membership(lt, "routed")
    first = lt.router_probs.float().masked_fill(~sets, -1.0).argmax(dim=-1)  # (T,)
    counts = first.bincount(minlength=lt.num_experts)
    e = int(counts.argmax())
    text = (
        f"Each token is coloured by its first-choice expert in layer {layer}. Expert {e} is the most common "
        f"first choice ({int(counts[e])} of {lt.num_tokens} tokens)."
    )
    if r.pairs:
        text += (
            f" Neighbouring tokens keep the same first choice {_pct(r.first_choice_same)} of the time; "
            f"random routing would give {_pct(r.first_choice_baseline)}."
        )
    return text + " Hover a token to see its full router distribution."


def explain_router_distribution(trace: Trace, layer: int, position: int) -> str:
    """One token's routing: the chosen experts, the probability they carry, and the margin."""
    lt = trace.layer(layer)
    t = _check_position(trace, position)
    E = lt.num_experts
    p = lt.router_probs[t].float()  # (E,)
    order = p.argsort(descending=True).tolist()
    k = lt.top_k
    chosen = order[:k]
    mass = float(p[chosen].sum()) / max(float(p.sum()), 1e-12)
    margin = float(metrics.topk_margin(lt)[t])
    parts = ", ".join(f"expert {e} ({float(p[e]):.2f})" for e in chosen)
    text = (
        f"Token {_tok(trace.tokens[t])} (position {t}) in layer {layer}: its top-{k} experts are {parts}, "
        f"carrying {_pct(mass)} of the router probability."
    )
    if k < E:
        rejected = order[k]
        text += (
            f" The first rejected expert is {rejected} ({float(p[rejected]):.2f}), a margin of {margin:.2f}"
            + (" — a fragile choice." if margin < LOW_MARGIN else ".")
        )
    n_dropped = int(lt.dropped[t].sum())
    if n_dropped:
        lost = lt.index[t][lt.dropped[t]].tolist()
        whole = n_dropped == _k(lt)
        text += (
            f" Capacity dropped {n_dropped} of its {_k(lt)} assignments (expert {', '.join(map(str, lost))})"
            + ("; it passes through on the residual path only." if whole else "; the kept weights are not renormalised.")
        )
    return text


def explain_predictions(trace: Trace, position: int = -1) -> str:
    """The next-token prediction at ``position``: the favourite, its probability, the entropy and
    (when known) the probability of the actual next token."""
    t = _check_position(trace, position)
    preds = trace.predictions(t, 3)
    (tok, p), rest = preds[0], preds[1:]
    text = f"After {_tok(trace.tokens[t])} (position {t}) the model predicts {_tok(tok)} with {_pct(p)}"
    if rest:
        text += ", then " + ", ".join(f"{_tok(s)} {_pct(q)}" for s, q in rest)
    text += f"; the prediction entropy is {float(trace.output.entropy[t]):.2f} nats."
    target = float(trace.output.target_logprob[t])
    if not math.isnan(target) and t + 1 < trace.num_tokens:
        text += f" The actual next token {_tok(trace.tokens[t + 1])} got {_pct(math.exp(target))}."
    return text


def explain_coactivation(trace: Trace, layer: int) -> str:
    """The strongest expert pair against the independence baseline."""
    lt = trace.layer(layer)
    co = metrics.coactivation(lt)
    if co.top_pair is None or co.k < 2:
        return f"With {co.k} expert per token in layer {layer} there are no pairs of experts to co-activate."
    a, b, v = co.top_pair
    n_a = int(co.counts[a, a])
    lift = v / co.baseline if co.baseline else float("nan")
    return (
        f"Row a, column b: of the tokens sent to expert a, the share also sent to b. In layer {layer}, when expert "
        f"{a} is chosen, expert {b} is chosen too {_pct(v)} of the time ({int(co.counts[a, b])} of {n_a} tokens), "
        f"{lift:.1f}× the {_pct(co.baseline)} expected if the {co.k} experts were picked independently "
        f"((k−1)/(E−1) = {co.k - 1}/{lt.num_experts - 1})."
    )


def explain_reuse(trace: Trace, layer: int) -> str:
    """Consecutive-token reuse against the random-routing baselines (Mixtral Table 5)."""
    lt = trace.layer(layer)
    r = metrics.reuse(lt)
    if not r.pairs:
        return "Reuse needs at least two tokens."
    return (
        f"In layer {layer}, consecutive tokens keep the same first-choice expert {_pct(r.first_choice_same)} of the "
        f"time (random: {_pct(r.first_choice_baseline)}), share at least one of their {r.k} experts "
        f"{_pct(r.sets_intersect)} of the time (random: {_pct(r.intersect_baseline)}) and share "
        f"{r.mean_overlap:.2f} experts on average (random: {r.overlap_baseline:.2f}), over {r.pairs} pairs."
    )


# ----------------------------------------------------------------------------- whole trace
def explain_balance_table(trace: Trace) -> str:
    """The most imbalanced layer, the aux loss against its optimum, z-loss and drops."""
    if not trace.layers:
        return "This trace has no MoE layers."
    table = metrics.balance_table(trace)
    rows, all_row = table.iloc[:-1], table.iloc[-1]
    worst = rows.loc[rows["cv"].idxmax()]
    best = rows.loc[rows["cv"].idxmin()]
    k = trace.layers[0].top_k
    text = (
        f"Load CV ranges from {best['cv']:.2f} (layer {best['layer']}) to {worst['cv']:.2f} (layer {worst['layer']}); "
        f"0 would be perfectly balanced. In layer {worst['layer']} the busiest expert gets {worst['max_vio'] + 1:.1f}× "
        f"the mean load (MaxVio {worst['max_vio']:.2f}) and routing behaves like {worst['effective_experts']:.1f} "
        f"equally used experts out of {trace.layer(worst['layer']).num_experts}. The load-balancing loss over all "
        f"layers is {all_row['aux_loss_hf']:.3f} in the transformers convention (optimum {k}), "
        f"{all_row['aux_loss_norm']:.3f} normalised (optimum 1); the mean router z-loss is {all_row['z_loss']:.2f}."
    )
    dropped = int(all_row["dropped"])
    if _is_capacity(trace) or dropped:
        text += (
            f" {dropped} of {int(all_row['assignments'])} assignments were dropped ({_pct(float(all_row['drop_rate']))})."
        )
    return text


def explain_capacity(trace: Trace) -> str:
    """What the capacity limit did (capacity runs) or would do at factor 1.0 (dropless runs)."""
    if not trace.layers:
        return "This trace has no MoE layers."
    if _is_capacity(trace):
        stats = [metrics.balance(lt) for lt in trace.layers]
        lt0 = trace.layers[0]
        cap = max(lt0.capacity or [0])
        k = _k(lt0)
        dropped = sum(b.dropped for b in stats)
        total = sum(b.assignments for b in stats)
        full = sum(b.fully_dropped_tokens for b in stats)
        part = sum(b.partially_dropped_tokens for b in stats)
        worst = max(stats, key=lambda b: b.dropped)
        text = (
            f"Under `{trace.policy}` each expert takes at most C = ⌈factor × T × k / E⌉ = {cap} assignments per layer "
            f"(T = {lt0.num_tokens}, k = {k}, E = {lt0.num_experts}). {dropped} of {total} assignments were dropped "
            f"over all layers ({_pct(dropped / total if total else 0.0)}), most in layer {worst.layer} ({worst.dropped}). "
            f"{full} token-layers lost every expert and pass through on the residual path only; {part} lost some "
            f"(kept weights are not renormalised)."
        )
        if any(s > 0 for s in trace.step):
            text += " During generation capacity is recomputed over all tokens so far at every step."
        return text
    checks = [(lt.layer, metrics.capacity_check(lt, COUNTERFACTUAL_FACTOR)) for lt in trace.layers if _k(lt) < lt.num_experts]
    if not checks:
        return "In ensemble mode every expert processes every token: there is no capacity limit and nothing is dropped."
    layer, worst = max(checks, key=lambda c: c[1].dropped)
    return (
        f"This run is dropless: every token reaches its experts. With a capacity factor of "
        f"{COUNTERFACTUAL_FACTOR:.1f} (C = {worst.capacity} per expert) layer {layer} would drop {worst.dropped} of "
        f"{int(worst.load.sum())} assignments ({_pct(worst.drop_rate)}), counted on this run's routing."
    )


def explain_mode_effect(reference: Trace, other: Trace) -> str:
    """How much ``other``'s predictions moved away from ``reference``'s."""
    e = metrics.mode_effect(reference, other)
    T = reference.num_tokens
    t = int(e.kl.argmax()) if T else 0
    text = (
        f"Switching from `{reference.policy}` to `{other.policy}` changes the top-1 next-token prediction at "
        f"{len(e.flipped_positions)} of {T} positions ({_pct(e.flip_rate)}). The mean KL divergence is "
        f"{_num(e.mean_kl)} nats, largest after {_tok(reference.tokens[t])} (position {t}, {_num(float(e.kl[t]))})."
    )
    if not math.isnan(e.mean_delta_logprob):
        d = e.mean_delta_logprob
        if d == 0:
            text += " The actual next tokens' log-probabilities do not change."
        else:
            verdict = "less" if d < 0 else "more"
            text += (
                f" On average the actual next token's log-probability changes by {d:+.3g} "
                f"(the text becomes {verdict} likely, ×{math.exp(d):.3g} per token)."
            )
    return text


def run_summary(trace: Trace) -> str:
    """One line that identifies a run: policy, tokens, drops per layer, top next token, fingerprint.

    The load test reads it back from the page to check that every session got its own result.
    """
    dropped = ", ".join(str(lt.dropped_count) for lt in trace.layers)
    top_id = int(trace.output.top_ids[-1, 0])
    return (
        f"Run summary: `{trace.policy}` · {trace.num_tokens} tokens · dropped per layer {dropped} · "
        f"top next token id {top_id} · routing fingerprint `{trace.fingerprint()}`"
    )
