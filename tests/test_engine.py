"""Engine behaviour beyond per-family equality: ensembles, threads, generation, traces, errors."""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ByteTokenizer, build, build_model, save_byte_tokenizer

import moe_viz
from moe_viz import Capacity, Ensemble, Sampling, TopK, generate, load_model, parse_policy, record, run_prompt, trace_io
from moe_viz._hooks import active_call

TEXT = "Routing tokens to experts, one layer at a time."


@pytest.fixture(scope="module")
def mixtral():
    return build("mixtral")


def _experts_io(model, layer: int, policy):
    """The input and output of layer ``layer``'s experts module under ``policy``."""
    experts = model.model.model.layers[layer].mlp.experts
    seen = {}

    def hook(module, args, output):
        seen["h"], seen["out"] = args[0].detach().clone(), output.detach().clone()

    handle = experts.register_forward_hook(hook)
    try:
        run_prompt(model, TEXT, policy)
    finally:
        handle.remove()
    return experts, seen["h"], seen["out"]


@torch.no_grad()
def test_uniform_ensemble_equals_the_mean_of_every_experts_output(mixtral):
    """Computed by hand from the expert weights: mean_e down_e(silu(gate_e h) * up_e h)."""
    experts, h, out = _experts_io(mixtral, 1, Ensemble("uniform"))
    outputs = []
    for e in range(experts.num_experts):
        gate, up = F.linear(h, experts.gate_up_proj[e]).chunk(2, dim=-1)  # (T, I) each
        outputs.append(F.linear(F.silu(gate) * up, experts.down_proj[e]))  # (T, H)
    expected = torch.stack(outputs).mean(dim=0)  # (T, H)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_gate_ensemble_weights_every_expert_by_its_router_probability(mixtral):
    trace = run_prompt(mixtral, TEXT, Ensemble("gate"))
    for lt in trace.layers:
        assert lt.index.shape == (trace.num_tokens, lt.num_experts)
        probs = lt.router_logits.softmax(dim=-1)
        torch.testing.assert_close(lt.weights, probs.gather(1, lt.index))


def test_sigmoid_router_gate_ensemble_is_renormalised_and_scaled():
    model = build("deepseek_v3")
    trace = run_prompt(model, TEXT, Ensemble("gate"))
    spec = model.sites[0].spec
    for lt in trace.layers:
        scores = lt.router_logits.sigmoid()
        expected = scores / scores.sum(dim=-1, keepdim=True) * spec.scale
        torch.testing.assert_close(lt.weights, expected.gather(1, lt.index))
        torch.testing.assert_close(lt.weights.sum(dim=-1), torch.full((trace.num_tokens,), spec.scale))


def test_one_expert_per_token_uses_only_the_best_expert(mixtral):
    trace = run_prompt(mixtral, TEXT, TopK(1))
    for lt in trace.layers:
        assert torch.equal(lt.index[:, 0], lt.router_probs.argmax(dim=-1))
        torch.testing.assert_close(lt.weights, torch.ones_like(lt.weights))  # Mixtral renormalises


def test_capacity_by_position_keeps_earlier_first_choices():
    """GShard order: all first choices in token order before any second choice."""
    from moe_viz._router_math import apply_capacity

    index = torch.tensor([[0, 1], [0, 1], [0, 2]])  # three tokens all prefer expert 0
    gates = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]])
    by_position = apply_capacity(index, gates, capacity=2, priority="position")
    assert by_position.tolist() == [[False, False], [False, False], [True, False]]
    by_probs = apply_capacity(index, gates, capacity=2, priority="probs")
    assert by_probs.tolist() == [[True, False], [False, False], [False, False]]
    one_slot = apply_capacity(index, gates, capacity=1, priority="position")
    assert one_slot.tolist() == [[False, False], [True, True], [True, False]]


def test_fully_dropped_token_keeps_only_its_residual(mixtral):
    """A token whose every assignment dropped gets an MoE output of exactly zero (residual only)."""
    _, _, out = _experts_io(mixtral, 0, Capacity(1e-9))  # capacity rounds up to 1 per expert
    trace = run_prompt(mixtral, TEXT, Capacity(1e-9))
    fully = trace.layer(0).dropped.all(dim=-1)  # (T,)
    assert trace.layer(0).capacity == [1] and fully.sum() >= len(fully) - 8
    assert torch.count_nonzero(out[fully]) == 0
    assert (out[~fully].abs().sum(dim=-1) > 0).all()


