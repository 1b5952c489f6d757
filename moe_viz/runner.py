"""Run a prompt (or a generation) under a routing policy and return its ``Trace``.

``run_prompt`` does one forward over the prompt. ``generate`` decodes new tokens; under top-k and
ensemble policies it uses the KV cache like transformers' ``generate``. Under a capacity policy a
decode step alone has T = 1 and could never drop anything, so every step recomputes the whole
sequence so far without a cache: capacity is ``ceil(factor * T * k / E)`` over all T tokens seen
so far, and the routing recorded for a generated token is the one of the step that consumed it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .models import MoEModel
from .patching import LayerCall, Recorder, check_deadline, routing
from .policies import Capacity, Policy, policy_spec
from .routing import router_scores
from .trace import LayerTrace, OutputTrace, Trace

# Keep the full (T, V) log-distribution (needed for KL between modes) up to this many floats:
# 2,048 tokens x 16k vocabulary, 134 MB.
VOCAB_KEEP_LIMIT = 34_000_000
TOP_PREDICTIONS = 10


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy when ``temperature`` is 0, else seeded sampling with top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 10):
            raise ValueError(f"temperature must satisfy 0 <= temperature <= 10; got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must satisfy 0 < top_p <= 1; got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")


@dataclass
class Generation:
    """Generated text plus the trace of prompt and generated tokens."""

    text: str
    new_token_ids: list[int]
    trace: Trace


def encode(model: MoEModel, prompt: str, max_tokens: int | None = None) -> torch.Tensor:
    """(1, T) input ids for ``prompt``; ValueError for an empty or too long prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string (it was empty or whitespace only)")
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T)
    T = ids.shape[1]
    if T == 0:
        raise ValueError("prompt must produce at least one token")
    limit = max_tokens if max_tokens is not None else model.max_positions
    if limit is not None and T > limit:
        raise ValueError(f"prompt is {T} tokens long; the limit is {limit} tokens")
    return ids.to(model.device)


