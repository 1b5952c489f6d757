"""AppTest checks of every page: widgets set, modes switched, values cross-checked with the library,
bad input shown as an error element (never an exception).

Runs against the default model in ``assets/`` (or ``MOE_VIZ_MODEL``, e.g. a quick model built with
``scripts/train_default_model.py --quick``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "streamlit_app.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moe_viz import (  # noqa: E402
    DEFAULT_MODEL,
    Capacity,
    TopK,
    load_model,
    parse_policy,
    run_prompt,
    views,  # noqa: E402
)

MODEL = os.environ.get("MOE_VIZ_MODEL") or DEFAULT_MODEL
PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"
TIMEOUT = 120

pytestmark = pytest.mark.skipif(
    not (Path(MODEL) / "config.json").is_file(),
    reason=f"no model at {MODEL}: train the default model (scripts/train_default_model.py) or set MOE_VIZ_MODEL",
)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture()
def app(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MOE_VIZ_MODEL", MODEL)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["prompt"] = PROMPT
    return at


def metric(at, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


def routing_shown(at) -> str:
    found = [m.value for m in at.markdown if m.value.startswith("Routing: `")]
    assert found, "no 'Routing:' line on the page"
    return found[0].split("`")[1]


def no_exception(at) -> None:
    assert not at.exception, [e.message for e in at.exception]


def submit(at, label: str = "Run"):
    [button] = [b for b in at.button if b.label == label]
    return button.click().run()


def load_custom_model(app, name: str):
    """Pick "Hub id or local folder" in the sidebar, type ``name`` and press Load model."""
    at = app.run()
    at.sidebar.radio(key="model_source").set_value("custom")
    at.run()
    at.sidebar.text_input(key="custom_model").input(name)
    submit(at, "Load model")
    no_exception(at)
    return at


# ----------------------------------------------------------------------------- Explore
def test_explore_shows_heatmap_coloured_text_router_distribution_and_predictions(app, model):
    at = app.run()
    no_exception(at)
    assert not at.error
    charts = at.get("plotly_chart")
    assert len(charts) == 5  # heatmap, router distribution, predictions, layer load, expert paths
    assert metric(at, "Tokens") == str(run_prompt(model, PROMPT).num_tokens)
    assert routing_shown(at) == f"top-k:{model.top_k}"
    assert at.sidebar.selectbox(key="layer").options == [f"layer {i}" for i in model.moe_layers]
    assert at.sidebar.slider(key="k").max == model.num_experts
    html = at.get("html")
    assert html and "span" in html[0].proto.body
    buttons = {b.key for b in at.get("download_button")}
    assert {k for k in buttons if k.startswith("dl_")} == {
        f"dl_{kind}_explore" for kind in ("json", "parquet", "csv", "html")
    }
    # every table view carries its own CSV: token fragility, the margin ranking, the path table
    assert {k for k in buttons if k.startswith("csv_")} == {
        "csv_explore_token_fragility",
        "csv_explore_margin_ranking",
        "csv_explore_paths_table",
    }
    assert any(f"{model.device}" in c.value for c in at.sidebar.caption)  # device shown
    # the three short tables are static: a page with no data grid spares the browser its script
    assert not at.dataframe and len([t for t in at.table if "setting" not in t.value.columns]) == 3


def test_capacity_mode_shows_the_dropped_count_the_library_computes(app, model):
    at = app.run()
    at.sidebar.radio(key="mode").set_value("capacity")
    at.run()
    at.sidebar.slider(key="capacity_factor").set_value(0.5)
    at.sidebar.radio(key="capacity_priority").set_value("probs")
    layer = model.moe_layers[-1]
    at.sidebar.selectbox(key="layer").set_value(layer)
    at.run()
    no_exception(at)
    expected = run_prompt(model, PROMPT, Capacity(0.5, priority="probs"))  # k=None: the model's own k
    assert routing_shown(at) == expected.policy
    assert metric(at, f"Dropped (layer {layer})") == str(expected.layer(layer).dropped_count)
    assert metric(at, "Dropped (all layers)") == str(sum(lt.dropped_count for lt in expected.layers))
    assert expected.layer(layer).dropped_count > 0  # factor 0.5 must drop something


def test_each_mode_and_k_change_the_policy_shown(app, model):
    at = app.run()
    at.sidebar.slider(key="k").set_value(1)
    at.run()
    assert routing_shown(at) == "top-k:1"
    at.sidebar.radio(key="mode").set_value("ensemble")
    at.run()
    assert routing_shown(at) == "ensemble:gate"
    at.sidebar.radio(key="ensemble_weighting").set_value("uniform")
    at.run()
    no_exception(at)
    assert routing_shown(at) == "ensemble:uniform"
    assert metric(at, "Dropped (all layers)") == "0"


def router_explanation(at) -> str:
    """The one "Token `...` (position N) in layer L ..." explanation beside the router-distribution chart."""
    found = [m.value for m in at.markdown if re.match(r"Token `[^`]*` \(position \d+\) in layer \d+\b", m.value)]
    assert len(found) == 1, f"expected one router-distribution explanation; got {found}"
    return found[0]


def router_chart_titles(at) -> list[str]:
    """The titles of the router-distribution charts on the page ("Router probabilities of token N ...")."""
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    return [t for t in titles if t.startswith("Router probabilities of token ")]


def test_selecting_a_token_updates_the_router_distribution(app, model):
    at = app.run()
    no_exception(at)
    layer = at.sidebar.selectbox(key="layer").value
    trace = run_prompt(model, PROMPT, parse_policy(routing_shown(at)))  # the trace the page shows
    default = router_explanation(at)
    last = trace.num_tokens - 1  # preselected
    assert re.match(rf"Token `[^`]*` \(position {last}\) in layer {layer}\b", default), default
    shown = {}
    for position in (0, 1):
        at.selectbox(key="position").set_value(position)
        at.run()
        no_exception(at)
        text = router_explanation(at)
        assert text == views.router_distribution(trace, layer, position).explanation
        assert re.match(rf"Token `[^`]*` \(position {position}\) in layer {layer}\b", text), text
        [title] = router_chart_titles(at)
        assert title.startswith(f"Router probabilities of token {position} "), title
        shown[position] = text
    assert len({default, shown[0], shown[1]}) == 3  # each selection changed the explanation


def test_every_page_runs_in_every_mode(app):
    at = app.run()
    for mode in ("top-k", "capacity", "ensemble"):
        at.sidebar.radio(key="mode").set_value(mode)
        for page in ("explore", "load_balance", "compare", "learn"):
            at.switch_page(f"app_pages/{page}.py").run()
            no_exception(at)
            assert not at.error, (mode, page, [e.value for e in at.error])
            assert at.get("plotly_chart"), (mode, page)


def test_a_long_prompt_renders_every_explore_view(app, model):
    long_prompt = PROMPT * 30
    app.session_state["prompt"] = long_prompt
    at = app.run()
    no_exception(at)
    assert not at.error
    assert metric(at, "Tokens") == str(run_prompt(model, long_prompt).num_tokens)
    assert len(at.get("plotly_chart")) == 5


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", ["", "   \n\t "])
def test_empty_prompt_shows_an_error_and_the_session_keeps_working(app, bad):
    at = app.run()
    at.text_area(key="prompt_input_explore").input(bad)
    submit(at)
    no_exception(at)
    assert any("non-empty" in e.value for e in at.error)
    at.text_area(key="prompt_input_explore").input("Hello experts")
    submit(at)
    no_exception(at)
    assert not at.error
    assert len(at.get("plotly_chart")) == 5


def test_every_page_reports_an_empty_prompt_once(app):
    app.session_state["prompt"] = "  "
    at = app.run()
    for page in ("explore", "load_balance", "compare", "learn"):
        at.switch_page(f"app_pages/{page}.py").run()
        no_exception(at)
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and "non-empty" in errors[0], (page, errors)


def test_prompt_over_the_token_limit_shows_an_error(app, monkeypatch):
    monkeypatch.setenv("MOE_VIZ_MAX_PROMPT_TOKENS", "8")
    at = app.run()
    no_exception(at)
    assert any("limit is 8 tokens" in e.value for e in at.error)


@pytest.mark.parametrize(
    "name, message",
    [("/no/such/moe/folder", "does not exist"), ("no-such-org/no-such-moe-model", "could not load model")],
)
def test_bad_model_id_shows_an_error_and_keeps_the_loaded_model(app, name, message):
    at = load_custom_model(app, name)
    assert any(message in e.value for e in at.sidebar.error)
    assert len(at.get("plotly_chart")) == 5  # the page still shows the previous model's trace


def test_dense_model_folder_shows_an_error(app, model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(model.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    at = load_custom_model(app, str(tmp_path))
    assert any("no MoE layers" in e.value for e in at.sidebar.error)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "minimax_m3_vl_text"])
def test_a_local_checkpoint_folder_gets_the_same_views(app, model, tmp_path, model_type):
    """A researcher's folder: qwen2_moe (shared expert, re-routable), minimax_m3_vl_text (partial
    support: its router matches no spec, so only native routing is offered in the sidebar)."""
    import transformers
    from tiny_models import TINY_CONFIGS, build_config, generic_config, router_families

    if model_type in TINY_CONFIGS:
        config = build_config(model_type)
    else:
        config = generic_config(router_families()[model_type])
    config.vocab_size = len(model.tokenizer)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    at = load_custom_model(app, str(tmp_path))
    assert not at.sidebar.error
    assert any(model_type in c.value for c in at.sidebar.caption)
    assert len(at.get("plotly_chart")) == 5
    capture_only = model_type == "minimax_m3_vl_text"
    assert routing_shown(at) == ("native" if capture_only else f"top-k:{config.num_experts_per_tok}")
    at.switch_page("app_pages/learn.py").run()
    no_exception(at)
    assert not at.error
    assert bool(at.info) == capture_only  # re-routing steps are explained, not attempted, when capture-only
    at.sidebar.radio(key="model_source").set_value("default")
    at.switch_page("app_pages/explore.py").run()
    no_exception(at)
    assert routing_shown(at) == f"top-k:{model.top_k}"  # back on the default model, with its own k


def test_custom_models_can_be_switched_off(app, monkeypatch):
    monkeypatch.setenv("MOE_VIZ_ALLOW_CUSTOM_MODELS", "0")
    at = app.run()
    no_exception(at)
    assert not [r for r in at.sidebar.radio if r.key == "model_source"]


# ----------------------------------------------------------------------------- other pages
def test_load_balance_page_shows_metrics_tables_and_charts(app, model):
    at = app.run()
    at.sidebar.radio(key="mode").set_value("capacity")
    at.run()
    at.switch_page("app_pages/load_balance.py").run()
    no_exception(at)
    assert not at.error
    layer = model.moe_layers[0]
    expected = run_prompt(model, PROMPT, Capacity(1.0, k=model.top_k)).layer(layer)
    assert metric(at, "Dropped").startswith(f"{expected.dropped_count} (")
    labels = {m.label for m in at.metric}
    assert {"CV", "MaxVio", "Gini", "Aux loss (HF)", "Aux loss (normalised)", "Router z-loss"} <= labels
    assert len(at.get("plotly_chart")) == 4  # load bars, layer load, router confidence, co-activation
    assert any("Imbalance metrics use the load each expert processed" in c.value for c in at.caption)
    balance = next(d.value for d in at.dataframe if "max_vio" in d.value.columns)  # wide: the grid
    assert len(balance) == len(model.moe_layers) + 1  # + the "all" row


def test_each_page_shows_every_view_of_its_list_with_that_views_explanation(app, model):
    from moe_viz import views

    at = app.run()
    at.sidebar.radio(key="mode").set_value("capacity")
    at.run()
    layer = model.moe_layers[0]
    trace = run_prompt(model, PROMPT, Capacity(1.0))  # the sidebar's capacity mode at the model's own k
    expected = {
        "explore": views.explore_views(trace, layer) + views.token_views(trace, layer, trace.num_tokens - 1),
        "load_balance": views.balance_views(trace, layer),
    }
    for page, page_views in expected.items():
        at.switch_page(f"app_pages/{page}.py").run()
        no_exception(at)
        shown = [m.value for m in at.markdown]
        for view in page_views:
            assert view.explanation in shown, (page, view.name)


def test_compare_page_shows_each_policy_and_its_dropped_tokens(app, model):
    at = app.run()
    at.switch_page("app_pages/compare.py").run()
    no_exception(at)
    assert not at.error
    expected = run_prompt(model, PROMPT, Capacity(1.0))
    dropped = [m.value for m in at.metric if m.label == "Dropped assignments (all layers)"]
    assert dropped == ["0", str(sum(lt.dropped_count for lt in expected.layers)), "0"]
    assert len(at.get("plotly_chart")) == 6  # routing diff + mode effect for 3 policies


def test_compare_page_reports_a_bad_policy_and_keeps_the_others(app, model):
    at = app.run()
    at.switch_page("app_pages/compare.py").run()
    at.text_input(key="compare_policy_1").input(f"top-k:{model.num_experts + 1}")
    at.text_input(key="compare_policy_2").input("capacity:-1")
    submit(at, "Compare")
    no_exception(at)
    errors = " ".join(e.value for e in at.error)
    assert "k must satisfy" in errors and "factor must be" in errors
    assert len([m for m in at.metric if m.label == "Dropped assignments (all layers)"]) == 1


def test_compare_page_generates_text_under_each_policy(app, model):
    from moe_viz import generate

    at = app.run()
    at.switch_page("app_pages/compare.py").run()
    at.text_input(key="compare_policy_2").input("")
    submit(at, "Compare")
    at.slider(key="compare_new_tokens").set_value(4)
    submit(at, "Generate under each policy")
    no_exception(at)
    assert len(at.code) == 3  # native + two policies
    expected = generate(model, PROMPT, TopK(model.top_k), max_new_tokens=4).text
    assert at.code[1].value == PROMPT + expected


def test_learn_page_walks_through_router_topk_capacity_and_ensemble(app, model):
    at = app.run()
    at.switch_page("app_pages/learn.py").run()
    no_exception(at)
    assert not at.error
    assert at.get("latex")
    assert len(at.get("plotly_chart")) == 4
    at.slider(key="learn_factor").set_value(0.5).run()
    no_exception(at)
    layer = model.moe_layers[0]
    dropped = run_prompt(model, PROMPT, Capacity(0.5)).layer(layer).dropped_count
    assert any(
        f"experts of layer {layer} overflow: **{dropped}** assignments are dropped" in m.value for m in at.markdown
    )


# ----------------------------------------------------------------------------- downloads, config, design rules
def test_trace_and_figure_downloads_are_complete_and_offline(model):
    import plotly.graph_objects as go

    from app.ui import _csv_zip, _parquet_bytes, figures_html
    from moe_viz import trace_io

    trace = run_prompt(model, PROMPT, Capacity(1.0))
    names = zipfile.ZipFile(BytesIO(_csv_zip(trace))).namelist()
    assert sorted(names) == ["predictions.csv", "probs.csv", "routing.csv", "tokens.csv"]
    assert _parquet_bytes(trace)[:4] == b"PAR1"
    assert trace_io.from_json_text(trace_io.to_json_text(trace)).token_ids == trace.token_ids
    page = figures_html({"a": go.Figure(go.Bar(y=[1])), "b": go.Figure(go.Bar(y=[2]))}, "t")
    assert page.count("<section>") == 2
    assert "<script src=" not in page.replace('<script src="data:', "")  # no script fetched from a CDN
    assert len(page) > 1_000_000  # plotly.js embedded once: opens offline


def test_config_reads_limits_from_the_environment(monkeypatch):
    from app.config import load_config

    monkeypatch.setenv("MOE_VIZ_MAX_NEW_TOKENS", "5")
    monkeypatch.setenv("MOE_VIZ_ALLOW_CUSTOM_MODELS", "no")
    cfg = load_config()
    assert cfg.max_new_tokens == 5 and cfg.allow_custom_models is False
    monkeypatch.setenv("MOE_VIZ_MAX_NEW_TOKENS", "lots")
    with pytest.raises(ValueError, match="MOE_VIZ_MAX_NEW_TOKENS"):
        load_config()


def test_app_holds_no_model_maths():
    pattern = re.compile(r"torch\.(topk|softmax)|F\.softmax|\.topk\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "app").rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders


def test_moe_viz_does_not_import_streamlit():
    code = "import sys, moe_viz, moe_viz.views, moe_viz.metrics; print('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
