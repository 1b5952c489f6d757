"""Fuzz the library with hostile prompts and parameters: every outcome is a trace or a clear refusal."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hostile_inputs import HOSTILE
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from tiny_models import build

from moe_viz import Capacity, Ensemble, Limits, TopK, generate, run_prompt, trace_io
from moe_viz.policies import parse_policy

MODEL = build("mixtral")
LIMITS = Limits(max_prompt_tokens=300, max_new_tokens=4, max_k=8, min_capacity_factor=0.05, max_capacity_factor=8)

NUMBERS = st.one_of(st.integers(-3, 12), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3))


def _policy(kind: str, a: object, b: object):
    if kind == "top-k":
        return TopK(a)  # type: ignore[arg-type]
    if kind == "capacity":
        return Capacity(a, priority=b if isinstance(b, str) else "position")  # type: ignore[arg-type]
    if kind == "ensemble":
        return Ensemble(b)  # type: ignore[arg-type]
    return None


def _clear(message: str) -> bool:
    return bool(message.strip()) and "\n" not in message and len(message) < 400


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=HOSTILE,
    kind=st.sampled_from(["top-k", "capacity", "ensemble", "native"]),
    a=NUMBERS,
    b=st.one_of(NUMBERS, st.sampled_from(["gate", "uniform", "probs", "position", "x"])),
)
def test_any_prompt_and_parameters_give_a_trace_or_a_clear_value_error(prompt, kind, a, b):
    try:
        policy = _policy(kind, a, b)
        LIMITS.check_policy(policy, MODEL.num_experts)
        trace = run_prompt(MODEL, prompt, policy, max_tokens=LIMITS.max_prompt_tokens)
    except ValueError as err:
        assert _clear(str(err)), str(err)
        return
    assert trace.num_tokens == len(prompt.encode("utf-8")) > 0
    assert all(math.isfinite(v) for v in trace.output.entropy.tolist())
    assert trace_io.from_json_text(trace_io.to_json_text(trace)).token_ids == trace.token_ids


# ----------------------------------------------------------------------------- policy text
# Each strategy draws (spec text, the policy string a run under it must record, or None when the spec
# must be refused, and a regex the refusal must match).
K = st.integers(1, LIMITS.max_k)


def _noisy(text: str):
    """``text`` as typed by a person: any case, spaces around the parts (parse_policy allows both)."""

    def typed(spaced: bool, upper: bool) -> str:
        out = " : ".join(text.split(":")) if spaced else text
        return out.upper() if upper else out

    return st.builds(typed, st.booleans(), st.booleans())


@st.composite
def _valid_capacity(draw):
    factor = draw(st.floats(LIMITS.min_capacity_factor, LIMITS.max_capacity_factor))
    factor_text = draw(st.sampled_from([f"{factor:g}", repr(factor)]))
    priority = draw(st.sampled_from([None, "position", "probs"]))
    k = draw(st.none() | K)
    extras = [e for e in (priority, None if k is None else f"k={k}") if e is not None]
    if draw(st.booleans()):
        extras.reverse()  # FACTOR:k=K:probs is read like FACTOR:probs:k=K
    expected = f"capacity:{float(factor_text):g}:{priority or 'position'}" + ("" if k is None else f":k={k}")
    return ":".join(["capacity", factor_text, *extras]), expected


VALID_SPEC = st.one_of(
    K.flatmap(lambda k: st.tuples(_noisy(f"top-k:{k}") | st.just(f"topk:{k}"), st.just(f"top-k:{k}"))),
    _valid_capacity(),
    st.sampled_from(["gate", "uniform"]).flatmap(
        lambda w: st.tuples(_noisy(f"ensemble:{w}"), st.just(f"ensemble:{w}"))
    ),
    st.sampled_from([("ensemble", "ensemble:gate"), ("native", "native"), (" Native ", "native")]),
).map(lambda t: (t[0], t[1], None))

INVALID_SPEC = st.one_of(
    st.sampled_from(
        [
            ("top-k:0", r"\bk\b"),
            ("top-k:99", r"\bk\b"),
            ("top-k:two", "top-k:two"),
            ("top-k", "top-k"),
            ("top-k:1:2", "top-k"),
            ("capacity:-1", "factor"),
            ("capacity:0", "factor"),
            ("capacity:nan", "factor"),
            ("capacity:inf", "factor"),
            ("capacity:1e9", "factor"),
            ("capacity:0.01", "factor"),
            ("capacity:1:k=0", r"\bk\b"),
            ("capacity:1:k=9", r"\bk\b"),
            ("capacity:1:sideways", "priority"),
            ("capacity", "capacity"),
            ("capacity:1:probs:k=2:x", "capacity"),
            ("ensemble:evil", "weighting"),
            ("ensemble:gate:uniform", "ensemble"),
            ("native:1", "not understood"),
            ("", "non-empty"),
            ("   ", "non-empty"),
        ]
    ),
    st.text(max_size=24)
    .filter(
        lambda s: s.strip().lower().split(":")[0].strip() not in {"native", "top-k", "topk", "capacity", "ensemble"}
    )
    .map(lambda s: (s, "not understood|non-empty")),
).map(lambda t: (t[0], None, t[1]))


def _mostly(valid, invalid):
    """``valid`` about 5 times in 6, ``invalid`` otherwise (st.one_of would merge repeated branches)."""
    return st.sampled_from([True] * 5 + [False]).flatmap(lambda ok: valid if ok else invalid)


# Mostly valid specs and valid lengths, so that generate is the common case.
POLICY_SPECS = _mostly(VALID_SPEC, INVALID_SPEC)
NEW_TOKENS = _mostly(st.integers(1, LIMITS.max_new_tokens), st.sampled_from([-2, -1, 0, 5, 8]))


def test_policy_text_and_generation_lengths_give_a_generation_or_a_clear_value_error():
    outcomes: Counter[str] = Counter()

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompt=HOSTILE, spec=POLICY_SPECS, new=NEW_TOKENS)
    @example(prompt="hi", spec=("capacity:0.5:k=1", "capacity:0.5:position:k=1", None), new=2)  # every branch runs
    @example(prompt="hi", spec=("top-k:0", None, r"\bk\b"), new=2)
    @example(prompt="hi", spec=("native", "native", None), new=0)
    @example(prompt=" ", spec=("ensemble:uniform", "ensemble:uniform", None), new=1)
    def check(prompt, spec, new):
        text, expected, refusal = spec
        if expected is None:
            with pytest.raises(ValueError, match=refusal) as err:
                LIMITS.check_policy(parse_policy(text), MODEL.num_experts)
            assert _clear(str(err.value)), str(err.value)
            outcomes["invalid spec"] += 1
            event("invalid spec")
            return
        policy = parse_policy(text)
        LIMITS.check_policy(policy, MODEL.num_experts)  # a valid spec is within the limits
        if not 1 <= new <= LIMITS.max_new_tokens:
            with pytest.raises(ValueError, match="max_new_tokens") as err:
                LIMITS.check_new_tokens(new)
            assert _clear(str(err.value)), str(err.value)
            outcomes["invalid length"] += 1
            event("invalid length")
            return
        LIMITS.check_new_tokens(new)
        prompt_ids = list(prompt.encode("utf-8"))
        if not prompt.strip() or len(prompt_ids) > LIMITS.max_prompt_tokens:
            with pytest.raises(ValueError, match="prompt") as err:
                generate(MODEL, prompt, policy, max_new_tokens=new, max_tokens=LIMITS.max_prompt_tokens)
            assert _clear(str(err.value)), str(err.value)
            outcomes["invalid prompt"] += 1
            event("invalid prompt")
            return
        result = generate(MODEL, prompt, policy, max_new_tokens=new, max_tokens=LIMITS.max_prompt_tokens)
        assert result.trace.policy == expected, (text, result.trace.policy)
        assert len(result.new_token_ids) == new  # the byte tokenizer has no EOS: every step is kept
        assert result.trace.token_ids == prompt_ids + result.new_token_ids[:-1]
        outcomes["generated"] += 1
        event("generated")

    check()
    total = sum(outcomes.values())
    assert outcomes["generated"] >= total // 4, outcomes  # generate is the common case, not a rarity


@pytest.mark.parametrize("prompt", ["\x00" * 10, "\u202e\u202d" * 20, "🔥" * 70, "plain ASCII"])
def test_control_and_bidi_characters_are_traced_token_by_token(prompt):
    trace = run_prompt(MODEL, prompt, Capacity(1.0))
    raw = prompt.encode("utf-8")
    assert trace.token_ids == list(raw) and trace.num_tokens == len(raw)
    assert trace.tokens == [bytes([b]).decode("utf-8", "replace") for b in raw]  # one byte per token
    assert MODEL.tokenizer.decode(trace.token_ids) == prompt  # nothing lost between text and tokens
    assert all(lt.index.shape[0] == len(raw) for lt in trace.layers)