def _token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token as the text it contributes (byte-level BPE markers turned into spaces)."""
    if hasattr(tokenizer, "batch_decode"):  # one call into the fast tokenizer instead of T
        return list(tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def _layer_trace(model: MoEModel, calls: list[LayerCall], capacities: list[int | None]) -> LayerTrace:
    site = next(s for s in model.sites if s.layer == calls[0].layer)
    spec = site.spec
    logits = torch.cat([c.logits.float().cpu() for c in calls])  # (T, E)
    probs = router_scores(spec, logits) if spec.family != "capture" else logits.softmax(dim=-1)  # (T, E)
    if calls[0].native_index is not None:
        native_index = torch.cat([c.native_index.cpu() for c in calls]).long()  # (T, k)
        native_weights = torch.cat([c.native_weights.float().cpu() for c in calls])  # (T, k)
    else:  # layouts that expose only logits: the native choice is the top-k of the logits
        native_index = logits.topk(spec.top_k, dim=-1).indices
        native_weights = probs.gather(1, native_index)
    if calls[0].index is not None:
        index = torch.cat([c.index.cpu() for c in calls]).long()  # (T, k')
        weights = torch.cat([c.weights.float().cpu() for c in calls])  # (T, k')
        dropped = torch.cat([c.dropped.cpu() for c in calls])  # (T, k')
    else:
        index, weights = native_index, native_weights
        dropped = torch.zeros_like(index, dtype=torch.bool)
    used = [c for c in capacities if c is not None]
    return LayerTrace(
        layer=site.layer,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        router_logits=logits,
        router_probs=probs,
        native_index=native_index,
        native_weights=native_weights,
        index=index,
        weights=weights,
        dropped=dropped,
        capacity=used or None,
        capture_only=not spec.substitutable,
    )


def _last_rows(call: LayerCall, n: int) -> LayerCall:
    """The same call restricted to its last ``n`` token rows."""

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[-n:]

    return LayerCall(
        call.layer,
        call.logits[-n:],
        cut(call.native_index),
        cut(call.native_weights),
        cut(call.index),
        cut(call.weights),
        cut(call.dropped),
        call.capacity,
    )


def _build_layers(model: MoEModel, recorder: Recorder, keep_rows: list[int]) -> list[LayerTrace]:
    """Per-layer traces from the recorded forwards, keeping the last ``keep_rows[i]`` rows of forward i."""
    by_layer: dict[int, list[LayerCall]] = {}
    capacities: dict[int, list[int | None]] = {}
    for forward, keep in zip(recorder.forwards, keep_rows):
        for call in forward:
            by_layer.setdefault(call.layer, []).append(_last_rows(call, keep))
            capacities.setdefault(call.layer, []).append(call.capacity)
    return [_layer_trace(model, calls, capacities[layer]) for layer, calls in sorted(by_layer.items())]


def _output_trace(tokenizer: Any, logits: torch.Tensor, ids: list[int]) -> OutputTrace:
    """Top-K predictions, log-prob of the actual next token and entropy at every position."""
    # Few full-size (T, V) temporaries: each fresh one costs page faults comparable to the maths.
    logprobs = logits.log_softmax(dim=-1, dtype=torch.float32).cpu()  # (T, V)
    T, V = logprobs.shape
    top = logprobs.topk(min(TOP_PREDICTIONS, V), dim=-1)  # (T, K)
    target = torch.full((T,), float("nan"))
    if T > 1:
        target[:-1] = logprobs[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    entropy = -torch.bmm(logprobs.exp().unsqueeze(1), logprobs.unsqueeze(2)).view(T)  # (T,)
    bad = entropy.isnan()  # rows with -inf log-probs (masked tokens): 0 * -inf; redo them with 0 log 0 = 0
    if bad.any():
        rows = logprobs[bad]  # (n, V)
        entropy[bad] = -(rows.exp() * rows.clamp(min=torch.finfo(rows.dtype).min)).sum(dim=-1)
    unique = top.indices.unique().tolist()
    vocab_tokens = dict(zip(unique, _token_texts(tokenizer, unique)))
    return OutputTrace(
        top_ids=top.indices,
        top_logprobs=top.values,
        top_tokens=[[vocab_tokens[i] for i in row] for row in top.indices.tolist()],
        target_logprob=target,
        entropy=entropy,
        vocab_logprobs=logprobs if T * V <= VOCAB_KEEP_LIMIT else None,
    )


def _make_trace(
    model: MoEModel,
    policy: Policy | None,
    prompt: str,
    ids: list[int],
    step: list[int],
    layers: list[LayerTrace],
    logits: torch.Tensor,
    timings: dict[str, float],
    generated_text: str | None = None,
) -> Trace:
    t0 = time.perf_counter()
    output = _output_trace(model.tokenizer, logits, ids)
    trace = Trace(
        model_id=model.model_id,
        architecture=model.architecture,
        policy=policy_spec(policy),
        device=str(model.device),
        dtype=str(model.dtype).replace("torch.", ""),
        prompt=prompt,
        token_ids=ids,
        tokens=_token_texts(model.tokenizer, ids),
        step=step,
        layers=layers,
        output=output,
        generated_text=generated_text,
        timings_ms=timings,
    )
    timings["trace_ms"] = timings.get("trace_ms", 0.0) + (time.perf_counter() - t0) * 1e3
    return trace


def run_prompt(
    model: MoEModel,
    prompt: str,
    policy: Policy | None = None,
    max_tokens: int | None = None,
    time_budget_s: float | None = None,
) -> Trace:
    """One forward over ``prompt`` under ``policy`` (None: the model's own routing), traced.

    Raises ValueError for bad input and ``TimeBudgetExceeded`` past ``time_budget_s``.
    """
    model.instrumentation.check(policy)
    t0 = time.perf_counter()
    input_ids = encode(model, prompt, max_tokens)  # (1, T)
    t1 = time.perf_counter()
    with torch.inference_mode(), routing(policy, time_budget_s=time_budget_s) as recorder:
        assert recorder is not None
        recorder.start_forward()
        logits = model.model(input_ids=input_ids, use_cache=False).logits[0]  # (T, V)
    t2 = time.perf_counter()
    layers = _build_layers(model, recorder, [input_ids.shape[1]])
    timings = {"tokenize_ms": (t1 - t0) * 1e3, "forward_ms": (t2 - t1) * 1e3, "trace_ms": (time.perf_counter() - t2) * 1e3}
    ids = input_ids[0].tolist()
    return _make_trace(model, policy, prompt, ids, [0] * len(ids), layers, logits, timings)


def _next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Pick the next token from (V,) logits: argmax, or seeded temperature / top-p sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax().item())
    probs = (logits.float() / sampling.temperature).softmax(dim=-1).cpu()  # (V,)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p  # always keeps the best token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


def generate(
    model: MoEModel,
    prompt: str,
    policy: Policy | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    max_tokens: int | None = None,
    progress: Any = None,
    time_budget_s: float | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt`` under ``policy``; stops at EOS.

    ``progress(done, total)`` is called after each new token. Past ``time_budget_s`` the
    generation stops with ``TimeBudgetExceeded`` (checked between MoE layers). The trace covers the prompt
    (step 0) and every generated token that was fed back (step s for decode step s), so it has
    T_prompt + n_new - 1 positions; ``trace.generated_text`` holds the decoded new text.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    sampling = sampling or Sampling()
    model.instrumentation.check(policy)
    input_ids = encode(model, prompt, max_tokens)  # (1, T)
    limit = model.max_positions
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit} positions"
        )
    recompute = isinstance(policy, Capacity)
    eos = model.tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = input_ids
    keep_rows: list[int] = []
    step_rows: list[int] = []
    all_logits: list[torch.Tensor] = []
    new_ids: list[int] = []
    cache = None
    t0 = time.perf_counter()
    with torch.inference_mode(), routing(policy, time_budget_s=time_budget_s) as recorder:
        assert recorder is not None
        for step in range(max_new_tokens):
            check_deadline()
            feed = ids if (step == 0 or recompute) else ids[:, -1:]
            recorder.start_forward()
            out = model.model(input_ids=feed, past_key_values=cache, use_cache=not recompute)
            cache = None if recompute else out.past_key_values
            rows = feed.shape[1] if step == 0 else 1
            keep_rows.append(rows)
            step_rows.extend([step] * rows)
            all_logits.append(out.logits[0, -rows:].float().cpu())  # (rows, V)
            token = _next_token(out.logits[0, -1], sampling, generator)
            new_ids.append(token)
            if progress is not None:
                progress(step + 1, max_new_tokens)
            if token in eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    forward_ms = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    layers = _build_layers(model, recorder, keep_rows)
    timings = {"forward_ms": forward_ms, "trace_ms": (time.perf_counter() - t1) * 1e3}
    traced_ids = input_ids[0].tolist() + new_ids[:-1]
    text = model.tokenizer.decode(new_ids, skip_special_tokens=True)
    trace = _make_trace(
        model, policy, prompt, traced_ids, step_rows, layers, torch.cat(all_logits), timings, generated_text=text
    )
    return Generation(text=text, new_token_ids=new_ids, trace=trace)
