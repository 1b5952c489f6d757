"""Explore: which experts every token went to, in every layer, under the sidebar's mode."""

from __future__ import annotations

import streamlit as st

from moe_viz import explain, figures

from app.resources import Keys, display_name
from app.ui import chart, downloads, traced_page

model, layer, trace = traced_page("Explore routing", "explore")
lt = trace.layer(layer)

st.markdown(f"Routing: `{trace.policy}` on **{display_name(model.model_id)}** ({trace.device}, {trace.dtype})")
c = st.columns(5)
c[0].metric("Tokens", trace.num_tokens)
c[1].metric(
    f"Capacity C (layer {layer})",
    "—" if not lt.capacity else max(lt.capacity),
    help="Slots per expert in capacity mode: C = ceil(factor × T × k / E). '—' when no capacity applies.",
)
c[2].metric(f"Dropped (layer {layer})", lt.dropped_count, help="Assignments over an expert's capacity in this layer.")
c[3].metric("Dropped (all layers)", sum(item.dropped_count for item in trace.layers))
c[4].metric("Forward", f"{trace.timings_ms.get('forward_ms', float('nan')):.0f} ms")
st.caption(explain.run_summary(trace))

st.subheader(f"Token × expert routing, layer {layer}")
chart(figures.token_expert_heatmap(trace, layer), explain.explain_heatmap(trace, layer), "explore_heatmap", "Token × expert heatmap")

st.subheader(f"The text, coloured by each token's first-choice expert (layer {layer})")
left, right = st.columns([3, 2], vertical_alignment="center")
with left:
    with st.container(height=320 if trace.num_tokens > 200 else "content", border=False):  # long prompts scroll
        st.html(figures.token_text_html(trace, layer))
with right:
    st.markdown(explain.explain_token_text(trace, layer))


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
    chart(
        figures.router_distribution(trace, layer, position),
        explain.explain_router_distribution(trace, layer, position),
        "explore_router_distribution",
        "Router distribution of the selected token",
    )
    chart(
        figures.predictions_bar(trace, position),
        explain.explain_predictions(trace, position),
        "explore_predictions",
        "Next-token predictions after the selected token",
    )


token_close_up()

st.subheader("Load across layers")
chart(figures.layer_load_heatmap(trace), explain.explain_load(trace, layer), "explore_layer_load", "Layer × expert load")

downloads(trace, "explore")
