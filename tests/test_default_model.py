"""The shipped default model (assets/moe-viz-mini) loads offline with plain transformers,
is a real MoE, generates text, and routes different kinds of text differently (measured)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "moe-viz-mini"

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").exists(),
    reason=f"default model weights not found in {MODEL_DIR} (run scripts/train_default_model.py)",
)

CODE_PROMPT = (
    "def parse_header(line):\n"
    '    """Split a \'Key: value\' header line."""\n'
    "    key, _, value = line.partition(':')\n"
    "    if not key:\n"
    "        raise ValueError('empty header name')\n"
    "    return key.strip().lower(), value.strip()\n"
)
PROSE_PROMPT = (
    "The tutorial introduces the reader informally to the basic concepts and features of the "
    "language. It helps to have an interpreter handy for hands-on experience, but all examples "
    "are self-contained, so the tutorial can be read off-line as well."
)
CHINESE_PROMPT = "床前明月光，疑是地上霜。举头望明月，低头思故乡。春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"
NUMBERS_PROMPT = "12 + 35 = 47\n408 - 19 = 389\n7 * 61 = 427\n2001-03-04 was a Sunday.\n"


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        # Offline must be enough: nothing may be fetched from a hub.
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    model.eval()
    return tokenizer, model


def top1_histograms(model, tokenizer, text: str) -> torch.Tensor:
    """Per layer, the share of the prompt's tokens whose top-1 expert is each expert."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, output_router_logits=True)
    n_exp = model.config.num_local_experts
    hists = []
    for logits in out.router_logits:  # each (tokens, n_exp)
        top1 = logits.float().argmax(dim=-1)  # (tokens,)
        hists.append(torch.bincount(top1, minlength=n_exp).float() / top1.numel())
    return torch.stack(hists)  # (layers, n_exp)


def test_default_model_is_a_mixtral_moe_with_one_router_per_layer(loaded):
    _, model = loaded
    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert cfg.num_local_experts > 1
    assert 1 <= cfg.num_experts_per_tok < cfg.num_local_experts
    routers = [m for name, m in model.named_modules() if type(m).__name__.endswith("Router")]
    assert len(routers) == cfg.num_hidden_layers
    # The app sends prompts up to 2,048 tokens.
    assert cfg.max_position_embeddings >= 2048


def test_default_model_weights_are_bf16_and_at_most_20_mb(loaded):
    _, model = loaded
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    assert next(model.parameters()).dtype == torch.bfloat16


def test_default_model_folder_ships_card_and_data_licences():
    card = (MODEL_DIR / "README.md").read_text(encoding="utf-8")
    for heading in ("## Held-out evaluation", "## Measured expert specialisation", "## Training data", "## Samples"):
        assert heading in card
    assert "CC-BY 2.5" in (MODEL_DIR / "DATA_LICENSES.md").read_text(encoding="utf-8")


def test_tokenizer_splits_digits_and_has_special_tokens(loaded):
    tokenizer, _ = loaded
    assert len(tokenizer("12345", add_special_tokens=False)["input_ids"]) == 5
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    text = "def f(x):\n    return x * 2  # 双倍"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("prompt", ["def fibonacci(n):\n", "The library reference describes"], ids=["code", "prose"])
def test_greedy_generation_continues_code_and_prose_prompts_with_text(loaded, prompt):
    tokenizer, model = loaded
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert new_text.strip(), f"no text generated after {prompt!r}"


def test_routing_differs_between_code_prose_chinese_and_numbers(loaded):
    tokenizer, model = loaded
    hists = {
        name: top1_histograms(model, tokenizer, text)
        for name, text in {
            "code": CODE_PROMPT,
            "prose": PROSE_PROMPT,
            "chinese": CHINESE_PROMPT,
            "numbers": NUMBERS_PROMPT,
        }.items()
    }
    for a, b in itertools.combinations(hists, 2):
        # Total-variation distance between the two top-1 expert histograms, per layer.
        tv = 0.5 * (hists[a] - hists[b]).abs().sum(dim=-1)  # (layers,)
        assert tv.max() > 0.5, f"{a} vs {b}: routing barely differs (TV per layer {tv.tolist()})"


def test_default_model_runs_a_2048_token_prompt(loaded):
    tokenizer, model = loaded
    ids = tokenizer(PROSE_PROMPT * 60, return_tensors="pt")["input_ids"][:, :2048]  # (1, 2048)
    assert ids.shape[1] == 2048
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert torch.isfinite(out.logits.float()).all()
    assert out.router_logits[0].shape == (2048, model.config.num_local_experts)
