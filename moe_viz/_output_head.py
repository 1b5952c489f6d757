"""The model's output head, proved at load to be a plain projection, so that a run can skip the
vocabulary.

A causal LM's forward ends with ``logits = lm_head(last_hidden_state)``: one (T, H) x (H, V)
product, which on a small model costs as much as all its MoE layers (the default model: a fifth of
its forward at 256 tokens). A page reads the next-token predictions of a position or two. So a run
asks the model for the last row only (transformers' ``logits_to_keep=1``), keeps the (T, H) hidden
states the head would have projected, and projects a row when someone reads it
(``ProjectedLogits``): the same numbers, the same operation, a fraction of the work and of the
memory (H floats a row instead of V).

That is only true where the forward returns ``lm_head``'s output unchanged. Some families scale or
soft-cap it (Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma's soft-capping). So
``find_output_head`` proves it per model at load, and a model it cannot prove keeps computing every
row in its own forward:

* the forward's source assigns ``logits`` once, from ``self.lm_head(...)``, and never changes it;
* on the calibration tokens, the forward asked for its last row (``logits_to_keep=1``) returns
  bit for bit the head applied to the last row of the base model's output: nothing changes the
  head's input or output on the way (a norm, a scale, a soft cap would).

The whole distribution, projected from the hidden states at once, is the full forward's bit for
bit: the tests check it for every family transformers ships that can be built tiny.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class OutputHead:
    """A model's proven output head: ``module`` maps the base model's (..., H) output to logits."""

    module: nn.Module
    base: nn.Module  # the base model, whose output the head projects
    vocab_size: int
    device: torch.device  # where the base model's output is, and so the head's input in the forward

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, n, H) hidden states -> (1, n, V) logits, exactly as the model's forward projects them
        (on a model dispatched by accelerate the head's own hook places its weights)."""
        with torch.inference_mode():
            return self.module(hidden.to(self.device))


def last_hidden_state(output: Any) -> torch.Tensor | None:
    """The (B, T, H) final hidden states from a base model's output (a ModelOutput or a tuple)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, tuple) and output:
        hidden = output[0]
    return hidden if isinstance(hidden, torch.Tensor) else None


def find_output_head(model: nn.Module, ids: torch.Tensor) -> tuple[OutputHead | None, str]:
    """``model``'s output head when it is proven plain on the (1, T) calibration ``ids``, else None
    and the reason (the model then computes every row of logits in its own forward)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # the base model: by its declared prefix, else the usual ``model`` attribute (Llama 4 declares
    # "language_model" and keeps it as ``model``); the proof below checks that it is the right one
    bases = [getattr(model, "base_model", None), getattr(model, "model", None)]
    base = next((b for b in bases if isinstance(b, nn.Module) and b is not model), None)
    if not isinstance(head, nn.Module) or base is None:
        return None, "the model has no separate base model and output head"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None, "its forward has no logits_to_keep argument"
    why = _changes_logits_after_head(type(model))
    if why:
        return None, why
    captured: list[torch.Tensor | None] = []
    hook = base.register_forward_hook(lambda module, args, output: captured.append(last_hidden_state(output)))
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            last = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1).logits  # (1, 1, V)
        if len(captured) != 1 or captured[0] is None:
            return None, "the base model's output holds no last_hidden_state"
        proven = OutputHead(head, base, vocab_size=int(last.shape[-1]), device=captured[0].device)
        same = torch.equal(proven.project(captured[0][:, -1:]), last)
    except Exception as err:  # noqa: BLE001 - any failure means: not proven, compute every row
        return None, f"projecting with the output head alone failed ({type(err).__name__}: {err})"[:300]
    finally:
        hook.remove()
    if not same:
        return None, "the output head applied to the base model's output does not give the model's logits"
    return proven, ""


def _changes_logits_after_head(cls: type) -> str:
    """Why the forward of ``cls`` may return something other than ``lm_head``'s output ('' if not):
    its source must assign ``logits`` exactly once, from a ``self.lm_head(...)`` call."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return "its forward's source cannot be read"
    assigned = []  # the value of every assignment to the name ``logits``
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            names = [t for t in node.targets if isinstance(t, ast.Name) and t.id == "logits"]
            assigned += [node.value] * len(names)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign) and getattr(node.target, "id", None) == "logits":
            assigned.append(node.value)
    if not assigned:
        return "its forward assigns no logits of its own"
    if len(assigned) > 1:
        return "its forward changes the logits after lm_head (a scale or a soft cap)"
    call = assigned[0]
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "lm_head"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "self"
    ):
        return "its forward does not take its logits straight from self.lm_head(...)"
    return ""


class ProjectedLogits:
    """A run's (T, V) next-token logits, kept as the (T, H) hidden states the head projects.

    ``rows(start, stop)`` projects those rows when read; ``full()`` all of them, as one product, so
    its numbers are the full forward's bit for bit. ``last`` (V,) is the row the model's own
    forward returned (``logits_to_keep=1``), kept so that reading it costs nothing."""

    def __init__(self, head: OutputHead, hidden: torch.Tensor, last: torch.Tensor | None = None) -> None:
        self.head = head
        self.hidden = hidden  # (T, H), on the CPU
        self.last = last  # (V,) or None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.hidden.shape[0]), self.head.vocab_size)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, V) logits of rows ``start`` to ``stop - 1``, on the CPU."""
        T = self.shape[0]
        if self.last is not None and (start, stop) == (T - 1, T):
            return self.last.unsqueeze(0)
        return self.head.project(self.hidden[start:stop].unsqueeze(0))[0].cpu()

    def full(self) -> torch.Tensor:
        """(T, V) logits of every row, computed now (not kept)."""
        return self.rows(0, self.shape[0])

    def window(self, start: int, stop: int) -> ProjectedLogits:
        T = self.shape[0]
        return ProjectedLogits(self.head, self.hidden[start:stop], self.last if stop == T and start < T else None)

    def held_tensors(self) -> list[torch.Tensor]:
        return [self.hidden] + ([self.last] if self.last is not None else [])


class KeptLogits:
    """A run's (T, V) next-token logits kept as they are (a model whose head is not proven plain,
    or one given its logits): the same reading interface as ``ProjectedLogits``."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits.detach().cpu()  # (T, V), in the model's dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.logits.shape[0]), int(self.logits.shape[1]))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.logits[start:stop]

    def full(self) -> torch.Tensor:
        return self.logits

    def window(self, start: int, stop: int) -> KeptLogits:
        return KeptLogits(self.logits[start:stop])

    def held_tensors(self) -> list[torch.Tensor]:
        return [self.logits]


Logits = KeptLogits | ProjectedLogits
