"""A model dispatched by accelerate (part on CPU, part offloaded to disk) routes like a plain one."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_model, save_byte_tokenizer

from moe_viz import Capacity, Ensemble, TopK, load_model, run_prompt

DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "mixtral"
    build_model("mixtral").save_pretrained(folder)
    save_byte_tokenizer(folder)
    return folder


@pytest.mark.parametrize("policy", [None, TopK(1), Capacity(0.5), Ensemble("uniform")], ids=str)
def test_disk_offloaded_model_gives_the_same_trace_as_the_plain_model(checkpoint, tmp_path, policy):
    plain = load_model(str(checkpoint), device="cpu", dtype=torch.float32)
    dispatched = load_model(
        str(checkpoint), device_map=DEVICE_MAP, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    assert dispatched.model.hf_device_map["model.layers.1"] == "disk"
    a = run_prompt(plain, "HELLO ROUTING", policy)
    b = run_prompt(dispatched, "HELLO ROUTING", policy)
    torch.testing.assert_close(a.output.vocab_logprobs, b.output.vocab_logprobs, atol=1e-6, rtol=0)
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.index, lb.index) and torch.equal(la.dropped, lb.dropped)


def test_a_disk_offloaded_output_head_projects_the_rows_read_like_the_plain_model(checkpoint, tmp_path):
    plain = load_model(str(checkpoint), device="cpu", dtype=torch.float32)
    device_map = {**DEVICE_MAP, "model.layers.1": "cpu", "lm_head": "disk"}
    dispatched = load_model(
        str(checkpoint), device_map=device_map, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    assert dispatched.model.hf_device_map["lm_head"] == "disk" and dispatched.instrumentation.head is not None
    a = run_prompt(plain, "HELLO ROUTING")
    b = run_prompt(dispatched, "HELLO ROUTING")
    torch.testing.assert_close(a.output.at(3).top_logprobs, b.output.at(3).top_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.output.vocab_logprobs, b.output.vocab_logprobs, atol=1e-6, rtol=0)
