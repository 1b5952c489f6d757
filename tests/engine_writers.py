"""Write a moe-viz ``Trace`` the way each serving or training engine writes its MoE routing.

Each writer follows the layout the engine's own code produces (checked against its source; see
the docstrings of ``moe_viz.engines.*``): dtypes, the missing last token, zero-filled or absent
dense layers, ``-1`` padding, physical expert slots, per-rank files, expert-id-ordered rows, the
bf16 logits sidecar, llama.cpp's ubatch blocks. Tests write a computed trace with them and check
that the import gives the same expert selection back.

Slots are written in the trace's score order (highest router score first: what moe-viz calls the
first choice), as the engines' fused top-k kernels order them; Megatron's rows are re-sorted by
expert id as ``routing_map.nonzero()`` gives them.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_viz.trace import Trace


# ----------------------------------------------------------------------------- common
def ranked_ids(trace: Trace) -> np.ndarray:
    """(T, L_moe, k) int64 expert ids of every MoE layer, each token's slots by descending router score."""
    out = []
    for lt in trace.layers:
        index = lt.native_index  # (T, k)
        order = lt.router_probs.gather(1, index).argsort(dim=1, descending=True, stable=True)  # (T, k)
        out.append(index.gather(1, order).numpy())
    return np.stack(out, axis=1).astype(np.int64)


def decoder_ids(trace: Trace, num_layers: int, fill: int = 0) -> np.ndarray:
    """(T, num_layers, k) int64: every decoder layer, the dense ones filled with ``fill``."""
    ids = ranked_ids(trace)  # (T, L_moe, k)
    out = np.full((ids.shape[0], num_layers, ids.shape[2]), fill, np.int64)
    out[:, trace.layer_ids, :] = ids
    return out


def num_experts(trace: Trace) -> int:
    return int(trace.layers[0].num_experts)


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes: an ``.npy`` file with its header."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- vLLM
def _version(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def vllm_layout(version: str, experts: int) -> tuple[np.dtype, bool]:
    """(dtype, MoE layers only) of a vLLM release's ``routed_experts``."""
    v = _version(version)
    if v < (0, 14):
        raise ValueError(f"vLLM {version} has no routed-experts capturer (it came in 0.14.0)")
    if v <= (0, 20):
        return np.dtype(np.int32), False  # every hidden layer, dense ones zero-filled
    if v == (0, 21):
        return np.dtype(np.int16), True  # _count_moe_layers: MoE layers only
    return np.dtype(np.uint8 if experts <= 256 else np.uint16), False


def vllm_routed_experts(trace: Trace, num_layers: int, version: str, prompt_start: int = 0) -> np.ndarray:
    """``CompletionOutput.routed_experts`` of a request whose prompt and generated tokens are ``trace``:
    rows ``[prompt_start, T - 1)`` (the last sampled token is never forwarded)."""
    dtype, moe_only = vllm_layout(version, num_experts(trace))
    ids = ranked_ids(trace) if moe_only else decoder_ids(trace, num_layers, fill=0)
    return ids[prompt_start : trace.num_tokens - 1].astype(dtype)


def write_vllm_npy(path: str | Path, trace: Trace, num_layers: int, version: str) -> Path:
    """The Python API's array saved with ``np.save``."""
    path = Path(path)
    np.save(path, vllm_routed_experts(trace, num_layers, version), allow_pickle=False)
    return path


def vllm_answer(
    trace: Trace,
    num_layers: int,
    version: str,
    prompt_len: int,
    *,
    prompt_start: int = 0,
    token_ids: bool = True,
) -> dict[str, Any]:
    """A chat-completions HTTP answer of vLLM ``version`` (0.21, or 0.22+) with routed experts: the
    prompt is the trace's first ``prompt_len`` tokens, the rest were generated."""
    v = _version(version)
    if v < (0, 21):
        raise ValueError(f"vLLM {version} returns routed experts through the Python API only")
    rows = vllm_routed_experts(trace, num_layers, version, prompt_start)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(trace.tokens[prompt_len:])},
        "finish_reason": "length",
    }
    answer: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion", "model": "tiny", "choices": [choice]}
    if v == (0, 21):  # split_routed_experts: prompt rows on the request, generated rows on the choice
        prompt, generated = rows[:prompt_len], rows[prompt_len:]
        answer["prompt_routed_experts"] = prompt.tolist() if len(prompt) else None
        choice["routed_experts"] = generated.tolist() if len(generated) else None
    else:  # serving: np.save then base64, prompt and generated together
        choice["routed_experts"] = base64.b64encode(npy_bytes(rows)).decode("ascii")
    if token_ids:
        answer["prompt_token_ids"] = list(trace.token_ids[:prompt_len])
        choice["token_ids"] = list(trace.token_ids[prompt_len:])
    return answer


