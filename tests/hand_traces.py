"""Traces built by hand (no model run), for tests that need exact, known routing."""

from __future__ import annotations

import torch

from moe_viz.trace import LayerTrace, OutputTrace, Trace

SKEWED = [[0, 1], [0, 2], [1, 0], [3, 0]]  # routed load [4, 2, 1, 1]; fair share 2


def make_layer(
    index: list[list[int]],
    num_experts: int,
    dropped: list[list[bool]] | None = None,
    probs: torch.Tensor | None = None,
    layer: int = 0,
    capacity: list[int] | None = None,
) -> LayerTrace:
    """A LayerTrace with the given applied sets; router probs 0.6 / 0.3 on the set, the rest spread evenly."""
    idx = torch.tensor(index)  # (T, k)
    T, k = idx.shape
    if probs is None:
        probs = torch.full((T, num_experts), (1 - 0.9) / max(num_experts - k, 1))
        probs.scatter_(1, idx[:, :1], 0.6)
        if k > 1:
            probs.scatter_(1, idx[:, 1:2], 0.3)
    drop = torch.zeros(T, k, dtype=torch.bool) if dropped is None else torch.tensor(dropped)
    return LayerTrace(
        layer=layer,
        num_experts=num_experts,
        top_k=k,
        router_logits=probs.clamp_min(1e-9).log(),
        router_probs=probs,
        native_index=idx,
        native_weights=probs.gather(1, idx),
        index=idx,
        weights=probs.gather(1, idx).masked_fill(drop, 0.0),
        dropped=drop,
        capacity=capacity,
    )


def make_trace(
    layers: list[LayerTrace],
    vocab_probs: list[list[float]] | None = None,
    policy: str = "native",
    tokens: list[str] | None = None,
    target: list[float] | None = None,
    token_ids: list[int] | None = None,
) -> Trace:
    """A trace of ``layers`` with next-token distributions ``vocab_probs`` (default: uniform over 4)."""
    T = layers[0].num_tokens
    ids = token_ids if token_ids is not None else list(range(T))
    vocab = torch.tensor(vocab_probs).log() if vocab_probs is not None else torch.full((T, 4), 0.25).log()  # (T, V)
    top = vocab.topk(min(3, vocab.shape[1]), dim=-1)
    output = OutputTrace(
        top_ids=top.indices,
        top_logprobs=top.values,
        top_tokens=[[f"w{i}" for i in row] for row in top.indices.tolist()],
        target_logprob=torch.tensor(target) if target is not None else torch.full((T,), float("nan")),
        entropy=-(vocab.exp() * vocab).sum(-1),
        vocab_logprobs=vocab,
    )
    return Trace(
        model_id="hand",
        architecture="hand",
        policy=policy,
        device="cpu",
        dtype="float32",
        prompt="",
        token_ids=ids,
        tokens=tokens or [f"t{i}" for i in ids],
        step=[0] * T,
        layers=layers,
        output=output,
    )


def synthetic_trace(T: int, E: int, L: int, k: int = 8, seed: int = 0) -> Trace:
    """A random trace of the size of a long prompt on a large model (no model run)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(L):
        logits = torch.randn(T, E, generator=g)  # (T, E)
        probs = logits.softmax(-1)
        index = probs.topk(k, dim=-1).indices  # (T, k)
        dropped = torch.rand(T, k, generator=g) < 0.05
        layers.append(
            LayerTrace(
                layer=i,
                num_experts=E,
                top_k=k,
                router_logits=logits,
                router_probs=probs,
                native_index=index,
                native_weights=probs.gather(1, index),
                index=index,
                weights=probs.gather(1, index).masked_fill(dropped, 0),
                dropped=dropped,
                capacity=[T * k // E],
            )
        )
    V = 50
    vocab = torch.randn(T, V, generator=g).log_softmax(-1)
    top = vocab.topk(10, dim=-1)
    ids = torch.randint(0, V, (T,), generator=g).tolist()
    output = OutputTrace(
        top_ids=top.indices,
        top_logprobs=top.values,
        top_tokens=[[f"w{j}" for j in r] for r in top.indices.tolist()],
        target_logprob=torch.randn(T, generator=g),
        entropy=torch.ones(T),
        vocab_logprobs=vocab,
    )
    return Trace(
        model_id="synthetic",
        architecture="synthetic",
        policy="capacity:1:position",
        device="cpu",
        dtype="float32",
        prompt="",
        token_ids=ids,
        tokens=[f"w{j} " for j in ids],
        step=[0] * T,
        layers=layers,
        output=output,
    )
