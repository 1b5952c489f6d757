"""Tiny random MoE models, one per supported architecture family, built from config classes.

Router weights are re-drawn with std 0.5 (and selection biases randomised) so that top-k has no
near-ties: with the default std 0.02 init, equality tests between routing paths would be
meaningless. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

from moe_viz import MoEModel, wrap_model

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

# model_type -> (config class, config overrides). 8 routed experts, k=2 unless stated.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "minimax": (
        "MiniMaxConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention", "full_attention"]),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=0, eos_token_id=1),
    ),
    "flex_olmo": (
        "FlexOlmoConfig",
        dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1, bos_token_id=None),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=0, moe_layer_interval=1),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.8,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),
    "dots1": (
        "Dots1Config",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            head_dim=16,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            num_local_experts=8, num_experts_per_tok=2, head_dim=16, layer_types=["full_attention", "sliding_attention"]
        ),
    ),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=8, num_experts_per_tok=2)),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=64),
    ),
    "jamba": (
        "JambaConfig",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=8,
            use_mamba_kernels=False,
        ),
    ),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(num_experts=8, moe_topk=2, head_dim=16)),
    # Llama 4: its router returns a dense score matrix that scales each expert's input (own seam)
    "llama4_text": (
        "Llama4TextConfig",
        dict(
            intermediate_size_mlp=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            interleave_moe_layer_step=1,
        ),
    ),
    # DBRX: the router returns logits only; the block picks top-k and calls its experts (own seam)
    "dbrx": (
        "DbrxConfig",
        dict(
            d_model=64,
            n_heads=4,
            n_layers=2,
            max_seq_len=512,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": 64},
        ),
    ),
    # PhiMoE (sparsemixer) and JetMoE (sorted dispatch): each re-routed through its own seam
    "phimoe": ("PhimoeConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "jetmoe": ("JetMoeConfig", dict(kv_channels=16, num_local_experts=4, num_experts_per_tok=2)),
}

# Families whose routers are recorded but not substituted.
CAPTURE_ONLY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {}  # every tiny family is re-routable now


class ByteTokenizer:
    """A stand-in tokenizer: one token per byte (ids < 256)."""

    eos_token_id = None

    def __call__(self, text: str, return_tensors: str | None = None) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)}

    def decode(self, ids: list[int], **_: Any) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def save_byte_tokenizer(folder: Any) -> None:
    """Save a Hugging Face fast tokenizer to ``folder`` for checkpoints saved from ``build_model``:
    one token per printable ASCII character (ids 32-95; anything else becomes the space token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 96)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=" ").save_pretrained(folder)


def _redraw_routers(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(
                part in name for part in (".gate.weight", ".router.weight", ".gate.wg.weight", ".router.layer.weight")
            ):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        biases = [*model.named_buffers(), *model.named_parameters()]
        for name, tensor in biases:
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)


def build_config(model_type: str) -> Any:
    class_name, overrides = {**TINY_CONFIGS, **CAPTURE_ONLY_CONFIGS}[model_type]
    common = {} if model_type == "dbrx" else COMMON  # DBRX names its sizes differently
    return getattr(transformers, class_name)(**{**common, "vocab_size": 256, **overrides})


def build_model(model_type: str, seed: int = 0, experts_implementation: str | None = None) -> nn.Module:
    """A tiny random ``model_type`` causal LM in float32 eval mode."""
    torch.manual_seed(seed)
    config = build_config(model_type)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    _redraw_routers(model, seed + 1)
    return model


def build(model_type: str, seed: int = 0, experts_implementation: str | None = None) -> MoEModel:
    """A tiny instrumented model of ``model_type`` with a byte tokenizer."""
    return wrap_model(build_model(model_type, seed, experts_implementation), ByteTokenizer(), f"tiny-{model_type}")


# ----------------------------------------------------------------------------- every MoE family transformers ships
# Sizes a generic tiny config gets wherever the config has the attribute (first match wins per concept).
GENERIC_SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=256,
    max_position_embeddings=512,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    moe_k=2,
    moe_top_k=2,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    n_group=4,
    topk_group=2,
    num_group=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


VISION_SIZES: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=1,
    depth=1,
    num_heads=2,
    num_attention_heads=2,
    out_hidden_size=64,
)


MAX_GENERIC_PARAMETERS = 20_000_000  # a generic tiny build above this is skipped: it would not be tiny


def router_families() -> dict[str, Any]:
    """model_type -> config class, for every model type of the installed transformers whose modeling
    module defines a mixture of experts (a class named ``*Experts``): read from the library itself."""
    import importlib
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    found = {}
    for model_type in CONFIG_MAPPING_NAMES:
        try:
            config_class = CONFIG_MAPPING[model_type]
            module = importlib.import_module(config_class.__module__.replace("configuration_", "modeling_"))
        except Exception:  # a model type whose modeling code cannot be imported here
            continue
        own = [n for n, o in vars(module).items() if inspect.isclass(o) and o.__module__ == module.__name__]
        if any(name.endswith("Experts") for name in own):
            found[model_type] = config_class
    return found