# ----------------------------------------------------------------------------- SGLang per request
def sglang_routed_experts(trace: Trace, num_layers: int, start_len: int = 0) -> str:
    """``meta_info["routed_experts"]``: base64 of raw little-endian int32 bytes of
    ``(T - 1 - start_len, num_hidden_layers, top_k)``, dense layers zero, logical ids."""
    ids = decoder_ids(trace, num_layers, fill=0)[start_len : trace.num_tokens - 1]
    return base64.b64encode(ids.astype("<i4").tobytes()).decode("ascii")


def sglang_generate_answer(trace: Trace, num_layers: int, start_len: int = 0) -> dict[str, Any]:
    """The ``/generate`` answer of one request with ``return_routed_experts``."""
    return {
        "text": "".join(trace.tokens),
        "meta_info": {
            "id": "req-1",
            "finish_reason": {"type": "length", "length": 1},
            "prompt_tokens": trace.num_tokens - 1,
            "completion_tokens": 1,
            "routed_experts": sglang_routed_experts(trace, num_layers, start_len),
        },
    }


def sglang_openai_answer(trace: Trace, num_layers: int, start_len: int = 0) -> dict[str, Any]:
    """An OpenAI chat answer: the routing at response level, ``sglext.routed_experts``."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "tiny",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": trace.tokens[-1]}, "finish_reason": "length"}
        ],
        "usage": {"prompt_tokens": trace.num_tokens - 1, "completion_tokens": 1},
        "sglext": {"routed_experts": sglang_routed_experts(trace, num_layers, start_len)},
    }


# ----------------------------------------------------------------------------- SGLang recorder dumps
TOPK_WIDTH = 8  # _DetailSinglePassGatherer's _TOP_K_NUM


def physical_map(num_layers: int, experts: int, replicas: tuple[int, ...] = (0, 3)) -> np.ndarray:
    """(layers, physical) ``last_physical_to_logical_map``: slot e holds logical expert e, then one
    extra slot per replicated expert (10 physical slots for 8 logical with the default)."""
    row = np.concatenate([np.arange(experts), np.asarray(replicas, np.int64)])
    return np.tile(row, (num_layers, 1)).astype(np.int64)


def to_physical(logical: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(L, N, k) logical ids → physical slots, alternating between an expert's replicas by token."""
    out = np.empty_like(logical)
    L, N, _ = logical.shape
    for layer in range(L):
        slots = {int(e): np.nonzero(mapping[layer] == e)[0] for e in np.unique(mapping[layer])}
        for t in range(N):
            for s, e in enumerate(logical[layer, t]):
                choices = slots[int(e)]
                out[layer, t, s] = choices[(t + layer) % len(choices)]
    return out


def sglang_counts(ids: np.ndarray, experts: int) -> np.ndarray:
    """(L, E) assignments of (N, L, k) ids."""
    L = ids.shape[1]
    out = np.zeros((L, experts), np.int64)
    for layer in range(L):
        out[layer] = np.bincount(ids[:, layer, :].reshape(-1), minlength=experts)
    return out


