"""Routing fragility: how easily each token's choice of experts would change.

Three measurements, from the cheapest to the most direct:

* ``margin_ranking(trace, layer)``: tokens ranked by their top-k margin (the last chosen minus
  the first left-out router score, at the run's k): the smaller, the nearer a swap.
* ``noise_sensitivity(model, prompt)``: the share of tokens whose top-k **set** changes when each
  router's input is perturbed by seeded Gaussian noise of relative size 1 %, 5 %, 10 %
  (``||noise_t|| = level * ||x_t||`` for every token t). Every router is probed on the model's
  own (unperturbed) hidden states in one native forward, so each layer's number is that router's
  own sensitivity, not the echo of an earlier layer's change.
* ``edit_diff(original, edited, layer)``: the routing of a prompt against an edited version of it,
  tokens aligned (difflib over token ids), with the aligned tokens whose expert set changed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from . import metrics
from ._hooks import active_call
from ._router_math import select_topk
from ._routers import RouterSite, read_router_output
from ._runs import Prompt, encode
from ._trace_build import token_texts
from .models import MoEModel
from .trace import LayerTrace, Trace

DEFAULT_NOISE_LEVELS = (0.01, 0.05, 0.10)


# ----------------------------------------------------------------------------- margins
def margin_reason(lt: LayerTrace) -> str | None:
    """Why this layer has no meaningful top-k margin (None when it has one)."""
    if lt.every_expert_runs:
        return f"every expert runs for every token in layer {lt.layer}, so no choice can flip"
    if not lt.scores_recorded:
        return f"layer {lt.layer} was imported with expert ids only, without the router's scores"
    if not lt.scores_decide:
        why = "adds a selection bias to its scores" if lt.selection_bias else "limits choices to expert groups"
        if lt.capture_only:
            why = "is capture-only"
        return f"the router of layer {lt.layer} {why}: its scores alone do not decide the choice"
    return None


def _layer_margins(trace: Trace, layer: int) -> tuple[LayerTrace, int, torch.Tensor]:
    """Layer ``layer``, its applied k and each token's top-k margin (T,); ValueError when the
    margin does not decide the choice (see ``margin_reason``)."""
    lt = trace.layer(layer)
    reason = margin_reason(lt)
    if reason is not None:
        raise ValueError(f"layer has no top-k margin: {reason}")
    k = lt.applied_k
    return lt, k, metrics.topk_margin(lt, k)


def _choice(order: list[int], k: int) -> tuple[str, str]:
    """(the k best experts, the first left out) of a token's experts in score order, as labels."""
    return ", ".join(f"e{e}" for e in order[:k]), f"e{order[k]}"