def test_threads_with_different_policies_never_see_each_others_routing(mixtral):
    policies = [None, TopK(1), Ensemble("uniform"), Capacity(0.5), TopK(3)]
    reference = {p: run_prompt(mixtral, TEXT, p).output.vocab_logprobs for p in policies}
    barrier = threading.Barrier(len(policies))
    errors: list[str] = []

    def worker(policy):
        for _ in range(8):
            barrier.wait()
            got = run_prompt(mixtral, TEXT, policy).output.vocab_logprobs
            if not torch.equal(got, reference[policy]):
                errors.append(f"{policy}: max diff {(got - reference[policy]).abs().max():.3g}")

    threads = [threading.Thread(target=worker, args=(p,)) for p in policies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_hooks_do_nothing_outside_a_routing_block(mixtral):
    ids = mixtral.tokenizer(TEXT)["input_ids"]
    with active_call(TopK(1)):
        pass
    plain = build_model("mixtral")
    with torch.inference_mode():
        torch.testing.assert_close(mixtral.model(ids).logits, plain(ids).logits, atol=0, rtol=0)


def test_a_models_device_and_dtype_follow_it_when_it_is_converted_or_its_weights_are_replaced():
    model = build("mixtral")
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float32)
    model.model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert run_prompt(model, TEXT).dtype == "bfloat16"
    # accelerate's dispatch puts a new tensor in a parameter's slot: the model reads the new one
    embed = model.model.get_input_embeddings()
    embed.weight = torch.nn.Parameter(embed.weight.detach().to(torch.float16), requires_grad=False)
    assert model.dtype == torch.float16
    # a removed first parameter: the next one in parameters() order is read
    del embed.weight
    embed.register_parameter("weight", None)
    assert model.dtype == next(model.model.parameters()).dtype == torch.bfloat16


def test_seeded_sampling_is_reproducible_and_seed_dependent(mixtral):
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    first = generate(mixtral, "abc", TopK(2), max_new_tokens=12, sampling=sampling).new_token_ids
    again = generate(mixtral, "abc", TopK(2), max_new_tokens=12, sampling=sampling).new_token_ids
    other = generate(mixtral, "abc", TopK(2), max_new_tokens=12, sampling=Sampling(1.0, 0.9, seed=8)).new_token_ids
    assert first == again and first != other


def test_generation_trace_marks_prefill_and_decode_steps(mixtral):
    result = generate(mixtral, "abcd", Ensemble("gate"), max_new_tokens=5)
    trace = result.trace
    assert trace.step == [0, 0, 0, 0, 1, 2, 3, 4]
    assert trace.token_ids == [97, 98, 99, 100, *result.new_token_ids[:-1]]
    assert all(lt.index.shape == (8, lt.num_experts) for lt in trace.layers)
    assert trace.generated_text == result.text


def test_capacity_generation_recomputes_capacity_over_the_sequence_so_far(mixtral):
    factor, prompt, n = 0.5, "abcdefgh", 6
    result = generate(mixtral, prompt, Capacity(factor), max_new_tokens=n)
    trace = result.trace
    for lt in trace.layers:
        expected = [math.ceil(factor * (8 + s) * lt.top_k / lt.num_experts) for s in range(n)]
        assert lt.capacity == expected
    # The recorded routing of the last fed token equals a fresh forward over the same tokens.
    ids = torch.tensor([trace.token_ids])
    with record(mixtral, Capacity(factor)) as rec:
        mixtral.model(input_ids=ids, use_cache=False)
    for got, want in zip(trace.layers, rec.trace().layers, strict=True):
        assert torch.equal(got.dropped[-1], want.dropped[-1])
        assert torch.equal(got.index[-1], want.index[-1])
    assert sum(lt.dropped_count for lt in trace.layers) > 0
    # each recomputing step asks the model for its last row only; that row is the full forward's
    full = rec.trace().output.at(-1)
    assert torch.equal(trace.output.at(-1).top_ids, full.top_ids)
    torch.testing.assert_close(trace.output.at(-1).top_logprobs, full.top_logprobs, rtol=0, atol=1e-6)
    assert result.new_token_ids[-1] == int(full.top_ids[0, 0])


