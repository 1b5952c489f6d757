"""Every MoE family the installed transformers ships, found from the library itself, built tiny.

For each family: tracing leaves the logits bit-identical; a family whose router maths was
inferred and verified at load runs through the re-implementation at its own k exactly like the
native forward, picks the native experts, and changes under TopK(1); a family with partial
support runs capacity at its own k on the router's own choice and refuses the rest with a
reason. Families that cannot be built this small are skipped with transformers' own error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tiny_models import ByteTokenizer, build_family, build_model, router_families
from torch import nn

from moe_viz import Capacity, TopK, run_prompt, wrap_model
from moe_viz._router_math import gate_weights, select_topk

FAMILIES = sorted(router_families())
PROMPT = "every family, routed the way it routes"
HUGE = Capacity(1e6)  # a capacity nothing reaches: the re-implementation at the model's own k
PLAIN_HEADS = {
    "mixtral",
    "olmoe",
    "qwen3_moe",
    "deepseek_v3",
    "gpt_oss",
    "llama4_text",
}  # return lm_head's output as is
CHANGED_LOGITS = {"granitemoe", "cohere2_moe"}  # scale lm_head's output: every row stays in the forward


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    transformers.logging.set_verbosity(level)


def _build(model_type: str):
    try:
        net = build_family(model_type)
        with torch.inference_mode():
            net(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
    except Exception as err:  # the reason is transformers' own; the family is listed as not buildable
        pytest.skip(f"{model_type} cannot be built tiny: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    try:
        return net, wrap_model(net, ByteTokenizer(), f"tiny-{model_type}")
    except ValueError as err:
        pytest.skip(f"{model_type}: no router with a known class or the standard output found ({err})"[:300])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_buildable_family_is_traced_exactly_and_runs_every_mode_it_can_prove(model_type):
    net, model = _build(model_type)
    ids = model.tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        plain = net(input_ids=ids, use_cache=False).logits[0]
    native = run_prompt(model, PROMPT)
    # bit for bit, whether the run kept the logits or the hidden states its output head projects
    assert torch.equal(native.output.vocab_logprobs, plain.log_softmax(-1).float()), "capture changed the logits"
    if model_type in PLAIN_HEADS:
        assert model.instrumentation.head is not None, model.instrumentation.head_reason
    if model_type in CHANGED_LOGITS:
        assert model.instrumentation.head is None and "after lm_head" in model.instrumentation.head_reason
    for site in model.sites:
        assert site.verification is not None and site.verification.status in ("verified", "partial", "capture")
        if site.verification.status != "verified":
            assert site.verification.reason, site
    if all(site.spec.substitutable for site in model.sites):
        huge = run_prompt(model, PROMPT, HUGE)
        torch.testing.assert_close(huge.output.vocab_logprobs, native.output.vocab_logprobs, rtol=1e-5, atol=1e-5)
        for lt, site in zip(native.layers, model.sites, strict=True):
            mine = select_topk(site.spec, lt.router_logits, site.spec.top_k, _bias(model, site))
            assert torch.equal(mine.sort(-1).values, lt.native_index.sort(-1).values), site.path
            weights = gate_weights(site.spec, lt.router_logits, lt.native_index)  # (T, k) in the native order
            torch.testing.assert_close(weights, lt.native_weights, rtol=1e-5, atol=1e-6)
        one = run_prompt(model, PROMPT, TopK(1))
        assert not torch.allclose(one.output.vocab_logprobs, native.output.vocab_logprobs)
    elif any(site.spec.substitutable for site in model.sites):  # mixed (DeepSeek-V4: hash-routed layers)
        one = run_prompt(model, PROMPT, TopK(1))
        held = [site.layer for site in model.sites if not site.spec.substitutable]
        assert one.held_native_layers == held  # labelled, not silently re-routed
        for lt in one.layers:
            assert (lt.index.shape[1] == 1) != lt.held_native
    elif all(site.spec.exposes_native for site in model.sites):  # partial support
        huge = run_prompt(model, PROMPT, HUGE)
        torch.testing.assert_close(huge.output.vocab_logprobs, native.output.vocab_logprobs, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="partial support"):
            run_prompt(model, PROMPT, TopK(1))
    else:
        with pytest.raises(ValueError, match="capture-only|partial support"):
            run_prompt(model, PROMPT, TopK(1))


def _bias(model, site) -> torch.Tensor | None:
    module = model.model.get_submodule(site.path)
    parent = model.model.get_submodule(site.path.rsplit(".", 1)[0])
    if site.spec.bias_path is None or site.spec.bias_path.startswith("arg"):
        return None if site.spec.bias_path is None else parent.e_score_correction_bias
    return site.spec.selection_bias(module, parent)


def test_the_verified_families_at_least_double_the_hand_written_list():
    from moe_viz._routers import SUPPORTED_ROUTERS

    verified = []
    for model_type in FAMILIES:
        try:
            net = build_family(model_type)
            model = wrap_model(net, ByteTokenizer(), model_type)
        except Exception:  # not buildable tiny, or no router: counted by the test above
            continue
        if model.sites and any(site.spec.substitutable for site in model.sites):
            verified.append(model_type)
    assert len(verified) >= 2 * 18, (len(verified), verified)
    assert len(verified) > len(SUPPORTED_ROUTERS)


class TemperedRouter(nn.Module):
    """A router with a twist no grammar covers: softmax at temperature 0.7, then top-k, renormalised."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.weight = original.weight
        self.top_k = original.top_k
        self.num_experts = original.num_experts

    def forward(self, hidden: torch.Tensor):
        logits = nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), self.weight)  # (T, E)
        probs = (logits / 0.7).softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), index


