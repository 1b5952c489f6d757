"""Explore: which experts every token went to, in every layer, under the sidebar's mode."""

from __future__ import annotations

import streamlit as st

from app import first_paint
from app.resources import Keys, current_prompt, display_name, get_noise, get_trace, has_analysis, noise_if_measured
from app.sidebar import page_context
from app.ui import downloads, show, traced_page
from moe_viz import fragility, metrics, views
from moe_viz.views import BIN_THRESHOLD, MANY_EXPERTS, SHOWN_EXPERTS

model, layer, trace = traced_page("Explore routing", "explore")
lt = trace.layer(layer)
all_tokens = (0, trace.num_tokens - 1)  # the token range slider's default


def run_summary() -> tuple[tuple[int, int], list[int]]:
    """The run's numbers, and the heatmap's zoom: its token range and the experts picked."""
    st.markdown(f"Routing: `{trace.policy}` on **{display_name(model.model_id)}** ({trace.device}, {trace.dtype})")
    c = st.columns(5)
    c[0].metric("Tokens", trace.num_tokens)
    c[1].metric(
        f"Capacity C (layer {layer})",
        "—" if not lt.capacity else max(lt.capacity),
        help="Slots per expert in capacity mode: C = ceil(factor × T × k / E). '—' when no capacity applies.",
    )
    c[2].metric(
        f"Dropped (layer {layer})", lt.dropped_count, help="Assignments over an expert's capacity in this layer."
    )
    c[3].metric("Dropped (all layers)", sum(item.dropped_count for item in trace.layers))
    c[4].metric("Forward", f"{trace.timings_ms.get('forward_ms', float('nan')):.0f} ms")
    st.caption(views.run_summary(trace))
    if trace.held_native_layers:
        st.warning(
            f"Layers {', '.join(map(str, trace.held_native_layers))} keep their native routing: their routers cannot "
            f"run `{trace.policy}` (hash-routed, or maths moe-viz could not verify; `moe-viz inspect` says why per "
            "router)."
        )
    token_range = all_tokens
    if trace.num_tokens > BIN_THRESHOLD:  # a long prompt: zoom the heatmap and the text into a range of tokens
        token_range = st.slider(
            "Tokens shown in the heatmap and the text",
            0,
            trace.num_tokens - 1,
            all_tokens,
            key="explore_token_range",
            help=f"Above {BIN_THRESHOLD} tokens the heatmap groups tokens into bins; a narrower range shows each "
            "token.",
        )
    picked: list[int] = []
    if lt.num_experts > MANY_EXPERTS:  # many experts: the heatmap shows the busiest unless the user picks some
        picked = st.multiselect(
            f"Experts on the heatmap (default: the {SHOWN_EXPERTS} busiest of layer {layer}, the rest in one row)",
            list(range(lt.num_experts)),
            key="explore_experts",
            format_func=lambda e: f"e{e}",
        )
    return token_range, picked


# One block, left empty by the run that sends the first chart alone (its widgets' defaults then),
# as high as the run summary on a wide screen: 160 px, and 80 more for the experts picker.
reserve_px = 160 + (80 if lt.num_experts > MANY_EXPERTS else 0)
with first_paint.block("run_summary", reserve_px=reserve_px):
    token_range, picked = (all_tokens, []) if first_paint.staged() else run_summary()
tokens = (token_range[0], token_range[1] + 1) if trace.num_tokens > BIN_THRESHOLD else None
experts = picked or None
# One view at a time: the heatmap reaches the browser before the rest are computed (first paint).
page_views = views.iter_explore_views(trace, layer, experts, tokens)
show(next(page_views))  # the token x expert heatmap
if first_paint.staged():
    first_paint.finish_first_chart()  # the rest once the browser has drawn it
show(next(page_views))  # the coloured text


@st.fragment
def token_close_up() -> None:
    """Picking a token reruns only this section, not the page."""
    st.subheader("One token up close")
    T = trace.num_tokens
    if st.session_state.get(Keys.POSITION) not in range(T):
        st.session_state[Keys.POSITION] = T - 1
    position = st.selectbox(
        "Token",
        list(range(T)),
        key=Keys.POSITION,
        format_func=lambda i: f"{i}: {trace.tokens[i]!r}",
    )
    noise = noise_if_measured(model, current_prompt())
    for view in views.token_views(trace, layer, position, noise):
        show(view, key=f"explore_{view.name}", heading=False)


token_close_up()


@st.fragment
def routing_fragility() -> None:
    """Margins, noise and prompt edits: how easily the routing would change."""
    st.subheader("Routing fragility")
    reason = fragility.margin_reason(trace.layer(layer))
    if reason is None:
        show(views.margin_ranking(trace, layer), key="explore_margin_ranking", heading=False)
    else:
        st.info(f"No top-k margin ranking for this layer: {reason}.")
    prompt = current_prompt()
    if st.button("Measure routing under router-input noise (1%, 5%, 10%)", key="explore_noise") or has_analysis(
        "noise", model, prompt, ()
    ):
        try:
            with st.spinner("Perturbing every router's input …"):
                noise = get_noise(model, prompt)
        except ValueError as err:
            st.error(str(err))
        else:
            show(views.noise_sensitivity(noise), key="explore_noise_view", heading=False)
    if not st.session_state.get("explore_edited_prompt"):
        st.session_state["explore_edited_prompt"] = prompt
    with st.form("edit_diff_form"):
        edited_text = st.text_area(
            "Edited prompt: change a word and see which tokens' routing moves", key="explore_edited_prompt", height=80
        )
        compare_edit = st.form_submit_button("Compare routing with the edit")
    if compare_edit or edited_text != prompt:
        try:
            edited = get_trace(model, edited_text, trace_policy)
            show(views.edit_diff(fragility.edit_diff(trace, edited, layer)), key="explore_edit_diff", heading=False)
        except ValueError as err:
            st.error(f"Edited prompt: {err}")


trace_policy = page_context().policy  # the edited prompt runs under the same policy
routing_fragility()
show(next(page_views), key="explore_layer_load")  # the layer x expert load; paths are drawn by their fragment


@st.fragment
def expert_paths() -> None:
    """Paths for all tokens, one token, or tokens matching a pattern."""
    st.subheader("Expert paths across layers")
    scope = st.radio(
        "Tokens",
        ["all tokens", "tokens matching a pattern", "the token picked above"],
        horizontal=True,
        key="explore_paths_scope",
    )
    positions = None
    if scope == "tokens matching a pattern":
        pattern = st.text_input(
            "Pattern (a regular expression, matched anywhere in the token text)", value=r"^\s", key="explore_pattern"
        )
        try:
            positions = metrics.positions_matching(trace, pattern)
        except ValueError as err:
            st.error(str(err))
            return
        if not positions:
            st.warning(f"No token matches {pattern!r}; showing all tokens.")
            positions = None
    elif scope == "the token picked above":
        positions = [int(st.session_state.get(Keys.POSITION, trace.num_tokens - 1))]
    show(views.expert_paths(trace, positions=positions), key="explore_paths", heading=False)
    if positions is None or len(positions) > 1:
        show(views.paths_table(trace, positions=positions), key="explore_paths_table", heading=False)


expert_paths()

downloads(trace, "explore")