def test_trace_round_trips_through_json_and_parquet_losslessly(mixtral, tmp_path):
    trace = generate(mixtral, "round trip", Capacity(0.5, priority="probs"), max_new_tokens=3).trace
    for include_vocab in (False, True):
        for path in (tmp_path / "t.json", tmp_path / "t.parquet"):
            if path.suffix == ".json":
                trace_io.save_json(trace, path, include_vocab=include_vocab)
                back = trace_io.load_json(path)
            else:
                trace_io.save_parquet(trace, path, include_vocab=include_vocab)
                back = trace_io.load_parquet(path)
            assert trace_io.to_dict(back, include_vocab=True) == trace_io.to_dict(trace, include_vocab=include_vocab)
            for a, b in zip(back.layers, trace.layers):
                assert torch.equal(a.router_logits, b.router_logits) and torch.equal(a.dropped, b.dropped)
        text = trace_io.to_json_text(trace, include_vocab=include_vocab)
        assert trace_io.to_dict(trace_io.from_json_text(text)) == trace_io.to_dict(trace)


def test_trace_frames_have_one_row_per_assignment(mixtral):
    trace = run_prompt(mixtral, TEXT, Capacity(0.5))
    frames = trace_io.to_frames(trace)
    routing_frame = frames["routing"]
    assert len(routing_frame) == sum(lt.index.numel() for lt in trace.layers)
    assert int(routing_frame["dropped"].sum()) == sum(lt.dropped_count for lt in trace.layers)
    assert len(frames["tokens"]) == trace.num_tokens
    assert list(frames["probs"].columns[:2]) == ["layer", "position"]


def test_foreign_json_is_refused_with_a_message():
    with pytest.raises(ValueError, match="not a moe-viz trace"):
        trace_io.from_json_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not JSON"):
        trace_io.from_json_text("not json at all")


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: TopK(0), "k"),
        (lambda: TopK(2.5), "k"),
        (lambda: Capacity(0.0), "factor"),
        (lambda: Capacity(float("nan")), "factor"),
        (lambda: Capacity(-1), "factor"),
        (lambda: Capacity(1.0, priority="random"), "priority"),
        (lambda: Ensemble("softmax"), "weighting"),
        (lambda: parse_policy("top-k:two"), "top-k:two"),
        (lambda: parse_policy("dense"), "dense"),
        (lambda: Sampling(temperature=-1), "temperature"),
    ],
)
def test_bad_policy_values_raise_value_error_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


def test_bad_run_input_raises_value_error_naming_the_argument(mixtral):
    with pytest.raises(ValueError, match="prompt"):
        run_prompt(mixtral, "   ", None)
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= 8"):
        run_prompt(mixtral, TEXT, TopK(9))
    with pytest.raises(ValueError, match="prompt is .* tokens long"):
        run_prompt(mixtral, "x" * 600, None)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(mixtral, TEXT, None, max_new_tokens=0)


def test_policy_text_forms_parse_to_policies():
    assert parse_policy("native") is None
    assert parse_policy("top-k:2") == TopK(2)
    assert parse_policy("capacity:1.25") == Capacity(1.25)
    assert parse_policy("capacity:1.25:probs") == Capacity(1.25, priority="probs")
    assert parse_policy("capacity:2:position:k=1") == Capacity(2.0, k=1)
    assert parse_policy("ensemble:uniform") == Ensemble("uniform")
    for policy in (TopK(3), Capacity(0.5, k=1, priority="probs"), Ensemble("gate")):
        assert parse_policy(policy.spec) == policy


def test_load_model_refuses_missing_folders_unknown_ids_and_dense_models(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="could not load model"):
        load_model("no-such-org/no-such-model")
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    dense.save_pretrained(tmp_path / "dense")
    save_byte_tokenizer(tmp_path / "dense")
    with pytest.raises(ValueError, match="has no MoE layers"):
        load_model(str(tmp_path / "dense"))


def test_load_model_from_a_local_folder_runs_every_policy(tmp_path):
    build_model("qwen2_moe").save_pretrained(tmp_path / "m")
    save_byte_tokenizer(tmp_path / "m")
    model = load_model(str(tmp_path / "m"), device="cpu")
    assert not model.model.training and model.num_experts == 8 and model.top_k == 2
    assert model.model.config._experts_implementation in ("grouped_mm", "eager", "batched_mm")
    for policy in (None, TopK(1), Capacity(1.0), Ensemble("uniform")):
        assert run_prompt(model, "HELLO WORLD", policy).num_tokens == 11


