"""Routing written in each engine's own layout (``engine_writers``) imports back to the experts
moe-viz computed: vLLM by release, SGLang answers and recorder dumps, Megatron-LM's router trace
and llama.cpp's moe-trace CSV. Each quirk of a format has its own test, unsafe pickles are
refused, and malformed files give a one-line ValueError naming the problem."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_writers import (
    decoder_ids,
    llamacpp_rows,
    npy_bytes,
    physical_map,
    ranked_ids,
    sglang_counts,
    sglang_generate_answer,
    sglang_openai_answer,
    sglang_passes,
    sglang_routed_experts,
    vllm_answer,
    vllm_layout,
    vllm_routed_experts,
    write_json,
    write_llamacpp,
    write_megatron,
    write_sglang_detail,
    write_sglang_stat,
    write_vllm_npy,
)
from tiny_models import build

from moe_viz import metrics, run_prompt, views
from moe_viz.engines import ModelShape, import_routing

TEXT = "Serving engines record which experts every token took, and nothing else."
OTHER = "A second request, routed on another rank."
VERSIONS = ["0.14.0", "0.17.0", "0.20.0", "0.21.0", "0.22.0", "0.34.0"]
PROMPT = 15  # tokens of TEXT sent as the prompt; the rest were generated


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


@pytest.fixture(scope="module")
def deepseek():
    return build("deepseek_v3")  # decoder layer 0 dense, layer 1 MoE


@pytest.fixture(scope="module")
def computed(mixtral):
    return run_prompt(mixtral, TEXT)


@pytest.fixture(scope="module")
def other(mixtral):
    return run_prompt(mixtral, OTHER)


@pytest.fixture(scope="module")
def dense_first(deepseek):
    return run_prompt(deepseek, TEXT)


def same_selection(imported, computed, rows=slice(None), ranked=True) -> None:
    """The import routes every token of every MoE layer to the experts of ``computed[rows]``; and,
    where the format is ranked, to the same first choice."""
    assert imported.layer_ids == computed.layer_ids
    for got, want in zip(imported.layers, computed.layers, strict=True):
        assert got.num_experts == want.num_experts
        assert metrics.membership(got).equal(metrics.membership(want)[rows])
        if ranked:
            assert metrics.first_choice(got).equal(metrics.first_choice(want)[rows])


def refused(match: str, fn, *args, **kwargs) -> str:
    """The one-line ValueError ``fn`` raises."""
    with pytest.raises(ValueError, match=match) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message, message
    return message


# ----------------------------------------------------------------------------- vLLM
@pytest.mark.parametrize("version", VERSIONS)
def test_vllm_routed_experts_of_every_release_import_to_the_same_experts_without_the_last_token(
    tmp_path, mixtral, computed, version
):
    path = write_vllm_npy(tmp_path / "routed.npy", computed, mixtral.num_layers, version)
    want = {"0.21": np.int16, "0.22": np.uint8, "0.34": np.uint8}.get(version[:4], np.int32)
    assert np.load(path).dtype == want and np.load(path).shape == (computed.num_tokens - 1, 2, 2)
    imported = import_routing("vllm", path, ModelShape.of(mixtral), token_ids=computed.token_ids)
    trace = imported.trace()
    same_selection(trace, computed, slice(0, -1))
    assert trace.token_ids == computed.token_ids[:-1] and trace.tokens == computed.tokens[:-1]
    assert "last token has no routing" in trace.source


def test_vllm_uint16_arrays_of_models_with_more_than_256_experts_import_the_same(tmp_path, mixtral, computed):
    assert vllm_layout("0.22.0", 257)[0] == np.uint16 and vllm_layout("0.34.0", 256)[0] == np.uint8
    rows = vllm_routed_experts(computed, mixtral.num_layers, "0.22.0").astype(np.uint16)
    np.save(tmp_path / "routed.npy", rows)
    trace = import_routing("vllm", tmp_path / "routed.npy", ModelShape.of(mixtral)).trace()
    same_selection(trace, computed, slice(0, -1))


@pytest.mark.parametrize("version", ["0.20.0", "0.22.0"])
def test_vllm_zero_filled_dense_layers_are_left_out_with_or_without_the_model(tmp_path, deepseek, dense_first, version):
    path = write_vllm_npy(tmp_path / "routed.npy", dense_first, deepseek.num_layers, version)
    assert (np.load(path)[:, 0] == 0).all()  # decoder layer 0 is dense: never written
    named = import_routing("vllm", path, ModelShape.of(deepseek)).trace()
    same_selection(named, dense_first, slice(0, -1))
    assert "1 dense layers left out" in named.source
    guessed = import_routing("vllm", path, ModelShape(num_experts=8)).trace()
    same_selection(guessed, dense_first, slice(0, -1))
    assert "zero-filled dense layers left out (decoder layers [0])" in guessed.source


def test_vllm_021_arrays_hold_moe_layers_only_and_take_their_layer_ids_from_the_model(tmp_path, deepseek, dense_first):
    path = write_vllm_npy(tmp_path / "routed.npy", dense_first, deepseek.num_layers, "0.21.0")
    assert np.load(path).shape[1] == 1  # one slot per MoE layer, no dense slot
    trace = import_routing("vllm", path, ModelShape.of(deepseek)).trace()
    same_selection(trace, dense_first, slice(0, -1))
    assert "vLLM 0.21 layout" in trace.source


def test_vllm_021_answer_joins_the_prompt_rows_and_the_choices_rows_and_its_token_ids(tmp_path, mixtral, computed):
    answer = vllm_answer(computed, mixtral.num_layers, "0.21.0", PROMPT)
    assert len(answer["prompt_routed_experts"]) == PROMPT  # top level, nested lists
    assert len(answer["choices"][0]["routed_experts"]) == computed.num_tokens - 1 - PROMPT
    imported = import_routing("vllm", write_json(tmp_path / "a.json", answer), ModelShape.of(mixtral))
    trace = imported.trace()
    same_selection(trace, computed, slice(0, -1))
    assert trace.token_ids == computed.token_ids[:-1]
    assert imported.traces[0][0] == "choice 0"


def test_vllm_021_answer_with_one_generated_token_imports_from_the_prompt_rows_alone(tmp_path, mixtral, computed):
    prompt = computed.num_tokens - 1  # max_tokens=1: the generated part is empty, so vLLM sends None
    answer = vllm_answer(computed, mixtral.num_layers, "0.21.0", prompt)
    assert answer["choices"][0]["routed_experts"] is None
    trace = import_routing("vllm", write_json(tmp_path / "a.json", answer), ModelShape.of(mixtral)).trace()
    same_selection(trace, computed, slice(0, -1))
    assert trace.token_ids == computed.token_ids[:-1]


@pytest.mark.parametrize("version", ["0.22.0", "0.34.0"])
def test_vllm_base64_npy_answers_import_with_the_answers_token_ids(tmp_path, mixtral, computed, version):
    answer = vllm_answer(computed, mixtral.num_layers, version, PROMPT)
    assert "prompt_routed_experts" not in answer
    decoded = np.load(io.BytesIO(base64.b64decode(answer["choices"][0]["routed_experts"])))
    assert decoded.dtype == np.uint8 and decoded.shape == (computed.num_tokens - 1, 2, 2)
    trace = import_routing("vllm", write_json(tmp_path / "a.json", answer), ModelShape.of(mixtral)).trace()
    same_selection(trace, computed, slice(0, -1))
    assert trace.token_ids == computed.token_ids[:-1] and trace.tokens == computed.tokens[:-1]


def test_vllm_answers_without_token_ids_take_the_users(tmp_path, mixtral, computed):
    answer = vllm_answer(computed, mixtral.num_layers, "0.22.0", PROMPT, token_ids=False)
    path = write_json(tmp_path / "a.json", answer)
    bare = import_routing("vllm", path, ModelShape.of(mixtral)).trace()
    assert bare.token_ids == [-1] * (computed.num_tokens - 1)
    given = import_routing("vllm", path, ModelShape.of(mixtral), token_ids=computed.token_ids).trace()
    assert given.token_ids == computed.token_ids[:-1]


def test_vllm_routed_experts_prompt_start_skips_the_first_tokens(tmp_path, mixtral, computed):
    answer = vllm_answer(computed, mixtral.num_layers, "0.34.0", PROMPT, prompt_start=4)
    trace = import_routing("vllm", write_json(tmp_path / "a.json", answer), ModelShape.of(mixtral)).trace()
    same_selection(trace, computed, slice(4, -1))
    assert trace.token_ids == computed.token_ids[4:-1]
    assert "the first 4 tokens have no routing" in trace.source


def test_vllm_a_bare_base64_string_or_nested_lists_import_too(tmp_path, mixtral, computed):
    rows = vllm_routed_experts(computed, mixtral.num_layers, "0.22.0")
    for data in (base64.b64encode(npy_bytes(rows)).decode(), rows.tolist(), {"routed_experts": rows.tolist()}):
        trace = import_routing("vllm", write_json(tmp_path / "r.json", data), ModelShape.of(mixtral)).trace()
        same_selection(trace, computed, slice(0, -1))


# ----------------------------------------------------------------------------- SGLang per request
def test_sglang_generate_answer_imports_to_the_same_experts_without_the_last_token(tmp_path, mixtral, computed):
    path = write_json(tmp_path / "g.json", sglang_generate_answer(computed, mixtral.num_layers))
    trace = import_routing("sglang", path, ModelShape.of(mixtral), token_ids=computed.token_ids).trace()
    same_selection(trace, computed, slice(0, -1))
    assert trace.token_ids == computed.token_ids[:-1] and "last token has no routing" in trace.source


def test_sglang_openai_answer_reads_sglext_and_leaves_the_zero_filled_dense_layer_out(tmp_path, deepseek, dense_first):
    answer = sglang_openai_answer(dense_first, deepseek.num_layers)
    raw = np.frombuffer(base64.b64decode(answer["sglext"]["routed_experts"]), "<i4").reshape(-1, 2, 2)
    assert (raw[:, 0] == 0).all()  # every hidden layer, the dense one zero
    path = write_json(tmp_path / "o.json", answer)
    trace = import_routing("sglang", path, ModelShape.of(deepseek), token_ids=dense_first.token_ids).trace()
    same_selection(trace, dense_first, slice(0, -1))
    assert trace.layer_ids == [1] and "dense layers left out" in trace.source


def test_sglang_routed_experts_start_len_skips_the_first_tokens(tmp_path, mixtral, computed):
    path = write_json(tmp_path / "g.json", sglang_generate_answer(computed, mixtral.num_layers, start_len=3))
    trace = import_routing("sglang", path, ModelShape.of(mixtral), token_ids=computed.token_ids).trace()
    same_selection(trace, computed, slice(3, -1))
    assert trace.token_ids == computed.token_ids[3:-1] and "the first 3 tokens have no routing" in trace.source


def test_sglang_a_batch_of_answers_makes_one_trace_per_request(tmp_path, mixtral, computed, other):
    answers = [sglang_generate_answer(t, mixtral.num_layers) for t in (computed, other)]
    imported = import_routing("sglang", write_json(tmp_path / "b.json", answers), ModelShape.of(mixtral))
    assert [label for label, _ in imported.traces] == ["request 0", "request 1"]
    same_selection(imported.trace(0), computed, slice(0, -1))
    same_selection(imported.trace(1), other, slice(0, -1))


def test_sglang_flat_buffer_needs_the_model_to_be_cut_into_layers(tmp_path, mixtral, computed):
    path = write_json(tmp_path / "g.json", sglang_generate_answer(computed, mixtral.num_layers))
    refused("name the model", import_routing, "sglang", path)


# ----------------------------------------------------------------------------- SGLang recorder dumps
def test_sglang_per_token_dumps_of_two_ranks_map_physical_slots_back_to_the_same_experts(
    tmp_path, mixtral, computed, other
):
    mapping = physical_map(mixtral.num_layers, 8)  # 10 physical slots: experts 0 and 3 replicated
    passes = sglang_passes({0: [computed], 1: [other]}, mixtral.num_layers, decode_steps=2)
    files = write_sglang_detail(tmp_path, passes, mapping, "per_token")
    assert [f.name for f in files] == [
        "expert_distribution_recorder_1764700000.5_0.pt",
        "expert_distribution_recorder_1764700000.5_1.pt",
    ]
    dump = torch.load(files[0], weights_only=True)
    topk = dump["records"][0]["topk_ids_of_layer"]
    assert topk.dtype == torch.int32 and topk.shape[2] == 8 and (topk[:, :, 2:] == -1).all()  # -1 padding
    assert (topk >= 8).any()  # replica slots 8 and 9 are used
    imported = import_routing("sglang-dump", tmp_path, ModelShape.of(mixtral))
    assert len(imported.traces) == 2  # one per extend sequence; decode passes make none
    labels = [label for label, _ in imported.traces]
    assert labels == ["pass 0 rank 0, sequence 0", "pass 0 rank 1, sequence 0"]
    for (_, trace), want in zip(imported.traces, (computed, other)):
        same_selection(trace, want, slice(0, -2))
        assert trace.token_ids == want.token_ids[:-2] and trace.tokens == want.tokens[:-2]
    assert "physical slots mapped to logical experts" in imported.notes[0]
    counts = sum(sglang_counts(ranked_ids(t), 8) for t in (computed, other))  # (L, E) logical
    assert np.array_equal(imported.counts.assigned.sum(axis=(0, 2)), counts)
    assert imported.counts.chunks_done == 3  # one extend pass + 2 decode passes, the ranks summed per pass


def test_sglang_per_token_dense_layers_read_minus_one_and_are_left_out(tmp_path, deepseek, dense_first):
    mapping = physical_map(deepseek.num_layers, 8)
    passes = sglang_passes({0: [dense_first]}, deepseek.num_layers, decode_steps=1)
    write_sglang_detail(tmp_path, passes, mapping, "per_token")
    imported = import_routing("sglang-dump", tmp_path, ModelShape.of(deepseek))
    trace = imported.trace()
    same_selection(trace, dense_first, slice(0, -1), ranked=True)
    assert trace.layer_ids == [1]
    assert imported.counts.meta.layers == (1,)


def test_sglang_per_pass_dumps_count_logical_experts_over_ranks_and_make_no_trace(tmp_path, mixtral, computed, other):
    mapping = physical_map(mixtral.num_layers, 8, replicas=(1, 5))
    passes = sglang_passes({0: [computed], 1: [other]}, mixtral.num_layers, decode_steps=3)
    write_sglang_detail(tmp_path, passes, mapping, "per_pass")
    imported = import_routing("sglang-dump", tmp_path, ModelShape.of(mixtral))
    assert imported.traces == [] and imported.counts.chunks_done == 4
    counts = sum(sglang_counts(ranked_ids(t), 8) for t in (computed, other))
    assert np.array_equal(imported.counts.assigned.sum(axis=(0, 2)), counts)
    # per pass: rank 0's and rank 1's tokens of the pass add up
    extend = sum(sglang_counts(ranked_ids(t)[:-3], 8) for t in (computed, other))
    assert np.array_equal(imported.counts.assigned[0, :, 0, :], extend)


def test_sglang_ranks_with_different_physical_maps_are_refused(tmp_path, mixtral, computed, other):
    passes = sglang_passes({0: [computed]}, mixtral.num_layers, decode_steps=1)
    write_sglang_detail(tmp_path, passes, physical_map(mixtral.num_layers, 8), "per_pass", time=1.0)
    passes = sglang_passes({1: [other]}, mixtral.num_layers, decode_steps=1)
    write_sglang_detail(tmp_path, passes, physical_map(mixtral.num_layers, 8, (2, 4)), "per_pass", time=1.0)
    refused("physical-to-logical maps differ", import_routing, "sglang-dump", tmp_path, ModelShape.of(mixtral))


def test_sglang_stat_dump_counts_equal_the_written_counts(tmp_path, mixtral, computed):
    ids = decoder_ids(computed, mixtral.num_layers)  # (T, L, k)
    steps = [ids[a : a + 5] for a in range(0, computed.num_tokens, 5)]
    logical_count = np.stack([sglang_counts(s, 8) for s in steps])  # (steps, L, E)
    path = write_sglang_stat(tmp_path, logical_count)
    imported = import_routing("sglang-dump", path, ModelShape.of(mixtral))
    assert imported.traces == [] and imported.counts.chunks_done == len(steps)
    assert np.array_equal(imported.counts.assigned.sum(axis=(0, 2)), logical_count.sum(axis=0))
    assert imported.counts.total_tokens == computed.num_tokens
    refused(r"name the model \(or give top_k\)", import_routing, "sglang-dump", path)


def test_sglang_stat_dump_drops_the_dense_layers_zero_counts(tmp_path, deepseek, dense_first):
    ids = ranked_ids(dense_first)  # (T, 1, k): MoE layer 1
    logical_count = np.zeros((1, deepseek.num_layers, 8), np.int64)
    logical_count[0, 1] = np.bincount(ids.reshape(-1), minlength=8)
    imported = import_routing("sglang-dump", write_sglang_stat(tmp_path, logical_count), ModelShape.of(deepseek))
    assert imported.counts.meta.layers == (1,)
    assert np.array_equal(imported.counts.assigned.sum(axis=(0, 2))[0], logical_count[0, 1])


# ----------------------------------------------------------------------------- Megatron-LM
def test_megatron_rows_in_expert_id_order_give_the_same_experts_but_no_first_choice(tmp_path, mixtral, computed):
    folder = write_megatron(tmp_path, {0: [computed]})
    first = json.loads((folder / "router_trace_rank0.jsonl").read_text().splitlines()[0])
    assert all(row == sorted(row) for row in first["top_indices"])
    imported = import_routing("megatron", folder, ModelShape.of(mixtral), token_ids=computed.token_ids)
    trace = imported.trace()
    same_selection(trace, computed, ranked=False)
    assert trace.token_ids == computed.token_ids  # Megatron routes every token it is given
    assert not any(lt.first_choice_known for lt in trace.layers)
    with pytest.raises(ValueError, match="has no first choice"):
        metrics.first_choice(trace.layers[0])
    assert any("first choice" in reason for reason in views.unavailable(trace))
    names = [v.name for v in views.import_views(trace, trace.layer_ids[0])]
    assert "coloured_text" not in names and "routing_heatmap" in names


def test_megatron_logits_sidecar_restores_the_first_choice_and_the_scores(tmp_path, mixtral, computed):
    folder = write_megatron(tmp_path, {0: [computed]}, logits=True, score_function="softmax")
    trace = import_routing("megatron", folder, ModelShape.of(mixtral)).trace()
    same_selection(trace, computed, ranked=True)
    for got, want in zip(trace.layers, computed.layers):
        assert got.scores_recorded and got.first_choice_known
        bf16 = want.router_logits.bfloat16().float()  # what the sidecar holds
        assert got.router_logits.equal(bf16) and torch.allclose(got.router_probs, bf16.softmax(-1), atol=1e-6)
        assert torch.allclose(got.router_probs, want.router_probs, atol=0.02)  # bf16 tolerance
    assert "softmax assumed" not in trace.source
    assert not any("first choice" in reason for reason in views.unavailable(trace))
    assert "coloured_text" in [v.name for v in views.import_views(trace, trace.layer_ids[0])]


def test_megatron_sigmoid_routers_score_with_the_dumped_score_function(tmp_path, deepseek, dense_first):
    folder = write_megatron(tmp_path, {0: [dense_first]}, logits=True, score_function="sigmoid")
    trace = import_routing("megatron", folder, ModelShape.of(deepseek)).trace()
    same_selection(trace, dense_first, ranked=True)
    lt = trace.layers[0]
    assert lt.router_family == "sigmoid" and trace.layer_ids == [1]
    assert torch.allclose(lt.router_probs, dense_first.layers[0].router_probs, atol=0.02)  # bf16 tolerance


def test_megatron_logits_without_the_router_state_assume_softmax(tmp_path, mixtral, computed):
    folder = write_megatron(tmp_path, {0: [computed]}, logits=True)
    trace = import_routing("megatron", folder, ModelShape.of(mixtral)).trace()
    same_selection(trace, computed, ranked=True)
    assert "softmax assumed" in trace.source


def test_megatron_per_rank_files_of_a_folder_make_a_trace_per_rank(tmp_path, mixtral, computed, other):
    folder = write_megatron(tmp_path, {0: [computed], 1: [other]}, logits=True, score_function="softmax")
    imported = import_routing("megatron", folder, ModelShape.of(mixtral), token_ids=computed.token_ids)
    assert [label for label, _ in imported.traces] == ["rank 0, step 0", "rank 1, step 0"]
    same_selection(imported.trace(0), computed)
    same_selection(imported.trace(1), other)
    assert imported.trace(0).token_ids == [-1] * computed.num_tokens  # ids are one sequence's: not attached
    want = sglang_counts(ranked_ids(computed), 8) + sglang_counts(ranked_ids(other), 8)
    assert np.array_equal(imported.counts.assigned.sum(axis=(0, 2)), want)
    one = import_routing("megatron", folder / "router_trace_rank1.jsonl", ModelShape.of(mixtral))
    same_selection(one.trace(), other)  # one rank's file alone, its logits beside it


@pytest.mark.parametrize("logits", [False, True])
def test_megatron_skipped_layer_records_are_counted_but_make_no_trace(tmp_path, mixtral, computed, other, logits):
    folder = write_megatron(tmp_path, {0: [computed, other]}, logits=logits, skip=((0, 1, 1),))
    imported = import_routing("megatron", folder, ModelShape.of(mixtral))
    assert [label for label, _ in imported.traces] == ["rank 0, step 0"]
    same_selection(imported.trace(), computed, ranked=logits)
    assert any("Megatron skipped some of their layer records" in note for note in imported.notes)
    counts = sglang_counts(ranked_ids(computed), 8)
    counts[0] += sglang_counts(ranked_ids(other), 8)[0]  # step 1 counts in layer 0 only
    assert np.array_equal(imported.counts.assigned.sum(axis=(0, 2)), counts)
    assert imported.counts.chunks_done == 2


# ----------------------------------------------------------------------------- llama.cpp
def test_llamacpp_ubatches_and_decode_steps_import_to_the_same_ranked_experts(tmp_path, mixtral, computed):
    path = write_llamacpp(tmp_path / "moe_trace.csv", computed, prompt_len=PROMPT, n_ubatch=6)
    assert path.read_text().splitlines()[0].count(",") == 1  # no header: "layer,expert" integers
    imported = import_routing("llamacpp", path, ModelShape.of(mixtral), token_ids=computed.token_ids)
    trace = imported.trace()
    same_selection(trace, computed)
    assert trace.token_ids == computed.token_ids
    ubatches = 3 + computed.num_tokens - PROMPT  # 6 + 6 + 3 prompt tokens, then one per decode step
    assert imported.counts.chunks_done == ubatches and f"{ubatches} ubatches" in imported.traces[0][0]
    assert np.array_equal(imported.counts.assigned.sum(axis=(0, 2)), sglang_counts(ranked_ids(computed), 8))
    assert "may mis-read prompt rows" in trace.source


def test_llamacpp_top_k_is_inferred_from_the_decode_blocks(tmp_path, computed):
    path = write_llamacpp(tmp_path / "moe_trace.csv", computed, prompt_len=PROMPT, n_ubatch=PROMPT)
    trace = import_routing("llamacpp", path, ModelShape(num_experts=8)).trace()
    same_selection(trace, computed)
    assert "top-k 2 inferred from the block sizes" in trace.source
    assert [lt.applied_k for lt in trace.layers] == [2, 2]


def test_llamacpp_without_decode_steps_or_the_model_the_top_k_is_refused(tmp_path, mixtral, computed):
    path = write_llamacpp(tmp_path / "moe_trace.csv", computed, prompt_len=computed.num_tokens, n_ubatch=512)
    refused("does not tell how many experts each token took", import_routing, "llamacpp", path)
    named = import_routing("llamacpp", path, ModelShape.of(mixtral)).trace()
    same_selection(named, computed)


def test_llamacpp_only_moe_layers_are_written(tmp_path, deepseek, dense_first):
    rows = llamacpp_rows(dense_first, prompt_len=PROMPT, n_ubatch=8)
    assert {layer for layer, _ in rows} == {1}
    path = write_llamacpp(tmp_path / "moe_trace.csv", dense_first, prompt_len=PROMPT, n_ubatch=8)
    trace = import_routing("llamacpp", path, ModelShape.of(deepseek)).trace()
    same_selection(trace, dense_first)
    assert trace.layer_ids == [1]


# ----------------------------------------------------------------------------- safe loading
class Payload:
    """Unpickling it would create ``marker``: proof that no code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Opaque:
    """A plain instance of a class of this module."""


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda marker: {"records": [Payload(marker)], "last_physical_to_logical_map": None}, id="object"),
        pytest.param(lambda marker: {"logical_count": Payload(marker)}, id="nested-object"),
        pytest.param(lambda marker: {"records": [], "hook": print}, id="function"),
        pytest.param(lambda marker: {"records": [], "hook": os.system}, id="os-system"),
        pytest.param(lambda marker: {"logical_count": Opaque()}, id="instance"),
    ],
)
def test_a_pt_holding_pickled_python_objects_is_refused_without_running_them(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    torch.save(payload(marker), path)
    message = refused("cannot be loaded safely|can load safely", import_routing, "sglang-dump", path)
    assert "weights_only" in message and path.name in message and "pickled Python object" in message
    assert not marker.exists()


def test_an_unsafe_megatron_router_state_is_not_run_and_only_costs_the_score_function(tmp_path, mixtral, computed):
    folder = write_megatron(tmp_path, {0: [computed]}, logits=True)
    marker = tmp_path / "ran"
    torch.save({("decoder", None, 0): Payload(marker)}, folder / "router_state_rank0.pt")
    trace = import_routing("megatron", folder, ModelShape.of(mixtral)).trace()
    assert not marker.exists() and "softmax assumed" in trace.source
    same_selection(trace, computed)


def test_a_pickled_object_array_in_an_npy_is_refused(tmp_path):
    path = tmp_path / "routed.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    refused("not a readable .npy array", import_routing, "vllm", path)


# ----------------------------------------------------------------------------- malformed files
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _vllm(tmp, c):
    return vllm_routed_experts(c, 2, "0.22.0")


def _sg_answer(text: str) -> dict:
    return {"text": "", "meta_info": {"routed_experts": text}}


def _megatron_line(tmp, c, **change) -> Path:
    folder = write_megatron(tmp / "m", {0: [c]}, logits=True)
    path = folder / "router_trace_rank0.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record.update(change)
    path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    return folder


def _truncated_jsonl(tmp, c) -> Path:
    folder = write_megatron(tmp / "m", {0: [c]})
    path = folder / "router_trace_rank0.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the last line cut short
    return folder


def _truncated_logits(tmp, c) -> Path:
    folder = write_megatron(tmp / "m", {0: [c]}, logits=True)
    path = folder / "logits_rank0.bin"
    path.write_bytes(path.read_bytes()[:-10])
    return folder


def _csv(text: str):
    def make(tmp, c):
        path = tmp / "moe_trace.csv"
        path.write_text(text)
        return path

    return make


def _file(name: str, data):
    def make(tmp, c):
        path = tmp / name
        if callable(data):
            value = data(tmp, c)
        else:
            value = data
        if isinstance(value, bytes):
            path.write_bytes(value)
        elif isinstance(value, np.ndarray):
            np.save(path, value)
        elif isinstance(value, dict) and name.endswith(".pt"):
            torch.save(value, path)
        else:
            path.write_text(value if isinstance(value, str) else json.dumps(value))
        return path

    return make


MALFORMED = [
    # vLLM
    (
        "vllm",
        _file("r.npy", lambda t, c: _vllm(t, c)[:, :, 0]),
        r"must have 3 axes \(tokens, layers, top_k\); got shape \(\d+, 2\)",
    ),
    ("vllm", _file("r.npy", lambda t, c: _vllm(t, c).astype(np.float32)), "must hold integers; got dtype float32"),
    ("vllm", _file("r.npy", lambda t, c: npy_bytes(_vllm(t, c))[:-7]), "r.npy is not a readable .npy array"),
    ("vllm", _file("r.npy", b""), "r.npy is not a readable .npy array"),
    ("vllm", _file("r.json", b""), "neither an .npy array nor JSON"),
    ("vllm", _file("r.json", {"choices": [{"routed_experts": "AAAA*"}]}), "neither nested lists nor base64"),
    (
        "vllm",
        _file("r.json", lambda t, c: {"choices": [{"routed_experts": _b64(npy_bytes(_vllm(t, c))[:-12])}]}),
        r"choices\[0\]\.routed_experts is not a readable .npy array",
    ),
    ("vllm", _file("r.json", {"choices": [{"message": {}}]}), "choice 0 has no routed_experts"),
    ("vllm", _file("r.json", {"object": "chat.completion", "id": "x"}), "holds no vLLM routed_experts"),
    ("vllm", _file("r.json", {"choices": [{"routed_experts": [[[1, 2]], [[3]]]}]}), "is ragged"),
    ("vllm", _file("r.json", {"choices": [{"routed_experts": [[1.5, 2.0]]}]}), r"must be integer lists of shape"),
    ("vllm", _file("r.json", {"choices": [{"routed_experts": []}]}), "routed_experts is empty"),
    # SGLang per request
    ("sglang", _file("g.json", b""), "g.json is not JSON"),
    ("sglang", _file("g.json", lambda t, c: _sg_answer(sglang_routed_experts(c, 2)[:-4])), "not a whole number of"),
    (
        "sglang",
        _file("g.json", lambda t, c: _sg_answer(_b64(base64.b64decode(sglang_routed_experts(c, 2))[:-2]))),
        "not a whole number of int32 values",
    ),
    (
        "sglang",
        _file("g.json", lambda t, c: _sg_answer(_b64(base64.b64decode(sglang_routed_experts(c, 2))[:-4]))),
        r"holds \d+ ids, not a whole number of tokens × 2 layers × top-2",
    ),
    ("sglang", _file("g.json", _sg_answer("!!not base64")), "routed_experts is not base64"),
    ("sglang", _file("g.json", {"text": "hi", "meta_info": {"id": "x"}}), "has no routed_experts in meta_info"),
    ("sglang", _file("g.json", "[1, 2]"), "has no routed_experts|not an SGLang answer|holds no routing"),
    ("sglang", _file("g.json", '"text"'), "not an SGLang answer"),
    # SGLang recorder dumps
    ("sglang-dump", _file("d.pt", b""), "d.pt is not a recorder dump moe-viz can load safely"),
    ("sglang-dump", _file("d.pt", b"not a zip file at all"), "d.pt is not a recorder dump moe-viz can load safely"),
    (
        "sglang-dump",
        _file("d.pt", {"logical_count": torch.ones((2, 2, 8))}),
        r"logical_count must be an integer tensor with 3 axes; got \(2, 2, 8\) torch.float32",
    ),
    (
        "sglang-dump",
        _file("d.pt", {"logical_count": torch.ones((2, 8), dtype=torch.int32)}),
        "logical_count must be an integer tensor with 3 axes",
    ),
    ("sglang-dump", _file("d.pt", {"weights": torch.ones(2)}), "not an SGLang expert-distribution dump"),
    (
        "sglang-dump",
        _file(
            "d.pt", {"records": [{"rank": 0}], "last_physical_to_logical_map": torch.zeros((2, 8), dtype=torch.int32)}
        ),
        "holds a record without forward_pass_id",
    ),
    # Megatron-LM
    ("megatron", _truncated_jsonl, "router_trace_rank0.jsonl line 2 is not JSON"),
    ("megatron", _truncated_logits, "logits_rank0.bin ends before the record's logits"),
    (
        "megatron",
        lambda t, c: _megatron_line(t, c, num_tokens=5),
        r"top_indices has shape \(\d+, 2\), expected num_tokens × topk = \(5, 2\)",
    ),
    ("megatron", lambda t, c: _megatron_line(t, c, top_indices=[[0.5, 1.5]] * 21), r"top_indices has shape"),
    (
        "megatron",
        lambda t, c: _megatron_line(t, c, logit_shape=[c.num_tokens, 4]),
        r"logit_shape \(\d+, 4\) and logit_bytes \d+ do not fit",
    ),
    ("megatron", _file("router_trace_rank0.jsonl", b""), "router_trace_rank0.jsonl holds no record"),
    ("megatron", _file("router_trace_rank0.jsonl", '{"step": 0}\n'), "line 1 is not a router-trace record: no block"),
    ("megatron", _file("router_trace_rank0.jsonl", "[1, 2]\n"), "line 1 is not a router-trace record"),
    ("megatron", lambda t, c: t, "holds no router_trace_rank"),
    # llama.cpp
    ("llamacpp", _csv("layer,expert\n0,1\n0,2\n"), "line 1 is not 'layer,expert' integers: 'layer,expert'"),
    ("llamacpp", _csv("0,1\n0,2\n1,3\njunk\n"), "line 4 is not 'layer,expert' integers: 'junk'"),
    ("llamacpp", _csv("0,1,2\n"), "line 1 is not 'layer,expert' integers"),
    ("llamacpp", _csv("0,-1\n"), "negative layer or expert"),
    ("llamacpp", _csv(""), "holds no 'layer,expert' row"),
    ("llamacpp", _csv("0,1\n0,2\n0,3\n1,4\n1,5\n0,6\n0,7\n"), "holds 3 rows|not a whole number|tell how many"),
]


@pytest.mark.parametrize(("fmt", "make", "match"), MALFORMED, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(MALFORMED)])
def test_a_malformed_file_is_refused_with_one_line_naming_the_problem(tmp_path, mixtral, computed, fmt, make, match):
    path = make(tmp_path, computed)
    refused(match, import_routing, fmt, path, ModelShape.of(mixtral))


def test_an_unknown_format_or_a_missing_path_is_refused(tmp_path):
    refused("format must be one of", import_routing, "tensorrt", tmp_path)
    refused("does not exist", import_routing, "vllm", tmp_path / "nope.npy")