def generic_config(config_class: Any) -> Any:
    """A tiny config of ``config_class``: its defaults with every size in ``GENERIC_SIZES`` shrunk,
    per-layer kind lists cut to the tiny depth (one layer of each kind kept, so hybrids keep an
    attention layer), and MLA attention given a head_dim equal to its rotary part."""
    config = config_class()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = getattr(text, "num_hidden_layers", None)
    for name, value in GENERIC_SIZES.items():
        current = getattr(text, name, None)
        if current is not None:
            try:  # a size given per modality (a list) keeps its length
                setattr(text, name, [value] * len(current) if isinstance(current, list) else value)
            except (AttributeError, TypeError, ValueError):
                pass
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and text is not config:  # multimodal rotary sections must fit the tiny head
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0)) or 1.0
        half = int(head_dim * partial) // 2
        sections = rope.get("mrope_section") or [8, 12, 12]
        scaled = [max(1, round(x * half / sum(sections))) for x in sections]
        scaled[-1] += half - sum(scaled)
        rope["mrope_section"] = scaled
    if getattr(text, "qk_rope_head_dim", None) is not None and getattr(text, "head_dim", None) is not None:
        text.head_dim = text.qk_rope_head_dim  # MLA: rotary embeddings are built for the rope part only
    for name in ("vision_config", "audio_config"):  # multimodal wrappers: their encoders shrunk too
        sub = getattr(config, name, None)
        for attr, value in VISION_SIZES.items():
            if sub is not None and getattr(sub, attr, None) is not None:
                try:
                    setattr(sub, attr, value)
                except (AttributeError, TypeError):
                    pass
    for name, value in list(vars(text).items()):
        is_kinds = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        if is_kinds and depth is not None and len(value) == depth:
            kinds = list(dict.fromkeys(value))
            try:
                setattr(text, name, (kinds + value)[: text.num_hidden_layers])
            except (AttributeError, TypeError):
                pass
    return config


def _from_config(config: Any) -> nn.Module:
    """The causal LM of ``config``; for a multimodal wrapper, the first multimodal Auto class that
    takes it (image-text-to-text, then multimodal LM), which runs text alone."""
    from moe_viz.models import AUTO_CLASSES

    for name in AUTO_CLASSES:
        try:
            return getattr(transformers, name).from_config(config)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err) or name == AUTO_CLASSES[-1]:
                raise
    raise AssertionError("unreachable")


def build_family(model_type: str, seed: int = 0) -> nn.Module:
    """A tiny random causal LM of ``model_type``: the hand-tuned config where there is one, else a
    generic one. Raises whatever transformers raises when the family cannot be built this small."""
    if model_type in TINY_CONFIGS or model_type in CAPTURE_ONLY_CONFIGS:
        return build_model(model_type, seed)
    config = generic_config(router_families()[model_type])
    with torch.device("meta"):  # size it first, without allocating: some defaults stay huge
        size = sum(p.numel() for p in _from_config(config).parameters())
    if size > MAX_GENERIC_PARAMETERS:  # parts the generic shrinking does not reach (vision towers, ...)
        raise ValueError(
            f"{model_type} still has {size:,} parameters after generic shrinking (limit {MAX_GENERIC_PARAMETERS:,})"
        )
    torch.manual_seed(seed)
    model = _from_config(config)
    model = model.float().eval()
    _redraw_routers(model, seed + 1)
    return model


def family_rows() -> list[tuple[str, str, str, str]]:
    """(model type, router class, support, spec) for every family that builds tiny and has a router:
    what ``tests/test_every_family.py`` proves, as the README's table of supported families."""
    import warnings

    rows = []
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for model_type in sorted(router_families()):
                try:
                    model = wrap_model(build_family(model_type), ByteTokenizer(), model_type)
                except Exception:  # not buildable tiny, or no router: not in the table
                    continue
                statuses = [site.verification.status for site in model.sites]
                status = (
                    "every mode"
                    if set(statuses) == {"verified"}
                    else "every mode on verified layers, native elsewhere"
                    if "verified" in statuses
                    else ("native + capacity at own k" if "capture" not in statuses else "native only")
                )
                classes = ", ".join(sorted({site.router_class for site in model.sites}))
                specs = "; ".join(sorted({site.verification.spec_text for site in model.sites}))
                rows.append((model_type, classes, status, specs))
    finally:
        transformers.logging.set_verbosity(level)
    return rows


def family_table() -> str:
    """The README's table of supported families (``python scripts/family_table.py`` prints it)."""
    lines = ["| model type | router class | modes | router maths (verified at load) |", "| --- | --- | --- | --- |"]
    lines += [f"| {mt} | {cls} | {status} | {spec} |" for mt, cls, status, spec in family_rows()]
    return "\n".join(lines)
