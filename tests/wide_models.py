"""Thin random MoE checkpoints of real models' routing shape (hundreds of experts, dozens of
layers), saved to a folder the app can load: the views are tested at the shape researchers see.

DeepSeek-V3 and Kimi K2 route over 256-384 experts in 61 layers, Qwen3-235B over 128 in 94; the
hidden size here is thin (16) so the forward is cheap, and the routers are redrawn wide so that
tokens spread over many experts, as trained routers do."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from moe_viz.models import default_model_location

SHAPES = {"deepseek-v3-like": (256, 61, 8), "qwen3-235b-like": (128, 94, 8)}  # experts, layers, top-k


def save_wide_model(folder: Path, num_experts: int, num_layers: int, top_k: int, seed: int = 0) -> Path:
    """A Qwen3-MoE of the given routing shape with the default model's tokenizer, in ``folder``."""
    torch.manual_seed(seed)
    tokenizer_dir = default_model_location()
    config = transformers.Qwen3MoeConfig(
        vocab_size=8192,
        hidden_size=16,
        intermediate_size=16,
        moe_intermediate_size=4,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            torch.nn.init.normal_(module.weight, std=2.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, folder / name)
    return folder
