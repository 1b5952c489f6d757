"""Runs: a prompt (text or token ids), a batch of prompts, or a generation, under a routing policy.

* ``run_prompt`` does one forward over a prompt and returns its ``Trace``.
* ``run_batch`` runs many prompts in one padded forward and returns one exact ``Trace`` per
  prompt (right padding, so every prompt keeps its positions; capacity is counted per prompt).
* ``generate`` decodes new tokens. Under policies whose routing of a token depends on the other
  tokens of the forward (``Policy.recompute_when_generating``: capacity) a decode step alone
  (T = 1) could never drop anything, so every step recomputes the whole sequence so far without
  a cache; other policies use the KV cache like transformers' ``generate``.
* ``record`` is the open way in: ``with record(model, policy) as rec: model.model(**inputs)``
  then ``rec.trace()``, like nnsight's trace context.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ._hooks import Forward, Recorder, active_call, check_deadline
from ._output_head import ProjectedLogits
from ._trace_build import Part, build_layers, make_trace
from .models import MoEModel
from .policies import Policy
from .trace import Trace

Prompt = str | Sequence[int] | torch.Tensor  # text, or token ids (a list or a 1-D / (1, T) tensor)


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


def encode(model: MoEModel, prompt: Prompt, max_tokens: int | None = None) -> torch.Tensor:
    """(1, T) input ids for ``prompt`` (text or token ids); ValueError for an empty, invalid or too
    long prompt."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt must be a non-empty string (it was empty or whitespace only)")
        # Token ids as Python values, made a tensor here: transformers' own tensor conversion
        # (return_tensors="pt") costs more than the tokenising of a short prompt.
        ids = torch.as_tensor(model.tokenizer(prompt)["input_ids"], dtype=torch.long).reshape(1, -1)  # (1, T)
    else:
        ids = _token_ids(model, prompt)  # (1, T)
    T = ids.shape[1]
    if T == 0:
        raise ValueError("prompt must produce at least one token")
    limit = max_tokens if max_tokens is not None else model.max_positions
    if limit is not None and T > limit:
        raise ValueError(f"prompt is {T} tokens long; the limit is {limit} tokens")
    return ids.to(model.device)


