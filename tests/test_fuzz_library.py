"""Fuzz the library with hostile prompts and parameters: every outcome is a trace or a clear refusal."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_viz import Capacity, Ensemble, Limits, TopK, generate, run_prompt
from moe_viz.policies import parse_policy
from tiny_models import build

MODEL = build("mixtral")
LIMITS = Limits(max_prompt_tokens=300, max_new_tokens=4, max_k=8, min_capacity_factor=0.05, max_capacity_factor=8)

HOSTILE = st.one_of(
    st.text(max_size=80),  # every unicode category, surrogates excluded by hypothesis
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
    st.sampled_from(["", " ", "\x00", "\x00abc\x00", "\u202eevil\u202c", "שלום עולם", "مرحبا", "👩‍👩‍👧‍👦🔥" * 5,
                     "\r\n\t\x0b\x0c", "<script>alert(1)</script>", "a" * 400, "\ufeff", "e\u0301" * 30]),
)
NUMBERS = st.one_of(st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3))


def _policy(kind: str, a: object, b: object):
    if kind == "top-k":
        return TopK(a)  # type: ignore[arg-type]
    if kind == "capacity":
        return Capacity(a, priority=b if isinstance(b, str) else "position")  # type: ignore[arg-type]
    if kind == "ensemble":
        return Ensemble(b)  # type: ignore[arg-type]
    return None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=HOSTILE, kind=st.sampled_from(["top-k", "capacity", "ensemble", "native"]), a=NUMBERS, b=st.one_of(NUMBERS, st.sampled_from(["gate", "uniform", "probs", "position", "x"])))
def test_any_prompt_and_parameters_give_a_trace_or_a_clear_value_error(prompt, kind, a, b):
    try:
        policy = _policy(kind, a, b)
        LIMITS.check_policy(policy, MODEL.num_experts)
        trace = run_prompt(MODEL, prompt, policy, max_tokens=LIMITS.max_prompt_tokens)
    except ValueError as err:
        message = str(err)
        assert message and "\n" not in message and len(message) < 400
        return
    assert trace.num_tokens == len(prompt.encode("utf-8")) > 0
    assert all(math.isfinite(v) for v in trace.output.entropy.tolist())
    trace.to_json()


@settings(max_examples=25, deadline=None)
@given(prompt=HOSTILE, spec=st.text(max_size=24), new=st.integers(-2, 8))
def test_policy_text_and_generation_lengths_never_crash(prompt, spec, new):
    try:
        policy = parse_policy(spec)
        LIMITS.check_new_tokens(new)
        result = generate(MODEL, prompt, policy, max_new_tokens=new, max_tokens=LIMITS.max_prompt_tokens)
    except ValueError as err:
        assert str(err)
        return
    assert 1 <= len(result.new_token_ids) <= new


@pytest.mark.parametrize("prompt", ["\x00" * 10, "\u202e\u202d" * 20, "🔥" * 70])
def test_control_and_bidi_characters_are_traced_token_by_token(prompt):
    trace = run_prompt(MODEL, prompt, Capacity(1.0))
    assert "".join(trace.tokens).encode("utf-8", "replace")
    assert trace.num_tokens == len(prompt.encode("utf-8"))
