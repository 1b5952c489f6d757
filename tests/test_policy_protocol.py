"""A policy written outside the package plugs into the engine, the limits, the views and the
app's Compare page through the documented protocol alone (no edit of moe_viz)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from tiny_models import build

import moe_viz
from moe_viz import Limits, Policy, RouterCall, RoutingDecision, TopK, register_policy, run_prompt, views
from moe_viz.policies import top_k_routing

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class AvoidExpert(Policy):
    """Top-k at the model's own k with one expert never chosen (its logit masked before selection)."""

    expert: int

    @property
    def spec(self) -> str:
        return f"avoid:{self.expert}"

    def validate(self, router: moe_viz.RouterSpec) -> None:
        super().validate(router)
        if not 0 <= self.expert < router.num_experts:
            raise ValueError(f"expert must satisfy 0 <= expert < {router.num_experts}; got {self.expert}")

    def decide(self, call: RouterCall) -> RoutingDecision:
        logits = call.logits.float().clone()  # (N, E)
        logits[:, self.expert] = float("-inf")
        index, weights = top_k_routing(replace(call, logits=logits), call.router.top_k)
        return RoutingDecision(index, weights, torch.zeros_like(index, dtype=torch.bool))


register_policy("avoid", lambda args: AvoidExpert(int(args[0])))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_a_user_defined_policy_runs_through_the_engine(family):
    model = build(family)
    native = run_prompt(model, "a user policy", None)
    busiest = int(torch.bincount(native.layers[0].index.reshape(-1)).argmax())
    trace = run_prompt(model, "a user policy", AvoidExpert(busiest))
    assert trace.policy == f"avoid:{busiest}"
    for lt in trace.layers:
        assert busiest not in lt.index.tolist()
        assert lt.index.shape[1] == lt.top_k
    assert not torch.equal(trace.output.top_logprobs, native.output.top_logprobs)
    generated = moe_viz.generate(model, "a user policy", AvoidExpert(busiest), max_new_tokens=3)
    assert all(busiest not in lt.index.tolist() for lt in generated.trace.layers)


def test_a_user_defined_policy_is_validated_and_bounded_like_the_built_in_ones():
    model = build("mixtral")
    with pytest.raises(ValueError, match="expert must satisfy 0 <= expert < 8"):
        run_prompt(model, "x", AvoidExpert(9))
    Limits(max_k=1).check_policy(AvoidExpert(0), num_experts=4, top_k=2)  # the model's own k is always allowed
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= 1 on this server"):
        Limits(max_k=1).check_policy(TopK(3), num_experts=4, top_k=2)
    assert moe_viz.parse_policy("avoid:2") == AvoidExpert(2)


def test_a_router_whose_maths_is_not_proven_refuses_a_user_defined_policy():
    from tiny_models import ByteTokenizer, build_family

    model = moe_viz.wrap_model(build_family("minimax_m3_vl_text"), ByteTokenizer(), "partial")
    with pytest.raises(ValueError, match="partial support"):
        run_prompt(model, "x", AvoidExpert(0))


def test_views_show_a_user_defined_policy():
    model = build("olmoe")
    native = run_prompt(model, "views of a user policy")
    trace = run_prompt(model, "views of a user policy", AvoidExpert(1))
    shown = views.explore_views(trace, 0) + views.balance_views(trace, 0) + views.compare_views(native, trace, 0)
    assert all(view.explanation for view in shown)
    assert "avoid:1" in views.routing_heatmap(trace, 0).figure.layout.title.text


@pytest.fixture()
def app(monkeypatch):
    """The app on the default model, run in this process (so the policy registered above is known)."""
    from streamlit.testing.v1 import AppTest

    model_dir = os.environ.get("MOE_VIZ_MODEL") or moe_viz.DEFAULT_MODEL
    if not (Path(model_dir) / "config.json").is_file():
        pytest.skip(f"no model at {model_dir}")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    monkeypatch.setenv("MOE_VIZ_MODEL", model_dir)
    return AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=120)


def test_the_compare_page_runs_a_user_defined_policy_typed_as_text(app):
    at = app
    at.session_state["prompt"] = "def add(a, b):"
    at.run()
    at.switch_page("app_pages/compare.py").run()
    at.text_input(key="compare_policy_0").set_value("avoid:0")
    [button] = [b for b in at.button if b.label == "Compare"]
    button.click().run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("`avoid:0`" in m.value for m in at.markdown)
    assert any("Under `avoid:0`" in m.value for m in at.markdown)


def test_a_link_with_a_user_defined_policy_is_explained_not_crashed(app):
    at = app
    at.query_params["policy"] = "avoid:1"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("no control for the link's policy `avoid:1`" in w.value for w in at.warning)
