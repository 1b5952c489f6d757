"""Router discovery: which modules of a model are routers, and how each one routes (``RouterSpec``).

The one place that knows router classes and module paths.

transformers 5.x MoE blocks call ``logits, weights, index = router(h)`` and then
``experts(h, index, weights)``. We find every router module, read its layer index from the module
path, and describe how the architecture turns logits into (index, weights) in a ``RouterSpec``.
Routers we can reproduce exactly are *substitutable*: any policy can run on them. Routers whose
maths or output we do not reproduce are *capture-only*: we record what the model did and refuse
other policies, never silently computing something wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Family = Literal["softmax", "topk_softmax", "sigmoid", "sqrtsoftplus", "sparsemixer", "native", "capture"]
OutputLayout = Literal["std", "logits_only", "logits_experts", "scores_logits", "jetmoe"]


@dataclass(frozen=True)
class RouterSpec:
    """How one router scores, selects and weights experts.

    * ``softmax``: scores = softmax(logits); select top-k of scores (+ selection bias); weights =
      the selected scores, divided by their sum iff ``renorm`` (clamped below at ``norm_min``),
      times ``scale``. Optional group limit (``group_score="max"``, DeepSeek-V2).
    * ``topk_softmax``: select top-k of the logits; weights = softmax over the k selected logits
      (GPT-OSS, Granite). Scores shown = softmax over all logits.
    * ``sigmoid``: scores = sigmoid(logits); select top-k of scores + correction bias inside the
      best ``topk_group`` of ``n_group`` groups (group score = sum of its top-2); weights = the
      unbiased selected scores, renormalised iff ``renorm``, times ``scale`` (DeepSeek-V3 family).
    * ``sqrtsoftplus``: like ``sigmoid`` with scores = sqrt(softplus(logits)) (DeepSeek-V4).
    * ``sparsemixer`` (PhiMoE, eval mode): experts chosen in order of their logits; the expert of
      slot i gets the softmax of its logit over the experts still available at slot i (the earlier
      slots' experts removed) whose logits are within a relative ``2 * jitter_eps`` of it. Other k
      run the same rule for k slots; the gate ensemble runs it for E slots.
    * ``native``: the maths is not reproduced, but the router hands back its own choice and
      weights (standard output), so policies that keep the native choice (capacity at the model's
      own k) still run on them.
    * ``capture``: not reproduced; only the native decision is recorded.
    """

    family: Family
    num_experts: int
    top_k: int
    renorm: bool = False
    scale: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    group_score: Literal["max", "top2sum"] | None = None
    norm_min: float | None = None
    bias_path: str | None = None  # attribute path of a selection-only bias on the router
    bias_on: Literal["scores", "logits"] = "scores"  # what the selection bias is added to
    jitter_eps: float | None = None  # sparsemixer's relative threshold (PhiMoE's router_jitter_noise)
    layout: OutputLayout = "std"

    @property
    def substitutable(self) -> bool:
        """True when moe-viz reproduces this router's maths, so any policy can run on it."""
        return self.family not in ("capture", "native")  # sparsemixer included: reproduced in eval mode

    @property
    def exposes_native(self) -> bool:
        """True when the router's own (index, weights) can be read from its output."""
        return self.layout in ("std", "scores_logits", "logits_experts", "jetmoe")

    @property
    def group_limit(self) -> int | None:
        """The most experts a token can reach under the group limit (None: no limit)."""
        if self.n_group is None or self.topk_group is None or self.n_group <= 1:
            return None
        return self.topk_group * (self.num_experts // self.n_group)

    def selection_bias(
        self, router: nn.Module, parent: nn.Module | None = None, args: tuple[Any, ...] = ()
    ) -> torch.Tensor | None:
        """The selection-only bias: an attribute path on the router, ``parent.<path>`` on its parent
        block, or ``arg<i>``: the i-th 1-D tensor passed to the router's forward."""
        if self.bias_path is None:
            return None
        if self.bias_path.startswith("arg"):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 1]
            return tensors[int(self.bias_path[3:])]
        obj: object = router
        path = self.bias_path
        if path.startswith("parent."):
            obj, path = parent, path[len("parent.") :]
        for name in path.split("."):
            obj = getattr(obj, name)
        assert isinstance(obj, torch.Tensor)
        return obj


@dataclass(frozen=True)
class RouterSite:
    """A router found in a model: its path, decoder-layer index and routing spec."""

    path: str
    layer: int
    spec: RouterSpec
    router_class: str
    shared_expert: bool = False  # the decoder layer also has a shared expert that every token runs through
    verification: Any = None  # _router_inference.Verification: how the spec was established at load


# Router classes whose maths we reproduce, by family. Names are transformers 5.x class names.
_SOFTMAX_RENORM_ALWAYS = {
    "MixtralTopKRouter",
    "MiniMaxTopKRouter",
    "HunYuanMoEV1Gate",
    "Qwen3_5MoeTopKRouter",
}
_SOFTMAX_NORM_TOPK_PROB = {
    "Qwen2MoeTopKRouter",
    "Qwen3MoeTopKRouter",
    "Qwen3NextTopKRouter",
    "OlmoeTopKRouter",
    "FlexOlmoTopKRouter",
}
_SOFTMAX_NO_RENORM = {"JambaTopKRouter"}
_TOPK_SOFTMAX = {
    "GptOssTopKRouter",
    "GraniteMoeTopKRouter",
    "GraniteMoeSharedTopKRouter",
    "GraniteMoeHybridTopKRouter",
}
_SIGMOID_GROUP = {
    "DeepseekV3TopkRouter",
    "Glm4MoeTopkRouter",
    "Dots1TopkRouter",
}
# Non-standard routers: recorded only, with the output layout we know how to read.
_CAPTURE_LAYOUTS: dict[str, OutputLayout] = {
    "DbrxRouter": "logits_experts",  # logits only; the block picks top-k and calls experts(h, index, weights)
    "Llama4Router": "scores_logits",  # dense score matrix; weight scales the expert input
    "JetMoeTopKGating": "jetmoe",  # sorted-dispatch tuple
}
# Unknown routers with the standard (logits, weights, index) contract are captured only.
_STD_NAME = re.compile(r"(TopK|Topk)Router$")
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")

SUPPORTED_ROUTERS = tuple(
    sorted(_SOFTMAX_RENORM_ALWAYS | _SOFTMAX_NORM_TOPK_PROB | _SOFTMAX_NO_RENORM | _TOPK_SOFTMAX | _SIGMOID_GROUP)
)
CAPTURE_ONLY_ROUTERS = tuple(sorted(_CAPTURE_LAYOUTS))


def _num_experts_and_k(router: nn.Module, model_config: object) -> tuple[int, int]:
    num_experts = getattr(router, "num_experts", None)
    top_k = getattr(router, "top_k", None)
    if num_experts is None and hasattr(router, "out_features"):  # nn.Linear routers (Llama4)
        num_experts = router.out_features
    cfg = getattr(model_config, "ffn_config", None) or model_config  # DBRX keeps them in ffn_config
    if num_experts is None:
        num_experts = getattr(cfg, "moe_num_experts", None) or getattr(cfg, "num_local_experts", None)
    if top_k is None:
        top_k = getattr(cfg, "moe_top_k", None) or getattr(cfg, "num_experts_per_tok", None)
    if not isinstance(num_experts, int) or not isinstance(top_k, int):
        raise ValueError(f"cannot read the number of experts / top-k of router {type(router).__name__}")
    return num_experts, top_k


def spec_for(router: nn.Module, model_config: object) -> RouterSpec | None:
    """The RouterSpec of ``router``, or None if the module is not a router we recognise."""
    name = type(router).__name__
    known = (
        name in _SOFTMAX_RENORM_ALWAYS
        or name in _SOFTMAX_NORM_TOPK_PROB
        or name in _SOFTMAX_NO_RENORM
        or name in _TOPK_SOFTMAX
        or name in _SIGMOID_GROUP
        or name == "DeepseekV2TopkRouter"
        or name == "Ernie4_5_MoeTopKRouter"
        or name == "PhimoeTopKRouter"
        or name in _CAPTURE_LAYOUTS
        or _STD_NAME.search(name) is not None
    )
    if not known:
        return None
    num_experts, top_k = _num_experts_and_k(router, model_config)
    base = dict(num_experts=num_experts, top_k=top_k)
    if name in _SOFTMAX_RENORM_ALWAYS:
        return RouterSpec("softmax", renorm=True, **base)
    if name in _SOFTMAX_NORM_TOPK_PROB:
        return RouterSpec("softmax", renorm=bool(router.norm_topk_prob), **base)
    if name in _SOFTMAX_NO_RENORM:
        return RouterSpec("softmax", renorm=False, **base)
    if name in _TOPK_SOFTMAX:
        return RouterSpec("topk_softmax", renorm=True, **base)
    if name in _SIGMOID_GROUP:
        return RouterSpec(
            "sigmoid",
            renorm=bool(router.norm_topk_prob),
            scale=float(router.routed_scaling_factor),
            n_group=int(router.num_group),
            topk_group=int(router.topk_group),
            group_score="top2sum",
            bias_path="e_score_correction_bias",
            **base,
        )
    if name == "DeepseekV2TopkRouter":
        grouped = router.topk_method == "group_limited_greedy"
        if router.topk_method not in ("greedy", "group_limited_greedy"):
            return RouterSpec("capture", **base)
        return RouterSpec(
            "softmax",
            renorm=False,
            scale=float(router.routed_scaling_factor),
            n_group=int(router.num_group) if grouped else None,
            topk_group=int(router.topk_group) if grouped else None,
            group_score="max" if grouped else None,
            **base,
        )
    if name == "PhimoeTopKRouter":
        return RouterSpec("sparsemixer", jitter_eps=float(router.router_jitter_noise), **base)
    if name == "Ernie4_5_MoeTopKRouter":
        return RouterSpec(
            "softmax",
            renorm=True,
            norm_min=float(router.norm_min),
            bias_path="moe_statics.e_score_correction_bias",
            **base,
        )
    return RouterSpec("capture", layout=_CAPTURE_LAYOUTS.get(name, "std"), **base)


def read_router_output(
    layout: str, output: Any, top_k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logits, native weights, native index) from a router's output, per layout. ``scores_logits``
    (Llama 4) returns a dense (N, E) score matrix that is 0 off the chosen experts, and the logits."""
    if layout in ("logits_only", "logits_experts"):  # logits_experts: the choice is read at the experts call
        return output, None, None
    if layout == "scores_logits":
        scores, logits = output[0], output[1]
        index = scores.float().topk(top_k, dim=-1).indices  # (N, k) the chosen experts (all others score 0)
        return logits, scores.gather(-1, index), index
    if layout == "jetmoe":  # sorted dispatch: (sorted slots, token per slot, gate per slot, sizes, logits)
        sorted_slots, _, gates, sizes, logits = output[:5]
        N, E = logits.shape[0], logits.shape[-1]
        k = sorted_slots.numel() // max(N, 1)
        per_slot = torch.repeat_interleave(
            torch.arange(E, device=logits.device), torch.as_tensor(sizes, device=logits.device)
        )  # (N*k,) expert of each sorted slot: slots are grouped by expert, ascending
        index = torch.empty(N * k, dtype=torch.long, device=logits.device)
        index[sorted_slots] = per_slot
        weights = torch.empty(N * k, dtype=gates.dtype, device=gates.device)
        weights[sorted_slots] = gates
        return logits, weights.view(N, k), index.view(N, k)
    return output[0], output[1], output[2]


def jetmoe_output(index: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor, template: Any) -> tuple[Any, ...]:
    """A JetMoE router output (sorted dispatch) for the choice ``index`` / ``weights`` (N, k')."""
    N, k = index.shape
    E = logits.shape[-1]
    flat = index.reshape(-1)  # (N*k,)
    _, sorted_slots = flat.sort(dim=0, stable=True)  # (N*k,) slots grouped by expert
    batch_index = sorted_slots.div(k, rounding_mode="trunc")  # (N*k,) token of each slot
    gates = weights.reshape(-1)[sorted_slots].to(template[2].dtype)  # (N*k,)
    sizes = torch.bincount(flat, minlength=E).tolist()
    return (sorted_slots, batch_index, gates, sizes, logits, *template[5:])


def layer_of(path: str) -> int | None:
    """The decoder-layer index in a module path ("model.layers.3.mlp.gate" -> 3), or None."""
    match = _LAYER.search(path + ".")
    return int(match.group(1)) if match else None


def is_attention_path(path: str) -> bool:
    """Mixture-of-attention routers (JetMoE) pick attention heads, not FFN experts."""
    return ".self_attention." in path or ".attention." in path


def shared_expert_layers(model: nn.Module) -> set[str]:
    """Decoder-layer paths ("model.layers.3") that hold a shared expert (shared_expert(s), shared_mlp)."""
    shared: set[str] = set()
    for path, _ in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        match = _LAYER.search(path + ".")
        if match and name.startswith("shared") and not name.endswith("_gate"):
            shared.add(path[: match.end() - 1])
    return shared


def in_layer_with_shared_expert(path: str, shared: set[str]) -> bool:
    """True when the module at ``path`` sits in one of the decoder layers ``shared_expert_layers`` found."""
    return any(path.startswith(prefix + ".") for prefix in shared)


def find_routers(model: nn.Module) -> list[tuple[nn.Module, RouterSite]]:
    """Every router of a known class in ``model`` with its site, in layer order (routers of other
    classes are found at load by what they return: see ``_hooks.instrument``)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: list[tuple[nn.Module, RouterSite]] = []
    shared = shared_expert_layers(model)
    for path, module in model.named_modules():
        if is_attention_path(path):
            continue
        spec = spec_for(module, text_config)
        if spec is None:
            continue
        layer = layer_of(path)
        site = RouterSite(
            path=path,
            layer=len(found) if layer is None else layer,
            spec=spec,
            router_class=type(module).__name__,
            shared_expert=in_layer_with_shared_expert(path, shared),
        )
        found.append((module, site))
    found.sort(key=lambda item: item[1].layer)
    return found