def margin_ranking(trace: Trace, layer: int) -> pd.DataFrame:
    """Tokens of ``layer`` ranked by top-k margin at the run's k, smallest (most fragile) first:
    position, token, margin, chosen (the k best experts), runner_up (the first left out).

    ValueError when the margin does not decide the choice (see ``margin_reason``)."""
    lt, k, margin = _layer_margins(trace, layer)  # margin (T,)
    order = lt.router_probs.float().argsort(dim=-1, descending=True).tolist()  # (T, E)
    rows = [(t, trace.tokens[t], float(margin[t]), *_choice(order[t], k)) for t in range(lt.num_tokens)]
    frame = pd.DataFrame(rows, columns=["position", "token", "margin", "chosen", "runner_up"])
    return frame.sort_values(["margin", "position"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class TokenMargin:
    """One token's place in ``margin_ranking`` of one layer, computed without the whole ranking."""

    margin: float
    rank: int  # 1 = the most fragile token of the layer
    tokens: int
    chosen: str
    runner_up: str


def token_margin(trace: Trace, layer: int, position: int) -> TokenMargin:
    """The row of ``position`` in ``margin_ranking(trace, layer)`` (the same margin, rank, chosen
    and runner-up), at the cost of one vectorised margin: per-token views over dozens of layers
    stay fast. ValueError as ``margin_ranking``."""
    lt, k, margin = _layer_margins(trace, layer)  # margin (T,)
    t = trace.check_position(position)
    m = margin[t]
    earlier = torch.arange(lt.num_tokens) < t  # (T,) the ranking breaks ties by position
    rank = int(((margin < m) | ((margin == m) & earlier)).sum()) + 1
    order = lt.router_probs[t].float().argsort(descending=True).tolist()  # (E,)
    return TokenMargin(float(m), rank, lt.num_tokens, *_choice(order, k))


# ----------------------------------------------------------------------------- noise
@dataclass(frozen=True)
class NoiseSensitivity:
    """Per probed layer and noise level, which tokens' top-k set changed.

    ``changed`` (L, len(levels), T) bool, rows in ``layers`` order; ``k`` the model's own k.
    Layers whose router maths moe-viz does not reproduce are left out (``skipped`` says why)."""

    levels: tuple[float, ...]
    layers: list[int]
    token_ids: list[int]
    tokens: list[str]
    changed: torch.Tensor
    k: int
    seed: int
    skipped: dict[int, str]

    def share(self) -> pd.DataFrame:
        """layer, level, changed_tokens, tokens, changed_share: one row per layer and level."""
        T = len(self.tokens)
        rows = [
            {
                "layer": layer,
                "level": level,
                "changed_tokens": int(self.changed[i, j].sum()),
                "tokens": T,
                "changed_share": float(self.changed[i, j].double().mean()) if T else 0.0,
            }
            for i, layer in enumerate(self.layers)
            for j, level in enumerate(self.levels)
        ]
        return pd.DataFrame(rows, columns=["layer", "level", "changed_tokens", "tokens", "changed_share"])

    def smallest_level_changing(self, position: int) -> dict[int, float | None]:
        """Per layer, the smallest noise level that changed token ``position``'s set (None: none did)."""
        out: dict[int, float | None] = {}
        for i, layer in enumerate(self.layers):
            hit = self.changed[i, :, position].nonzero().flatten().tolist()
            out[layer] = self.levels[hit[0]] if hit else None
        return out


def _router_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def _check_levels(levels: tuple[float, ...]) -> tuple[float, ...]:
    ok = isinstance(levels, (tuple, list)) and levels
    if not ok or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 1 for x in levels):
        raise ValueError(f"levels must be relative noise sizes with 0 < level <= 1; got {levels!r}")
    return tuple(sorted(float(x) for x in levels))


def noise_sensitivity(
    model: MoEModel,
    prompt: Prompt,
    levels: tuple[float, ...] = DEFAULT_NOISE_LEVELS,
    seed: int = 0,
    max_tokens: int | None = None,
) -> NoiseSensitivity:
    """Which tokens' top-k set (at the model's own k) changes when each router's input is perturbed
    by seeded noise of relative size ``levels``; one native forward, every router probed in it.

    The same noise direction is scaled to each level (seed + layer), so the levels are nested
    draws of one perturbation; reruns with the same seed give the same answer."""
    levels = _check_levels(levels)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer; got {seed!r}")
    ids = encode(model, prompt, max_tokens)  # (1, T)
    results: dict[int, torch.Tensor] = {}
    skipped: dict[int, str] = {}

    def probe(
        site: RouterSite,
        router: nn.Module,
        parent: nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        logits: torch.Tensor,
    ) -> None:
        spec = site.spec
        x = _router_input(args, kwargs)
        if not spec.substitutable:
            skipped[site.layer] = "its routing maths is not reproduced by moe-viz (capture-only or partial)"
            return
        if x is None:
            skipped[site.layer] = "its router takes no hidden-state tensor to perturb"
            return
        bias = spec.selection_bias(router, parent, (*args[1:], *kwargs.values()))
        clean = select_topk(spec, logits, spec.top_k, bias).sort(dim=-1).values  # (N, k)
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (N, d)
        gen = torch.Generator().manual_seed(seed * 100_003 + site.layer)
        direction = torch.randn(flat.shape, generator=gen).to(flat.device)  # (N, d)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scale = flat.norm(dim=-1, keepdim=True)  # (N, 1)
        changed = []
        for level in levels:
            noisy = (flat + level * scale * direction).to(x.dtype).reshape(x.shape)
            out = router.forward(noisy, *args[1:], **kwargs)  # .forward: no hook fires, nothing recorded
            noisy_logits = read_router_output(spec.layout, out, spec.top_k)[0].detach().reshape(-1, spec.num_experts)
            picked = select_topk(spec, noisy_logits, spec.top_k, bias).sort(dim=-1).values  # (N, k)
            changed.append((picked != clean).any(dim=-1).cpu())  # (N,)
        results[site.layer] = torch.stack(changed)  # (levels, N)

    with torch.inference_mode(), active_call(None, probe=probe):
        model.model(input_ids=ids, use_cache=False)
    layers = sorted(results)
    if not layers:
        raise ValueError(
            "this model has no router whose maths moe-viz reproduces: noise sensitivity cannot be measured "
            f"({'; '.join(f'layer {k}: {v}' for k, v in sorted(skipped.items()))})"
        )
    tokens = token_texts(model.tokenizer, ids[0].tolist())  # the same token texts a trace holds
    return NoiseSensitivity(
        levels=levels,
        layers=layers,
        token_ids=ids[0].tolist(),
        tokens=tokens,
        changed=torch.stack([results[layer] for layer in layers]),  # (L, levels, T)
        k=model.top_k,
        seed=seed,
        skipped=skipped,
    )


# ----------------------------------------------------------------------------- prompt edits
@dataclass(frozen=True)
class EditDiff:
    """The routing of ``original`` against ``edited`` at one layer, tokens aligned.

    ``table`` has one row per token of either prompt: original_position, edited_position (-1 where
    the token exists on one side only), token, status ('same routing' | 'changed routing' |
    'removed' | 'inserted'), experts_original, experts_edited (kept experts, e.g. "e1 e5").
    ``changed_share_per_layer``: per MoE layer, the share of aligned tokens whose set changed."""

    layer: int
    table: pd.DataFrame
    aligned: int
    changed: int
    changed_share_per_layer: dict[int, float]


def _experts_text(sets: torch.Tensor, t: int) -> str:
    return " ".join(f"e{e}" for e in sets[t].nonzero().flatten().tolist())


def aligned_pairs(original: Trace, edited: Trace) -> list[tuple[int, int]]:
    """(original position, edited position) of the tokens the two prompts share, in order."""
    matcher = difflib.SequenceMatcher(a=original.token_ids, b=edited.token_ids, autojunk=False)
    return [(b.a + i, b.b + i) for b in matcher.get_matching_blocks() for i in range(b.size)]


def edit_diff(original: Trace, edited: Trace, layer: int) -> EditDiff:
    """Align the two prompts' tokens and compare the experts that processed each aligned token."""
    for name, tr in (("original", original), ("edited", edited)):
        if not isinstance(tr, Trace):
            raise ValueError(f"{name} must be a Trace; got {type(tr).__name__}")
    if original.layer_ids != edited.layer_ids or original.model_id != edited.model_id:
        raise ValueError("original and edited must be runs of one model (same MoE layers)")
    if original.policy != edited.policy:
        raise ValueError(
            f"original and edited must run under one policy; got {original.policy!r} and {edited.policy!r}"
        )
    pairs = aligned_pairs(original, edited)
    a_sets = {lt.layer: metrics.membership(lt, "kept") for lt in original.layers}  # layer -> (Ta, E)
    b_sets = {lt.layer: metrics.membership(lt, "kept") for lt in edited.layers}  # layer -> (Tb, E)
    shares = {}
    for lid in original.layer_ids:
        diff = [bool((a_sets[lid][i] != b_sets[lid][j]).any()) for i, j in pairs]
        shares[lid] = sum(diff) / len(diff) if diff else 0.0
    a, b = a_sets[original.layer(layer).layer], b_sets[edited.layer(layer).layer]
    rows, changed = [], 0
    ia = ib = 0
    for i, j in [*pairs, (original.num_tokens, edited.num_tokens)]:
        rows += [
            {"original_position": t, "edited_position": -1, "token": original.tokens[t], "status": "removed"}
            | {"experts_original": _experts_text(a, t), "experts_edited": ""}
            for t in range(ia, i)
        ]
        rows += [
            {"original_position": -1, "edited_position": t, "token": edited.tokens[t], "status": "inserted"}
            | {"experts_original": "", "experts_edited": _experts_text(b, t)}
            for t in range(ib, j)
        ]
        if i < original.num_tokens and j < edited.num_tokens:
            same = bool((a[i] == b[j]).all())
            changed += not same
            rows.append(
                {
                    "original_position": i,
                    "edited_position": j,
                    "token": original.tokens[i],
                    "status": "same routing" if same else "changed routing",
                    "experts_original": _experts_text(a, i),
                    "experts_edited": _experts_text(b, j),
                }
            )
        ia, ib = i + 1, j + 1
    table = pd.DataFrame(
        rows,
        columns=["original_position", "edited_position", "token", "status", "experts_original", "experts_edited"],
    )
    return EditDiff(layer, table, len(pairs), changed, shares)