def test_a_router_with_a_twist_gets_partial_support_and_the_closest_candidate_is_named():
    net = build_model("mixtral")
    for layer in net.model.layers:
        layer.mlp.gate = TemperedRouter(layer.mlp.gate)
    model = wrap_model(net, ByteTokenizer(), "tempered")
    site = model.sites[0]
    assert site.router_class == "TemperedRouter"  # found by what it returns, not by its name
    assert site.spec.family == "native" and site.verification.status == "partial"
    assert "the closest, softmax" in site.verification.reason
    assert "differed" in site.verification.reason or "other experts" in site.verification.reason
    native = run_prompt(model, PROMPT)
    capped = run_prompt(model, PROMPT, Capacity(0.5))
    assert capped.layers[0].dropped_count > 0
    assert torch.equal(capped.layers[0].index, native.layers[0].native_index)  # the router's own choice
    with pytest.raises(ValueError, match="the closest, softmax"):
        run_prompt(model, PROMPT, TopK(1))


def test_readme_table_of_families_is_what_these_tests_prove():
    from pathlib import Path

    from tiny_models import family_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("<!-- family table: generated by python scripts/family_table.py -->\n")
    end = readme.index("<!-- end family table -->")
    assert readme[start:end].split("\n", 1)[1].strip() == family_table().strip()


def test_inspect_prints_one_line_per_router_with_its_spec_and_check(capsys):
    from moe_viz.cli import main

    assert main(["inspect", "default"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("routing maths verified on load for 4 routers")
    assert len(out) == 6
    for line in out[1:5]:
        assert "MixtralTopKRouter" in line and "E=8 k=2" in line and "spec: softmax, renormalised" in line
        assert "verified (known class) on" in line and "experts 100% equal" in line and "every policy" in line
    assert out[5].startswith("output head: returns lm_head's output unchanged (checked at load, bit for bit)")


def test_inspect_names_why_a_partial_router_refuses_other_k():
    from moe_viz.cli import router_lines

    model = wrap_model(build_family("minimax_m3_vl_text"), ByteTokenizer(), "minimax_m3_vl_text")
    lines = router_lines(model)
    assert lines and all(
        "partial: no spec of the grammar reproduces this router; the closest" in line for line in lines
    )
    assert all("runs: native, capacity at k=2" in line for line in lines)
    assert f"partial support on {len(lines)}" in model.routing_summary


def test_a_multimodal_checkpoint_with_an_moe_text_stack_loads_and_runs_text(tmp_path):
    from tiny_models import save_byte_tokenizer

    from moe_viz import load_model

    build_family("qwen3_vl_moe").save_pretrained(tmp_path / "vl")
    save_byte_tokenizer(tmp_path / "vl")
    model = load_model(str(tmp_path / "vl"))
    assert type(model.model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert model.sites and all(site.verification.status == "verified" for site in model.sites)
    native = run_prompt(model, "TEXT ALONE")
    capped = run_prompt(model, "TEXT ALONE", Capacity(0.5))
    assert native.num_tokens == 10 and sum(lt.dropped_count for lt in capped.layers) > 0
