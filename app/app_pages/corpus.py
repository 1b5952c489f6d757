"""Corpus: routing statistics over many documents, with confidence intervals.

Runs the sidebar's model and routing mode over a corpus (the shipped demo corpus, an upload, or a
file or folder on this machine) and shows domain and vocabulary specialisation, co-activation,
reuse, coverage, dormant experts and, optionally, causal importance; or opens a run written by
``moe-viz corpus``. Every number comes from ``moe_viz.corpus``.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import streamlit as st

from app.corpus_state import CorpusResult, get_corpus_run, latest_result, open_run, uploaded_source
from app.resources import RequestRefused, config
from app.ui import require_model, require_policy, show, start_figures
from moe_viz import policy_spec, views
from moe_viz.corpus import aggregates, demo_corpus_path, open_source
from moe_viz.views.corpus import ci_text

SOURCES = {
    "demo": "The demo corpus (84 held-out documents, 7 domains)",
    "upload": "Upload a file",
    "path": "A file or folder on this machine",
    "run": "Open a finished run (moe-viz corpus --out DIR)",
}

st.title("Corpus statistics")
ctx = require_model()
model, layer = ctx.model, ctx.layer
assert model is not None and layer is not None
require_policy(ctx)
start_figures()
cfg = config()
st.caption(
    "One prompt is a microscope; a corpus is the slide tray. Run the model over many documents under the sidebar's "
    f"routing mode (`{policy_spec(ctx.policy)}`) and read statistics with confidence intervals: bootstrap resamples "
    "of whole documents. "
    + (
        f"This server runs corpora of at most {cfg.max_corpus_tokens:,} tokens."
        if cfg.max_corpus_tokens
        else "Large corpora are best run from the command line (`moe-viz corpus`), then opened here."
    )
)

choices = ["demo", "upload"] if cfg.hosted else list(SOURCES)
kind = st.radio("Corpus", choices, format_func=SOURCES.get, horizontal=True, key="corpus_source_kind")
with st.form("corpus_form"):
    upload = path_text = None
    text_column, domain_column = "text", ""
    if kind == "upload":
        upload = st.file_uploader(
            f"A .txt, .md, .jsonl, .csv or .parquet file (at most {cfg.max_corpus_upload_mb} MiB)",
            type=["txt", "md", "jsonl", "csv", "parquet"],
            key="corpus_upload",
            max_upload_size=cfg.max_corpus_upload_mb,
        )
    elif kind in ("path", "run"):
        path_text = st.text_input(
            "Folder" if kind == "run" else "File or folder",
            key=f"corpus_path_{kind}",
            placeholder="runs/mine" if kind == "run" else "my_corpus/  (one sub-folder per domain)",
        )
    if kind in ("upload", "path"):
        c1, c2 = st.columns(2)
        text_column = c1.text_input("Text column (tables)", value="text", key="corpus_text_column")
        domain_column = c2.text_input("Domain column (tables, optional)", value="", key="corpus_domain_column")
    if kind != "run":
        c1, c2 = st.columns(2)
        if cfg.hosted:  # E x layers extra forwards per sampled document: not on a shared server
            importance_every = 0
            c1.caption("Causal importance (ablating each expert) is off on this server; run it with `moe-viz corpus`.")
        else:
            importance_every = c1.number_input(
                "Ablate each expert on every N-th document (0 = off; slow: E × layers forwards per document)",
                min_value=0,
                max_value=1000,
                value=0,
                key="corpus_importance_every",
            )
        seed = c2.number_input("Seed (importance sample, bootstrap)", min_value=0, max_value=2**31 - 1, value=0)
    submitted = st.form_submit_button("Open the run" if kind == "run" else "Run the corpus", type="primary")

result: CorpusResult | None = None
if submitted:
    try:
        if kind == "run":
            if cfg.hosted:
                raise ValueError("this server does not open folders")
            with st.spinner("Reading the run and computing its statistics …"):
                result = open_run(path_text or "")
        else:
            if kind == "demo":
                source, label = open_source(demo_corpus_path()), "the demo corpus"
            elif kind == "upload":
                if upload is None:
                    raise ValueError("choose a file to upload first")
                source = uploaded_source(upload.name, upload.getvalue(), text_column, domain_column)
                label = f"upload {upload.name}"
            else:
                if cfg.hosted:
                    raise ValueError("this server does not read local files")
                if not (path_text or "").strip():
                    raise ValueError("type the path of a corpus file or folder first")
                source, label = open_source(path_text.strip(), text_column or "text", domain_column or None), path_text
            bar = st.progress(0.0, text="Reading the corpus …")

            def progress(p) -> None:  # noqa: ANN001 - moe_viz.corpus.Progress
                rate = p.tokens_done / max(p.elapsed_s, 1e-9)
                bar.progress(
                    p.fraction or 0.0,
                    text=f"{p.documents_done}/{p.documents_total} documents, {p.tokens_done:,} tokens ({rate:,.0f} tokens/s)",
                )

            result = get_corpus_run(
                model, source, ctx.policy, label, progress, importance_every=int(importance_every), seed=int(seed)
            )
            bar.empty()
    except (ValueError, RequestRefused) as err:
        st.error(str(err))
        result = None
else:
    result = latest_result()
    if result is not None and result.aggregates.meta.model_id != model.model_id:
        result = None  # a run of another model: its experts are not this model's

if result is None:
    if not submitted:
        st.info("Choose a corpus and press **Run the corpus**. The demo corpus takes about 20 s on two CPU cores.")
    st.stop()

agg, report = result.aggregates, result.report
if agg.meta.policy != policy_spec(ctx.policy) and result.source is not None:
    st.warning(
        f"This run used the policy `{agg.meta.policy}`; the sidebar now says `{policy_spec(ctx.policy)}`. "
        "Press **Run the corpus** to run it under the sidebar's mode."
    )
if layer not in agg.meta.layers:
    st.error(f"This run has MoE layers {list(agg.meta.layers)}; pick one of them in the sidebar.")
    st.stop()
li = agg.layer_index(layer)
st.success(
    f"{result.label}: {report.tokens:,} tokens in {report.documents:,} documents, domains "
    f"{', '.join(report.domain.domains)}; policy `{agg.meta.policy}`, chunks of up to {agg.meta.window} tokens."
)
cols = st.columns(4)
cols[0].metric("Tokens", f"{report.tokens:,}")
cols[1].metric("Documents", f"{report.documents:,}")
mi = report.domain.mi_bits.at(li)
cols[2].metric(
    f"I(domain; expert), layer {layer}", f"{mi[0]:.3f} bits", help=f"{report.level:.0%} CI {mi[1]:.3f}–{mi[2]:.3f}"
)
cols[3].metric(
    "Loss (nats / token)", f"{float(report.loss.overall.value):.3f}", help=ci_text(*report.loss.overall.at())
)

tokenizer = model.tokenizer if agg.meta.model_id == model.model_id else None


def token_text(i: int) -> str:
    return tokenizer.decode([i]) if tokenizer is not None else str(i)


for view in views.corpus_views(report, agg, layer, token_text):
    show(view, key=f"corpus_{view.name}")

st.subheader("Downloads")
d1, d2 = st.columns(2)
d1.download_button(
    "Statistics (report.json)",
    data=lambda: json.dumps(report.to_dict(), indent=1),
    file_name="moe-viz-corpus-report.json",
    mime="application/json",
    on_click="ignore",
    key="corpus_report_json",
)


def _aggregates_zip() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = aggregates.save(agg, Path(tmp) / "aggregates")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.iterdir()):
                zf.write(file, f"aggregates/{file.name}")
        return buffer.getvalue()


d2.download_button(
    "Aggregates (Parquet, zip)",
    data=_aggregates_zip,
    file_name="moe-viz-corpus-aggregates.zip",
    mime="application/zip",
    on_click="ignore",
    key="corpus_aggregates_zip",
)
