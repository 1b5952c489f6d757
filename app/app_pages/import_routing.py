"""Import: routing recorded by vLLM, SGLang, Megatron-LM or llama.cpp, shown with every view that
expert ids allow, and compared with moe-viz's own recomputation on the sidebar's model.

Reading a file, checking it and turning it into traces or counts is ``moe_viz.engines``; this
page only takes the file and lays the views out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from app.resources import RequestRefused, config, display_name, get_recomputed
from app.sidebar import page_context
from app.ui import downloads, show, start_figures
from moe_viz import agreement, engines, views
from moe_viz.corpus.report import corpus_report

IMPORTED = "imported_routing"  # session: (label, engines.Imported)
AGREEMENT = "import_agreement"  # session: ((label, sequence, model), recomputed trace, Agreement)

st.title("Import an engine's routing")
ctx = page_context()
model = ctx.model
cfg = config()
start_figures()
st.caption(
    "vLLM, SGLang, Megatron-LM and llama.cpp can record which experts every token took while they serve or train "
    "a model too big for this page. Import that record to see it here: engines keep expert ids, not router scores "
    "or predictions, so the views that need those say so. With the token ids and the same model loaded in the "
    "sidebar, moe-viz recomputes the routing and shows where the engine's kernels and precision disagree."
)
if not cfg.max_import_upload_mb:
    st.info("Importing is off on this server (MOE_VIZ_MAX_IMPORT_UPLOAD_MB=0). Run `moe-viz import` locally instead.")
    st.stop()

formats = engines.formats()
name = st.selectbox("Format", list(formats), format_func=lambda n: formats[n].label, key="import_format")
fmt = formats[name]
with st.form("import_form"):
    uploads = st.file_uploader(
        f"The file ({', '.join(fmt.suffixes)})"
        + ("; several files for per-rank dumps" if fmt.per_rank_files else "")
        + f"; at most {cfg.max_import_upload_mb} MiB",
        type=[s.lstrip(".") for s in fmt.suffixes],
        accept_multiple_files=True,
        key=f"import_upload_{name}",
        max_upload_size=cfg.max_import_upload_mb,
    )
    path_text = ""
    if not cfg.hosted:
        path_text = st.text_input("…or a file or folder on this machine", key="import_path")
    ids_text = ""
    if fmt.takes_token_ids:
        ids_text = st.text_area(
            "Token ids the routing belongs to (optional: the request's prompt and output ids, space or comma "
            "separated)",
            key="import_token_ids",
            height=68,
        )
    else:
        st.caption("This format carries its own token ids.")
    use_model = st.checkbox(
        f"Read layers, experts and token text from the sidebar's model ({display_name(model.model_id)})"
        if model is not None
        else "No model is loaded in the sidebar: layers and experts are read from the file",
        value=model is not None,
        disabled=model is None,
        key="import_use_model",
    )
    submitted = st.form_submit_button("Import", type="primary")


def _import(folder: Path) -> tuple[str, engines.Imported]:
    """Read the uploads (written into ``folder``: readers take paths, a folder holds per-rank
    files) or the typed path. Readers read everything at once, so the files can go afterwards."""
    if uploads:
        for upload in uploads:
            (folder / Path(upload.name).name).write_bytes(upload.getvalue())
        files = sorted(folder.iterdir())
        path, label = (files[0] if len(files) == 1 else folder), ", ".join(u.name for u in uploads)
    elif path_text.strip():
        path, label = Path(path_text.strip()).expanduser(), path_text.strip()
    else:
        raise ValueError("choose a file to upload first" + ("" if cfg.hosted else ", or type a path"))
    shape = engines.ModelShape.of(model) if use_model and model is not None else None
    with st.spinner("Reading and checking the file …"):
        return label, engines.import_routing(name, path, shape, engines.parse_token_ids(ids_text) or None)


if submitted:
    try:
        with tempfile.TemporaryDirectory(prefix="moe-viz-import-") as tmp:  # uploads never outlive the import
            st.session_state[IMPORTED] = _import(Path(tmp))
        st.session_state.pop(AGREEMENT, None)  # a new import: the old comparison no longer applies
    except (ValueError, OSError) as err:  # OSError: an unreadable path (permissions, a device)
        st.error(str(err))
        st.stop()

if IMPORTED not in st.session_state:
    st.info("Choose the format, add the file and press **Import**.")
    st.stop()

label, imported = st.session_state[IMPORTED]
held = []
if imported.traces:
    held.append(f"{len(imported.traces)} sequence{'s' * (len(imported.traces) != 1)} of per-token routing")
if imported.counts is not None:
    held.append(f"expert counts over {imported.counts.chunks_done:,} recorded steps")
st.success(f"{label}: {' and '.join(held)} ({formats[imported.format].label}).")
for note in imported.notes:
    st.caption(note)

if imported.traces:
    labels = [lab for lab, _ in imported.traces]
    index = 0
    if len(labels) > 1:
        index = st.selectbox("Sequence", range(len(labels)), format_func=lambda i: labels[i], key="import_sequence")
    trace = imported.trace(index)
    layers = trace.layer_ids
    default = ctx.layer if ctx.layer in layers else layers[0]
    layer = st.selectbox("MoE layer", layers, index=layers.index(default), key="import_layer")
    st.caption(f"Source: {trace.source}")
    st.caption(views.run_summary(trace))
    for reason in views.unavailable(trace):
        st.info(f"Not shown: {reason}.")
    for view in views.import_views(trace, layer):
        show(view, key=f"import_{view.name}")

    st.subheader("Agreement with moe-viz's own routing")
    if model is None:
        st.info("Load the same model in the sidebar to recompute this routing and compare.")
    else:
        st.markdown(
            f"Runs **{display_name(model.model_id)}** natively on the same token ids and compares, layer by layer, "
            "the experts it picks with the engine's. Identical routing scores 100%; kernels, batching and "
            "precision make engines drift, most often on tokens whose top-k scores nearly tie."
        )
        compared = (label, index, model.model_id)  # the agreement stays while other widgets change
        if st.button("Recompute and compare", key="import_recompute"):
            try:
                with st.spinner("Running the model on the imported tokens …"):
                    mine = get_recomputed(model, trace)
                    ag = agreement.agreement(trace, mine, a_name=formats[imported.format].engine, b_name="moe-viz")
                st.session_state[AGREEMENT] = (compared, mine, ag)
            except (ValueError, RequestRefused) as err:
                st.error(str(err))
        kept = st.session_state.get(AGREEMENT)
        if kept is not None and kept[0] == compared:
            _, mine, ag = kept
            show(views.agreement_by_layer(ag), key="import_agreement_layers")
            show(views.agreement_tokens(ag, trace, mine, layer), key="import_agreement_tokens")
    downloads(trace, "import")

if imported.counts is not None:
    st.subheader("Expert counts")
    agg = imported.counts
    report = corpus_report(agg)
    layers = list(agg.meta.layers)
    default = ctx.layer if ctx.layer in layers else layers[0]
    layer = st.selectbox("MoE layer (counts)", layers, index=layers.index(default), key="import_count_layer")
    st.caption(f"Source: {agg.meta.source}")
    for view in views.count_views(report, agg, layer):
        show(view, key=f"import_{view.name}")
