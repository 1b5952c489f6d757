"""The trace of one run: every routing decision, per MoE layer, and the next-token predictions.

A ``Trace`` is plain data (dataclasses of CPU tensors). It converts to pandas DataFrames and exports
to JSON or Parquet with a versioned schema, and re-imports losslessly.

Schema ``moe-viz/trace`` version 1 (JSON; Parquet stores the same content, see ``to_parquet``):

```
{"schema": "moe-viz/trace", "schema_version": 1,
 "meta": {model_id, architecture, policy, device, dtype, prompt, generated_text, timings_ms},
 "tokens": {"ids": [T], "text": [T], "step": [T]},      # step 0 = prompt (prefill), s = decode step s
 "layers": [{"layer", "num_experts", "top_k", "capture_only", "capacity": [steps] | null,
             "router_logits": [T][E], "router_probs": [T][E],
             "native_index": [T][k], "native_weights": [T][k],
             "index": [T][k'], "weights": [T][k'], "dropped": [T][k']}],
 "output": {"top_ids": [T][K], "top_logprobs": [T][K], "top_tokens": [T][K],
            "target_logprob": [T] (null where there is no next token), "entropy": [T],
            "vocab_logprobs": [T][V] | null}}
```
``router_probs`` are the router's per-expert scores: softmax for softmax routers, sigmoid for
sigmoid routers. ``weights`` are the weights the experts' outputs were multiplied by (0 where
dropped). ``vocab_logprobs`` (the full next-token log-distribution) is kept in memory when small
enough and exported only on request (``include_vocab=True``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

SCHEMA = "moe-viz/trace"
SCHEMA_VERSION = 1


@dataclass
class LayerTrace:
    """Routing of one MoE layer over the T traced tokens."""

    layer: int
    num_experts: int
    top_k: int
    router_logits: torch.Tensor  # (T, E) float32
    router_probs: torch.Tensor  # (T, E) float32
    native_index: torch.Tensor  # (T, k) long: what the model's own router chose
    native_weights: torch.Tensor  # (T, k) float32
    index: torch.Tensor  # (T, k') long: what this run applied
    weights: torch.Tensor  # (T, k') float32, 0 where dropped
    dropped: torch.Tensor  # (T, k') bool
    capacity: list[int] | None = None  # per forward step (capacity policy only)
    capture_only: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.router_logits.shape[0])

    @property
    def dropped_count(self) -> int:
        return int(self.dropped.sum().item())

    def load(self) -> torch.Tensor:
        """(E,) number of kept assignments per expert."""
        kept = self.index[~self.dropped]  # (n,)
        return torch.bincount(kept, minlength=self.num_experts)


@dataclass
class OutputTrace:
    """Next-token predictions at every traced position."""

    top_ids: torch.Tensor  # (T, K) long
    top_logprobs: torch.Tensor  # (T, K) float32
    top_tokens: list[list[str]]  # (T, K)
    target_logprob: torch.Tensor  # (T,) float32: log p(actual next token); NaN at the last position
    entropy: torch.Tensor  # (T,) float32, nats
    vocab_logprobs: torch.Tensor | None = None  # (T, V) float32


@dataclass
class Trace:
    """Everything one run under one routing policy did."""

    model_id: str
    architecture: str
    policy: str
    device: str
    dtype: str
    prompt: str
    token_ids: list[int]
    tokens: list[str]
    step: list[int]
    layers: list[LayerTrace]
    output: OutputTrace
    generated_text: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_length(self) -> int:
        return sum(1 for s in self.step if s == 0)

    @property
    def layer_ids(self) -> list[int]:
        return [layer.layer for layer in self.layers]

    @property
    def capture_only(self) -> bool:
        return any(layer.capture_only for layer in self.layers)

    def layer(self, layer: int) -> LayerTrace:
        """The trace of decoder layer ``layer``; ValueError if it is not an MoE layer."""
        for item in self.layers:
            if item.layer == layer:
                return item
        raise ValueError(f"layer must be one of the MoE layers {self.layer_ids}; got {layer}")

    def fingerprint(self) -> str:
        """12 hex digits identifying the routing: token ids, policy, and every layer's applied experts
        and dropped mask. Two runs with the same fingerprint routed every token identically."""
        digest = hashlib.sha256(f"{self.policy}|{self.token_ids}".encode())
        for lt in self.layers:
            digest.update(lt.index.numpy().tobytes())
            digest.update(lt.dropped.numpy().tobytes())
        return digest.hexdigest()[:12]

    def predictions(self, position: int = -1, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` most likely next tokens after ``position``, as (token text, probability)."""
        T = self.num_tokens
        if not -T <= position < T:
            raise ValueError(f"position must satisfy {-T} <= position < {T}; got {position}")
        probs = self.output.top_logprobs[position, :n].exp().tolist()
        return list(zip(self.output.top_tokens[position][:n], probs))

    # ----------------------------------------------------------------------------- frames
    def to_frames(self) -> dict[str, pd.DataFrame]:
        """DataFrames: ``tokens``, ``routing`` (one row per assignment), ``probs`` (one row per
        token and layer, one column per expert), ``predictions`` (top-K per position)."""
        tokens = pd.DataFrame(
            {"position": range(self.num_tokens), "token_id": self.token_ids, "token": self.tokens, "step": self.step}
        )
        routing_parts, prob_parts = [], []
        for lt in self.layers:
            T, kk = lt.index.shape
            routing_parts.append(
                pd.DataFrame(
                    {
                        "layer": lt.layer,
                        "position": torch.arange(T).repeat_interleave(kk).numpy(),
                        "slot": torch.arange(kk).repeat(T).numpy(),
                        "expert": lt.index.reshape(-1).numpy(),
                        "weight": lt.weights.reshape(-1).numpy(),
                        "dropped": lt.dropped.reshape(-1).numpy(),
                    }
                )
            )
            probs = pd.DataFrame(lt.router_probs.numpy(), columns=[f"expert_{e}" for e in range(lt.num_experts)])
            probs.insert(0, "position", range(T))
            probs.insert(0, "layer", lt.layer)
            prob_parts.append(probs)
        K = self.output.top_ids.shape[1]
        predictions = pd.DataFrame(
            {
                "position": torch.arange(self.num_tokens).repeat_interleave(K).numpy(),
                "rank": torch.arange(K).repeat(self.num_tokens).numpy(),
                "token_id": self.output.top_ids.reshape(-1).numpy(),
                "token": [t for row in self.output.top_tokens for t in row],
                "prob": self.output.top_logprobs.reshape(-1).exp().numpy(),
            }
        )
        return {
            "tokens": tokens,
            "routing": pd.concat(routing_parts, ignore_index=True),
            "probs": pd.concat(prob_parts, ignore_index=True),
            "predictions": predictions,
        }

    # ----------------------------------------------------------------------------- dict / JSON
    def to_dict(self, include_vocab: bool = False) -> dict[str, Any]:
        """The schema-1 dict (see the module docstring)."""
        out = self.output
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "meta": {
                "model_id": self.model_id,
                "architecture": self.architecture,
                "policy": self.policy,
                "device": self.device,
                "dtype": self.dtype,
                "prompt": self.prompt,
                "generated_text": self.generated_text,
                "timings_ms": self.timings_ms,
            },
            "tokens": {"ids": self.token_ids, "text": self.tokens, "step": self.step},
            "layers": [
                {
                    "layer": lt.layer,
                    "num_experts": lt.num_experts,
                    "top_k": lt.top_k,
                    "capture_only": lt.capture_only,
                    "capacity": lt.capacity,
                    **{name: getattr(lt, name).tolist() for name in _LAYER_ARRAYS},
                }
                for lt in self.layers
            ],
            "output": {
                "top_ids": out.top_ids.tolist(),
                "top_logprobs": out.top_logprobs.tolist(),
                "top_tokens": out.top_tokens,
                "target_logprob": [None if math.isnan(v) else v for v in out.target_logprob.tolist()],
                "entropy": out.entropy.tolist(),
                "vocab_logprobs": out.vocab_logprobs.tolist()
                if include_vocab and out.vocab_logprobs is not None
                else None,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        """Rebuild a trace from ``to_dict`` output; ValueError on a foreign or newer schema."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a moe-viz trace: schema is {data.get('schema')!r}, expected {SCHEMA!r}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"trace schema_version {data.get('schema_version')!r} is not supported (expected 1)")
        meta, out = data["meta"], data["output"]
        layers = [
            LayerTrace(
                layer=item["layer"],
                num_experts=item["num_experts"],
                top_k=item["top_k"],
                capture_only=item["capture_only"],
                capacity=item["capacity"],
                **{name: torch.tensor(item[name], dtype=dtype) for name, dtype in _LAYER_ARRAYS.items()},
            )
            for item in data["layers"]
        ]
        vocab = out.get("vocab_logprobs")
        output = OutputTrace(
            top_ids=torch.tensor(out["top_ids"], dtype=torch.long),
            top_logprobs=torch.tensor(out["top_logprobs"], dtype=torch.float32),
            top_tokens=out["top_tokens"],
            target_logprob=torch.tensor(
                [math.nan if v is None else v for v in out["target_logprob"]], dtype=torch.float32
            ),
            entropy=torch.tensor(out["entropy"], dtype=torch.float32),
            vocab_logprobs=None if vocab is None else torch.tensor(vocab, dtype=torch.float32),
        )
        tokens = data["tokens"]
        return cls(
            model_id=meta["model_id"],
            architecture=meta["architecture"],
            policy=meta["policy"],
            device=meta["device"],
            dtype=meta["dtype"],
            prompt=meta["prompt"],
            generated_text=meta["generated_text"],
            timings_ms=meta["timings_ms"],
            token_ids=tokens["ids"],
            tokens=tokens["text"],
            step=tokens["step"],
            layers=layers,
            output=output,
        )

    def to_json(self, path: str | Path | None = None, include_vocab: bool = False) -> str:
        """The trace as JSON text (schema 1); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(include_vocab), ensure_ascii=False, allow_nan=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> Trace:
        """Load a trace from a JSON file path or JSON text."""
        text = source
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            text = Path(source).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    # ----------------------------------------------------------------------------- Parquet
    def to_parquet(self, path: str | Path, include_vocab: bool = False) -> None:
        """Write one row per token: ``token_id``, ``token``, ``step``, per-layer list columns
        ``layer{L}.{array}`` and the output columns; meta and per-layer scalars go into the file's
        key-value metadata under ``moe_viz`` (the same schema-1 dict without the per-token arrays)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = self.to_dict(include_vocab)
        columns: dict[str, Any] = {
            "token_id": data["tokens"]["ids"],
            "token": data["tokens"]["text"],
            "step": data["tokens"]["step"],
        }
        for item in data["layers"]:
            for name in _LAYER_ARRAYS:
                columns[f"layer{item['layer']}.{name}"] = item.pop(name)
        for name in ("top_ids", "top_logprobs", "top_tokens", "target_logprob", "entropy"):
            columns[f"output.{name}"] = data["output"].pop(name)
        if data["output"]["vocab_logprobs"] is not None:
            columns["output.vocab_logprobs"] = data["output"].pop("vocab_logprobs")
        data.pop("tokens")
        types = {name: _arrow_type(name) for name in columns}
        table = pa.table({name: pa.array(values, type=types[name]) for name, values in columns.items()})
        table = table.replace_schema_metadata({"moe_viz": json.dumps(data, ensure_ascii=False)})
        pq.write_table(table, path)

    @classmethod
    def from_parquet(cls, path: str | Path) -> Trace:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        metadata = table.schema.metadata or {}
        if b"moe_viz" not in metadata:
            raise ValueError(f"{path} is not a moe-viz trace (no 'moe_viz' metadata)")
        data = json.loads(metadata[b"moe_viz"])
        cols = table.to_pydict()
        data["tokens"] = {"ids": cols["token_id"], "text": cols["token"], "step": cols["step"]}
        for item in data["layers"]:
            for name in _LAYER_ARRAYS:
                item[name] = cols[f"layer{item['layer']}.{name}"]
        for name in ("top_ids", "top_logprobs", "top_tokens", "target_logprob", "entropy"):
            data["output"][name] = cols[f"output.{name}"]
        data["output"]["vocab_logprobs"] = cols.get("output.vocab_logprobs")
        return cls.from_dict(data)


_LAYER_ARRAYS: dict[str, torch.dtype] = {
    "router_logits": torch.float32,
    "router_probs": torch.float32,
    "native_index": torch.long,
    "native_weights": torch.float32,
    "index": torch.long,
    "weights": torch.float32,
    "dropped": torch.bool,
}


def _arrow_type(column: str) -> Any:
    import pyarrow as pa

    name = column.rsplit(".", 1)[-1]
    if column in ("token_id", "step"):
        return pa.int64()
    if column == "token":
        return pa.string()
    if name == "top_tokens":
        return pa.list_(pa.string())
    if name in ("target_logprob", "entropy"):
        return pa.float32()
    if name in ("native_index", "index", "top_ids"):
        return pa.list_(pa.int64())
    if name == "dropped":
        return pa.list_(pa.bool_())
    return pa.list_(pa.float32())
