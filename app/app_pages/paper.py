"""Paper mode: Mixtral's and OLMoE's routing figures, regenerated on your model and corpus.

Uses the session's latest corpus run (from the Corpus page), or runs the demo corpus. The
coloured text (Mixtral Fig. 8) is one document of the corpus, traced under the sidebar's mode.
"""

from __future__ import annotations

import streamlit as st

from app.corpus_state import get_corpus_run, latest_result
from app.resources import RequestRefused, current_prompt, get_trace
from app.ui import require_model, require_policy, show, shows_errors, start_figures
from moe_viz import policy_spec, views
from moe_viz.corpus import demo_corpus_path, open_source

st.title("Paper mode")
ctx = require_model()
model = ctx.model
assert model is not None
require_policy(ctx)
start_figures()
st.caption(
    "The routing figures people cite — Mixtral's coloured text, expert share per domain and reuse table; OLMoE's "
    "co-activation, domain and vocabulary specialisation — recomputed on this model and corpus, each with its "
    "definition and the paper section it follows. Your numbers need not match the papers': that is the point."
)

result = latest_result()
if result is not None and result.aggregates.meta.model_id != model.model_id:
    result = None
if result is None:
    st.info(
        f"No corpus run for this model yet. Run one on the Corpus page, or run the demo corpus here (sidebar mode `{policy_spec(ctx.policy)}`)."
    )
    if st.button("Run the demo corpus", type="primary", key="paper_run_demo"):
        bar = st.progress(0.0, text="Reading the corpus …")
        try:
            result = get_corpus_run(
                model,
                open_source(demo_corpus_path()),
                ctx.policy,
                "the demo corpus",
                lambda p: bar.progress(p.fraction or 0.0, text=f"{p.documents_done}/{p.documents_total} documents"),
            )
        except (ValueError, RequestRefused) as err:
            st.error(str(err))
        bar.empty()
    if result is None:
        st.stop()

report, agg = result.report, result.aggregates
if agg.meta.policy != policy_spec(ctx.policy):
    st.warning(
        f"These figures come from a run under `{agg.meta.policy}`; the sidebar now says `{policy_spec(ctx.policy)}`. "
        "Run the corpus again on the Corpus page to redraw them under the sidebar's mode."
    )
st.success(
    f"Figures from {result.label}: {report.tokens:,} tokens, {report.documents} documents, policy `{agg.meta.policy}`."
)

# The coloured text needs a traced document: one of the corpus (when its files are at hand) or the prompt.
docs = []
if result.source is not None:
    for doc in result.source.documents():
        if len(docs) >= 200:
            break
        docs.append(doc)
names = [f"{d.domain}: {d.name}" for d in docs]
# Mixtral's Fig. 8 shows code and prose: start on the first code (else prose, else any) document.
preferred = next((i for dom in ("code", "prose") for i, d in enumerate(docs) if d.domain == dom), 0)
choice = st.selectbox(
    "Document for the coloured text (Mixtral Fig. 8)",
    ["the prompt"] + names,
    index=1 + preferred if names else 0,
    key="paper_document",
)
text = current_prompt() if choice == "the prompt" else docs[names.index(choice)].text
with shows_errors():
    ids = model.tokenizer(text)["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    ids = ids[0] if ids and isinstance(ids[0], list) else ids
    sample = (
        get_trace(model, model.tokenizer.decode(ids[:256]), ctx.policy)
        if len(ids) > 256
        else get_trace(model, text, ctx.policy)
    )
if len(ids) > 256:
    st.caption("The document's first 256 tokens are shown.")

for view in views.paper_views(report, sample):
    show(view, key=f"paper_{view.name}")