def test_cli_writes_a_trace_and_rejects_bad_values(tmp_path):
    build_model("olmoe").save_pretrained(tmp_path / "m")
    save_byte_tokenizer(tmp_path / "m")
    out = tmp_path / "t.json"
    cmd = [
        sys.executable,
        "-m",
        "moe_viz.cli",
        "trace",
        str(tmp_path / "m"),
        "--prompt",
        "ABC DEF",
        "--policy",
        "capacity:0.5",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dropped" in done.stdout and out.exists()
    assert trace_io.load_json(out).policy == "capacity:0.5:position"
    bad = subprocess.run(cmd[:-4] + ["--policy", "top-k:0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "k must satisfy" in bad.stderr


def test_public_api_is_sorted_and_free_of_streamlit():
    assert moe_viz.__all__ == sorted(moe_viz.__all__)
    code = "import sys, moe_viz, moe_viz.cli; import moe_viz._runs, moe_viz.trace_io; print('streamlit' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False"


def test_byte_tokenizer_stand_in_is_reversible():
    tok = ByteTokenizer()
    assert tok.decode(tok("héllo")["input_ids"][0].tolist()) == "héllo"


def test_next_token_predictions_are_built_when_first_read_and_equal_the_eager_ones(mixtral):
    from moe_viz._trace_build import LazyOutputTrace, output_trace

    trace = run_prompt(mixtral, "Predictions cost a pass over the vocabulary per token.")
    out = trace.output
    assert isinstance(out, LazyOutputTrace) and not out.__dict__["_ready"]  # nothing computed yet
    held_before = trace.nbytes()  # counting memory does not compute them either
    assert not out.__dict__["_ready"] and trace.has_predictions
    with torch.inference_mode():
        logits = mixtral.model(input_ids=torch.tensor([trace.token_ids]), use_cache=False).logits[0]
    eager = output_trace(mixtral.tokenizer, logits, trace.token_ids)
    assert out.top_ids.equal(eager.top_ids) and out.__dict__["_ready"]  # one read computes all
    assert out.top_tokens == eager.top_tokens and out.vocab_logprobs.equal(eager.vocab_logprobs)
    assert torch.allclose(out.entropy, eager.entropy) and torch.equal(
        out.target_logprob.isnan(), eager.target_logprob.isnan()
    )
    T = trace.num_tokens
    V = mixtral.model.config.vocab_size
    assert trace.nbytes() - held_before < T * 256 < T * V * 4  # small summaries, no float32 (T, V) copy


def test_the_full_distribution_is_kept_once_as_the_hidden_states_the_head_projects(mixtral):
    import copy

    from moe_viz._trace_build import LazyOutputTrace

    model16 = moe_viz.wrap_model(copy.deepcopy(mixtral.model).to(torch.bfloat16), mixtral.tokenizer, "bf16 copy")
    assert model16.instrumentation.head is not None  # Mixtral returns lm_head's output unchanged: proven at load
    trace = run_prompt(model16, "A bf16 model keeps its distribution in bf16.")
    out = trace.output
    assert isinstance(out, LazyOutputTrace)
    T, V = len(trace.token_ids), model16.model.config.vocab_size
    H = model16.model.config.hidden_size
    hidden, last = out.held_tensors()  # the (T, H) hidden states and the last row the forward returned
    assert hidden.dtype == last.dtype == torch.bfloat16 and hidden.shape == (T, H) and last.shape == (V,)
    first, second = out.vocab_logprobs, out.vocab_logprobs
    assert first.dtype == torch.float32 and first.equal(second)  # computed at each read, the same numbers
    with torch.inference_mode():
        plain = model16.model(input_ids=torch.tensor([trace.token_ids]), use_cache=False).logits[0]  # (T, V)
    assert first.equal(plain.log_softmax(dim=-1, dtype=torch.float32))  # bit for bit the full forward's
    assert out.top_ids.shape == (T, 10)  # the summaries, then the bytes held: bf16 hidden states plus the summaries
    held = sum(t.numel() * t.element_size() for t in out.held_tensors())
    assert (T * H + V) * 2 <= held <= (T * H + V) * 2 + T * 128
    assert held < T * V * 2  # less than the bf16 logits alone


def test_a_model_whose_forward_rescales_its_logits_keeps_every_row_of_them():
    from tiny_models import build_family

    from moe_viz._trace_build import LazyOutputTrace

    net = build_family("granitemoe")  # its forward divides lm_head's output by logits_scaling
    net.config.logits_scaling = 4.0
    model = moe_viz.wrap_model(net, ByteTokenizer(), "tiny granitemoe")
    assert model.instrumentation.head is None and "scale" in model.instrumentation.head_reason
    trace = run_prompt(model, "scaled logits")
    T, V = len(trace.token_ids), net.config.vocab_size
    assert isinstance(trace.output, LazyOutputTrace) and trace.output.held_tensors()[0].shape == (T, V)
    with torch.inference_mode():
        plain = net(input_ids=torch.tensor([trace.token_ids]), use_cache=False).logits[0]
    assert trace.output.vocab_logprobs.equal(plain.log_softmax(dim=-1, dtype=torch.float32))


def test_one_tokens_predictions_are_computed_alone_and_equal_the_full_ones(mixtral):
    trace = run_prompt(mixtral, "A page that shows one token's predictions reads one row.")
    out = trace.output
    last = out.at(-1)
    assert not out.__dict__["_ready"]  # the other rows were not computed
    assert trace.predictions(2, 3) and not out.__dict__["_ready"]
    assert last.top_ids.shape == (1, 10) and len(last.top_tokens) == 1 and last.vocab_logprobs is None
    rows = {t: out.at(t) for t in range(trace.num_tokens)}
    assert out.top_ids[-1].equal(last.top_ids[0])  # reading a field computes them all, as before
    for t, row in rows.items():
        assert row.top_ids[0].equal(out.top_ids[t]) and row.top_tokens[0] == out.top_tokens[t]
        assert torch.allclose(row.top_logprobs[0], out.top_logprobs[t], atol=1e-6)
        assert torch.allclose(row.entropy, out.entropy[t : t + 1], atol=1e-5)
        assert torch.allclose(row.target_logprob, out.target_logprob[t : t + 1], atol=1e-6, equal_nan=True)
    assert math.isnan(float(last.target_logprob[0])) and not math.isnan(float(rows[0].target_logprob[0]))
    assert out.at(3).top_ids.equal(rows[3].top_ids)  # after materialising, rows come from the fields


def test_a_window_of_a_run_predicts_its_rows_lazily_and_like_the_whole_run(mixtral):
    from moe_viz._trace_build import LazyOutputTrace

    trace = run_prompt(mixtral, "A zoom into a long prompt computes only the rows it shows, the same numbers.")
    T = trace.num_tokens
    for start, stop in ((0, 5), (3, T - 2), (T - 4, T)):
        part = trace.window(start, stop).output
        assert isinstance(part, LazyOutputTrace) and not part.__dict__["_ready"]  # nothing computed yet
        assert part.top_ids.equal(trace.output.top_ids[start:stop])
        assert part.top_tokens == trace.output.top_tokens[start:stop]
        assert torch.allclose(part.entropy, trace.output.entropy[start:stop], atol=1e-5)
        # the last row's actual next token is the one after the window (none at the very end)
        assert torch.allclose(part.target_logprob, trace.output.target_logprob[start:stop], atol=1e-6, equal_nan=True)
        assert part.vocab_logprobs.equal(trace.output.vocab_logprobs[start:stop])
        assert part.at(-1).top_ids.equal(trace.output.at(stop - 1).top_ids)


def test_an_output_head_that_is_not_what_the_forward_projects_with_is_not_trusted():
    from transformers import MixtralForCausalLM

    class Decoy(MixtralForCausalLM):  # reports a head its forward never uses
        def get_output_embeddings(self):  # noqa: ANN202
            return self.decoy

    reference = build_model("mixtral")
    net = Decoy(reference.config).eval()
    net.load_state_dict(reference.state_dict())
    net.decoy = torch.nn.Linear(net.config.hidden_size, net.config.vocab_size, bias=False)
    model = moe_viz.wrap_model(net, ByteTokenizer(), "decoy head")
    assert model.instrumentation.head is None
    assert "does not give the model's logits" in model.instrumentation.head_reason
    trace = run_prompt(model, "the forward's own logits")
    with torch.inference_mode():
        plain = net(input_ids=torch.tensor([trace.token_ids]), use_cache=False).logits[0]
    assert trace.output.vocab_logprobs.equal(plain.log_softmax(dim=-1, dtype=torch.float32))