def write_sglang_stat(folder: str | Path, logical_count: np.ndarray, time: float = 1764700000.25) -> Path:
    """A stat-mode dump: rank 0 only, ``logical_count`` int32 (steps, layers, logical experts)."""
    path = Path(folder) / f"expert_distribution_recorder_{time}.pt"
    data = {
        "rank": 0,
        "logical_count": torch.from_numpy(np.asarray(logical_count)).to(torch.int32),
        "average_utilization_rate_over_window": None,
    }
    torch.save(data, path)
    return path


def sglang_passes(per_rank: dict[int, list[Trace]], num_layers: int, decode_steps: int = 2) -> list[dict[str, Any]]:
    """Forward passes of a serving run: on each rank, one extend pass over its sequences' prompts
    (all tokens but the last ``decode_steps``), then ``decode_steps`` decode passes of one token per
    sequence. Each pass: ``{forward_pass_id, rank, extend, input_ids, positions, extend_seq_lens,
    ids: (N, num_layers, k) logical, -1 in dense layers}``."""
    passes = []
    for rank, traces in sorted(per_rank.items()):
        prompts = [t.num_tokens - decode_steps for t in traces]
        ids = [decoder_ids(t, num_layers, fill=-1) for t in traces]
        passes.append(
            {
                "forward_pass_id": 0,
                "rank": rank,
                "extend": True,
                "input_ids": [i for t, p in zip(traces, prompts) for i in t.token_ids[:p]],
                "positions": [i for p in prompts for i in range(p)],
                "extend_seq_lens": prompts,
                "ids": np.concatenate([a[:p] for a, p in zip(ids, prompts)]),
            }
        )
        for d in range(decode_steps):
            at = [p + d for p in prompts]
            passes.append(
                {
                    "forward_pass_id": 1 + d,
                    "rank": rank,
                    "extend": False,
                    "input_ids": [t.token_ids[a] for t, a in zip(traces, at)],
                    "positions": at,
                    "extend_seq_lens": None,
                    "ids": np.stack([a[i] for a, i in zip(ids, at)]),
                }
            )
    return passes


def write_sglang_detail(
    folder: str | Path,
    passes: list[dict[str, Any]],
    mapping: np.ndarray,
    mode: str = "per_token",
    time: float = 1764700000.5,
) -> list[Path]:
    """One ``expert_distribution_recorder_{time}_{rank}.pt`` per rank (``per_pass`` or
    ``per_token``), ids written as physical slots through ``mapping``."""
    folder = Path(folder)
    L, P = mapping.shape
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for p in passes:
        logical = p["ids"].transpose(1, 0, 2)  # (L, N, k), -1 in dense layers
        written = (logical >= 0).all(axis=(1, 2))  # (L,)
        physical = np.full_like(logical, -1)
        physical[written] = to_physical(logical[written], mapping[written])
        count = np.zeros((L, P), np.int64)
        for layer in np.nonzero(written)[0]:
            count[layer] = np.bincount(physical[layer].reshape(-1), minlength=P)
        record: dict[str, Any] = {
            "forward_pass_id": p["forward_pass_id"],
            "rank": p["rank"],
            "gatherer_key": "primary",
        }
        if mode == "per_token":
            N, k = physical.shape[1], physical.shape[2]
            topk = torch.full((L, N, TOPK_WIDTH), -1, dtype=torch.int32)  # reset() before every pass
            topk[:, :, :k] = torch.from_numpy(physical).to(torch.int32)
            record.update(
                input_ids=list(p["input_ids"]),
                positions=list(p["positions"]),
                extend_seq_lens=p["extend_seq_lens"],
                forward_mode=1 if p["extend"] else 2,  # ForwardMode.EXTEND / DECODE
                topk_ids_of_layer=topk,
                misc_objects=[],
            )
        record["global_physical_count"] = torch.from_numpy(count).to(torch.int32)
        by_rank.setdefault(p["rank"], []).append(record)
    paths = []
    for rank, records in sorted(by_rank.items()):
        path = folder / f"expert_distribution_recorder_{time}_{rank}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(mapping)}, path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- Megatron-LM