def _token_ids(model: MoEModel, prompt: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(1, T) long tensor from token ids given as a list or a tensor; ValueError if they are not ids."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(
                f"prompt token ids must be a 1-D integer tensor (or shape (1, T)); got {prompt.dtype} of shape "
                f"{tuple(prompt.shape)}; use run_batch for several prompts"
            )
        values = prompt.tolist()
    elif isinstance(prompt, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        values = list(prompt)
    else:
        raise ValueError(f"prompt must be text or a sequence of integer token ids; got {type(prompt).__name__}")
    if not values:
        raise ValueError("prompt must hold at least one token id; got none")
    vocab = int(model.model.get_input_embeddings().num_embeddings)
    bad = [i for i in values if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token ids must satisfy 0 <= id < {vocab} (the vocabulary size); got {bad[0]}")
    return torch.tensor([values], dtype=torch.long)


def _prompt_text(model: MoEModel, prompt: Prompt, ids: list[int]) -> str:
    return prompt if isinstance(prompt, str) else model.tokenizer.decode(ids, skip_special_tokens=False)


def run_prompt(
    model: MoEModel,
    prompt: Prompt,
    policy: Policy | None = None,
    max_tokens: int | None = None,
    time_budget_s: float | None = None,
) -> Trace:
    """One forward over ``prompt`` (text or token ids) under ``policy`` (None: the model's own
    routing), traced.

    Raises ValueError for bad input and ``TimeBudgetExceeded`` past ``time_budget_s``.
    """
    model.instrumentation.check(policy)
    t0 = time.perf_counter()
    input_ids = encode(model, prompt, max_tokens)  # (1, T)
    t1 = time.perf_counter()
    head = model.instrumentation.head  # proven plain: the vocabulary is projected for the rows read
    with (
        torch.inference_mode(),
        active_call(policy, time_budget_s=time_budget_s, keep_hidden=head is not None) as recorder,
    ):
        if head is None:
            logits = model.model(input_ids=input_ids, use_cache=False).logits[0]  # (T, V)
        else:
            last = model.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[0, -1]  # (V,)
            hidden = recorder.current.hidden  # (1, T, H), kept by the base model's hook
            if hidden is None:
                raise RuntimeError("the base model's hook kept no hidden states: was the instrumentation removed?")
            logits = ProjectedLogits(head, hidden[0].cpu(), last.cpu())  # inference mode: nothing to detach
    t2 = time.perf_counter()
    layers = build_layers(model, [Part(recorder.forwards[0], slice(None))])
    timings = {
        "tokenize_ms": (t1 - t0) * 1e3,
        "forward_ms": (t2 - t1) * 1e3,
        "trace_ms": (time.perf_counter() - t2) * 1e3,
    }
    ids = input_ids[0].tolist()
    return make_trace(model, policy, _prompt_text(model, prompt, ids), ids, [0] * len(ids), layers, logits, timings)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def run_batch(
    model: MoEModel,
    prompts: Sequence[Prompt],
    policy: Policy | None = None,
    max_tokens: int | None = None,
    time_budget_s: float | None = None,
) -> list[Trace]:
    """Run several prompts (texts or token-id lists) in one padded forward; one ``Trace`` per prompt.

    Prompts are right-padded, so each keeps its own positions and, under causal attention, never
    sees the padding; capacity is counted per prompt, padding excluded. Each trace equals ``run_prompt`` of its prompt (up to
    the floating-point differences of a batched matrix product).
    """
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"prompts must be a non-empty list of prompts (texts or token-id lists); got {type(prompts).__name__}"
            + (" (use run_prompt for one prompt)" if isinstance(prompts, str) else "")
        )
    model.instrumentation.check(policy)
    t0 = time.perf_counter()
    encoded = [encode(model, p, max_tokens)[0].cpu() for p in prompts]  # B x (T_b,)
    lengths = [len(ids) for ids in encoded]
    B, T = len(encoded), max(lengths)
    input_ids = torch.full((B, T), _pad_id(model.tokenizer), dtype=torch.long)  # (B, T)
    mask = torch.zeros(B, T, dtype=torch.long)  # (B, T) 1 = real token
    for b, ids in enumerate(encoded):
        input_ids[b, : len(ids)] = ids
        mask[b, : len(ids)] = 1
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    t1 = time.perf_counter()
    # No attention mask: with right padding and causal attention a real token never sees the
    # padding after it, and some attention kernels mishandle a padding mask; the hooks still
    # learn which rows are padding (token_mask), so capacity counts each prompt alone.
    with torch.inference_mode(), active_call(policy, time_budget_s=time_budget_s, token_mask=mask) as recorder:
        logits = model.model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    t2 = time.perf_counter()
    forward = recorder.forwards[0]
    traces = []
    for b, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
        rows = torch.arange(lengths[b], device=input_ids.device) + b * T  # this prompt's token rows
        layers = build_layers(model, [Part(forward, rows, sequence=b)])
        timings = {
            "tokenize_ms": (t1 - t0) * 1e3,
            "forward_ms": (t2 - t1) * 1e3,
            "batch_size": float(B),
            "trace_ms": 0.0,
        }
        id_list = ids.tolist()
        text = _prompt_text(model, prompt, id_list)
        traces.append(
            make_trace(model, policy, text, id_list, [0] * len(id_list), layers, logits[b, : lengths[b]], timings)
        )
    return traces


@dataclass
class Recording:
    """What ``record`` saw: build the ``Trace`` of each sequence after the block.

    Every forward inside the block adds its tokens to the sequence (as KV-cache decoding does):
    forward 0 is the prompt (step 0), forward s adds step s. Padded batches (an attention mask
    with zeros) keep each sequence's real tokens only.
    """

    model: MoEModel
    policy: Policy | None
    recorder: Recorder

    def traces(self) -> list[Trace]:
        """One trace per sequence of the batch."""
        forwards = self.recorder.forwards
        if not forwards:
            raise ValueError("nothing was recorded: call the model inside the `with record(...)` block")
        sizes = {f.input_ids.shape[0] if f.input_ids is not None else None for f in forwards}
        if None in sizes or len(sizes) != 1:
            raise ValueError(
                "every forward in a record block must take input_ids of one batch size; "
                f"got batch sizes {sorted(s for s in sizes if s is not None)}"
                + (" and a call without input_ids" if None in sizes else "")
            )
        return [self._sequence(forwards, b) for b in range(next(iter(sizes)))]

    def trace(self) -> Trace:
        """The trace of the one sequence that was run (ValueError for a batch: use ``traces``)."""
        traces = self.traces()
        if len(traces) != 1:
            raise ValueError(f"the block ran a batch of {len(traces)} sequences; use traces() for one trace each")
        return traces[0]

    def _sequence(self, forwards: list[Forward], b: int) -> Trace:
        parts, ids, steps, logits = [], [], [], []
        for step, forward in enumerate(forwards):
            assert forward.input_ids is not None
            T = forward.input_ids.shape[1]
            real = (
                torch.ones(T, dtype=torch.bool)
                if forward.attention_mask is None
                else forward.attention_mask[b].bool().cpu()
            )
            positions = real.nonzero().flatten()  # (n,)
            parts.append(Part(forward, (positions + b * T).to(forward.input_ids.device), sequence=b))
            ids += forward.input_ids[b, positions.to(forward.input_ids.device)].tolist()
            steps += [step] * len(positions)
            if forward.logits is None:
                raise ValueError("the model's output had no logits to trace (call the causal-LM model itself)")
            logits.append(forward.logits[b, positions.to(forward.logits.device)].float().cpu())
        layers = build_layers(self.model, parts)
        prompt_ids = ids[: steps.count(0)]
        prompt = self.model.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        return make_trace(self.model, self.policy, prompt, ids, steps, layers, torch.cat(logits), {})


@contextmanager
def record(model: MoEModel, policy: Policy | None = None, time_budget_s: float | None = None) -> Iterator[Recording]:
    """Record (and route under ``policy``) every call of ``model.model`` inside the block.

    ``with record(model, TopK(1)) as rec: model.model(input_ids=ids)`` then ``rec.trace()``.
    Raises ValueError before the block if ``policy`` cannot run on this model.
    """
    model.instrumentation.check(policy)
    with torch.inference_mode(), active_call(policy, time_budget_s=time_budget_s, keep_logits=True) as recorder:
        yield Recording(model, policy, recorder)


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
    prompt: Prompt,
    policy: Policy | None = None,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    max_tokens: int | None = None,
    progress: Any = None,
    time_budget_s: float | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt`` (text or token ids) under ``policy``; stops at EOS.

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
    recompute = policy is not None and policy.recompute_when_generating
    eos = model.tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = input_ids
    parts: list[Part] = []
    step_rows: list[int] = []
    all_logits: list[torch.Tensor] = []
    new_ids: list[int] = []
    cache = None
    # a step that recomputes the whole sequence needs its last row's logits only: with a proven
    # output head the model projects just the rows the step consumed
    proven_head = model.instrumentation.head is not None
    t0 = time.perf_counter()
    with torch.inference_mode(), active_call(policy, time_budget_s=time_budget_s) as recorder:
        for step in range(max_new_tokens):
            check_deadline()
            feed = ids if (step == 0 or recompute) else ids[:, -1:]
            rows = feed.shape[1] if step == 0 else 1
            keep = {"logits_to_keep": rows} if proven_head else {}
            out = model.model(input_ids=feed, past_key_values=cache, use_cache=not recompute, **keep)
            cache = None if recompute else out.past_key_values
            parts.append(Part(recorder.forwards[-1], slice(-rows, None)))  # the tokens this step consumed
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
    layers = build_layers(model, parts)
    timings = {"forward_ms": forward_ms, "trace_ms": (time.perf_counter() - t1) * 1e3}
    traced_ids = input_ids[0].tolist() + new_ids[:-1]
    text = model.tokenizer.decode(new_ids, skip_special_tokens=True)
    trace = make_trace(
        model,
        policy,
        _prompt_text(model, prompt, input_ids[0].tolist()),
        traced_ids,
        step_rows,
        layers,
        torch.cat(all_logits),
        timings,
        generated_text=text,
    )
    return Generation(text=text, new_token_ids=new_ids, trace=trace)
