"""Inputs a researcher has: token ids, a batch of prompts in one padded forward, and the
``record`` context around a model call of their own."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build

import moe_viz
from moe_viz import Capacity, Ensemble, TopK, record, run_batch, run_prompt

PROMPTS = ["short", "a somewhat longer prompt here", "mid length!"]
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "jamba"]
POLICIES = [None, TopK(1), Capacity(0.5), Capacity(0.75, priority="probs"), Ensemble("uniform")]


def _assert_same_trace(batched: moe_viz.Trace, alone: moe_viz.Trace) -> None:
    assert batched.token_ids == alone.token_ids and batched.prompt == alone.prompt
    for b, a in zip(batched.layers, alone.layers, strict=True):
        assert torch.equal(b.index, a.index), b.layer
        assert torch.equal(b.dropped, a.dropped), b.layer
        assert b.capacity == a.capacity
        torch.testing.assert_close(b.weights, a.weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.router_logits, a.router_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.output.top_logprobs, alone.output.top_logprobs, rtol=1e-4, atol=1e-5)
    assert torch.equal(batched.output.top_ids[:, :3], alone.output.top_ids[:, :3])


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_traces_equal_one_by_one_traces(family):
    model = build(family)
    for policy in POLICIES:
        batched = run_batch(model, PROMPTS, policy)
        assert len(batched) == len(PROMPTS)
        for prompt, trace in zip(PROMPTS, batched, strict=True):
            _assert_same_trace(trace, run_prompt(model, prompt, policy))


def test_capacity_in_a_batch_is_counted_per_prompt_not_over_the_padding():
    model = build("mixtral")
    traces = run_batch(model, ["ab", "a much longer prompt than the first"], Capacity(1.0))
    lengths = [t.num_tokens for t in traces]
    E, k = model.num_experts, model.top_k
    for trace, T in zip(traces, lengths, strict=True):
        assert trace.layers[0].capacity == [-(-T * k // E)]  # ceil(1.0 * T * k / E) of its own T


def test_token_ids_run_like_the_text_they_encode():
    model = build("olmoe")
    text = "token ids in, trace out"
    ids = model.tokenizer(text)["input_ids"][0].tolist()
    from_text = run_prompt(model, text, TopK(1))
    for given in (ids, torch.tensor(ids), torch.tensor([ids])):
        from_ids = run_prompt(model, given, TopK(1))
        assert from_ids.token_ids == ids and from_ids.prompt == text
        assert from_ids.fingerprint() == from_text.fingerprint()
    assert run_batch(model, [ids, "x"], None)[0].fingerprint() == run_prompt(model, ids).fingerprint()


def test_a_text_prompt_runs_on_exactly_the_ids_the_tokenizer_gives():
    """The shipped model's Hugging Face tokenizer: special tokens, digits, CJK, emoji, spaces and a
    long text run on the ids ``tokenizer(text, return_tensors="pt")`` returns."""
    from moe_viz._runs import encode

    model = moe_viz.load_model(moe_viz.DEFAULT_MODEL, device="cpu")
    texts = ["<|endoftext|>def f(x):\n\treturn 12345", "双倍 🙂  two  spaces ", " leading space", "a" * 3000]
    for text in texts:
        want = model.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
        got = encode(model, text)
        assert got.dtype == torch.long and got.shape == want.shape and torch.equal(got, want)
    assert run_prompt(model, texts[0]).token_ids == model.tokenizer(texts[0])["input_ids"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "at least one token id"),
        ([1, 2.5], "sequence of integer token ids"),
        ([1, 100_000], "0 <= id <"),
        (torch.ones(2, 3, dtype=torch.long), "1-D integer tensor"),
        (torch.ones(3), "1-D integer tensor"),
    ],
)
def test_bad_token_ids_are_refused_with_a_message(bad, message):
    with pytest.raises(ValueError, match=message):
        run_prompt(build("mixtral"), bad)


def test_run_batch_refuses_a_single_string_and_an_empty_list():
    model = build("mixtral")
    with pytest.raises(ValueError, match="use run_prompt"):
        run_batch(model, "one prompt")
    with pytest.raises(ValueError, match="non-empty list"):
        run_batch(model, [])


def test_record_context_builds_the_same_trace_as_run_prompt():
    model = build("deepseek_v3")
    ids = model.tokenizer("record me")["input_ids"]
    for policy in (None, TopK(1), Capacity(0.5)):
        with record(model, policy) as rec:
            model.model(input_ids=ids, use_cache=False)
        traced = rec.trace()
        alone = run_prompt(model, "record me", policy)
        _assert_same_trace(traced, alone)
        assert traced.policy == alone.policy


def test_record_context_traces_each_row_of_a_padded_batch():
    model = build("mixtral")
    ids = torch.tensor([[104, 105, 33, 0, 0], [104, 101, 108, 108, 111]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with record(model, Capacity(1.0)) as rec:
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    first, second = rec.traces()
    _assert_same_trace(first, run_prompt(model, [104, 105, 33], Capacity(1.0)))
    _assert_same_trace(second, run_prompt(model, "hello", Capacity(1.0)))
    with pytest.raises(ValueError, match="use traces"):
        rec.trace()


def test_record_context_follows_kv_cache_decoding_step_by_step():
    model = build("mixtral")
    ids = model.tokenizer("abc")["input_ids"]
    with record(model, TopK(1)) as rec:
        out = model.model(input_ids=ids, use_cache=True)
        model.model(input_ids=torch.tensor([[100]]), past_key_values=out.past_key_values, use_cache=True)
    trace = rec.trace()
    assert trace.token_ids == [97, 98, 99, 100] and trace.step == [0, 0, 0, 1]
    full = run_prompt(model, "abcd", TopK(1))
    for a, b in zip(trace.layers, full.layers, strict=True):
        assert torch.equal(a.index, b.index)


def test_record_refuses_a_policy_the_model_cannot_run_before_the_block():
    model = build("mixtral")
    with pytest.raises(ValueError, match="k must satisfy"), record(model, TopK(99)):
        pytest.fail("the block must not run")
    with record(model) as rec:
        pass
    with pytest.raises(ValueError, match="nothing was recorded"):
        rec.trace()