def bf16_bytes(logits: torch.Tensor) -> bytes:
    """The logits sidecar's bytes: bf16, viewed as int16, native (little-endian) order."""
    return logits.to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def write_megatron(
    folder: str | Path,
    per_rank: dict[int, list[Trace]],
    *,
    logits: bool = False,
    score_function: str | None = None,
    skip: tuple[tuple[int, int, int], ...] = (),
) -> Path:
    """``router_trace_rank{r}.jsonl`` per rank, one record per (step, layer) with ``top_indices`` in
    ascending expert-id order; with ``logits`` the ``logits_rank{r}.bin`` sidecar, and with
    ``score_function`` the ``router_state_rank{r}.pt`` dump. Trace s of a rank is its step s.
    ``skip`` leaves out the records (rank, step, layer), as Megatron does when tokens were dropped."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for rank, traces in per_rank.items():
        lines, sidecar = [], bytearray()
        for step, trace in enumerate(traces):
            ids = ranked_ids(trace)  # (T, L, k)
            for i, lt in enumerate(trace.layers):
                if (rank, step, lt.layer) in skip:
                    continue
                record: dict[str, Any] = {
                    "step": step,
                    "stage": "pre_dispatch",
                    "block": "decoder",
                    "layer": lt.layer,
                    "rank": rank,
                    "num_tokens": trace.num_tokens,
                    "topk": int(ids.shape[2]),
                    "top_indices": np.sort(ids[:, i, :], axis=1).tolist(),  # routing_map.nonzero(): by expert id
                }
                if logits:
                    data = bf16_bytes(lt.router_logits)
                    record.update(
                        logit_offset=len(sidecar), logit_bytes=len(data), logit_shape=list(lt.router_logits.shape)
                    )
                    sidecar += data
                lines.append(json.dumps(record))
        (folder / f"router_trace_rank{rank}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if logits:
            (folder / f"logits_rank{rank}.bin").write_bytes(bytes(sidecar))
        if score_function is not None:
            trace = traces[0]
            state = {
                ("decoder", None, lt.layer): {
                    "weight": torch.zeros((lt.num_experts, 4), dtype=torch.float32),
                    "expert_bias": None,
                    "score_function": score_function,
                    "topk": lt.top_k,
                }
                for lt in trace.layers
            }
            torch.save(state, folder / f"router_state_rank{rank}.pt")
    return folder


# ----------------------------------------------------------------------------- llama.cpp
def llamacpp_rows(trace: Trace, prompt_len: int, n_ubatch: int) -> list[tuple[int, int]]:
    """``layer,expert`` rows of moe-trace: the prompt decoded in ubatches of ``n_ubatch`` tokens,
    then one token per decode step; per ubatch, per MoE layer, token-major, k per token in score order."""
    ids = ranked_ids(trace)  # (T, L, k)
    batches = [range(a, min(a + n_ubatch, prompt_len)) for a in range(0, prompt_len, n_ubatch)]
    batches += [range(t, t + 1) for t in range(prompt_len, trace.num_tokens)]
    rows = []
    for batch in batches:
        for i, layer in enumerate(trace.layer_ids):
            for t in batch:
                rows.extend((layer, int(e)) for e in ids[t, i])
    return rows


def write_llamacpp(path: str | Path, trace: Trace, prompt_len: int, n_ubatch: int = 8) -> Path:
    """The moe-trace CSV: ``fprintf("%d,%d\\n", layer, expert)``, no header."""
    path = Path(path)
    rows = llamacpp_rows(trace, prompt_len, n_ubatch)
    path.write_text("".join(f"{layer},{expert}\n" for layer, expert in rows), encoding="utf-8")
    return path
