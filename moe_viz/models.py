"""Load a tokenizer + MoE causal LM with transformers' own classes, and instrument its routers.

``load_model`` accepts a hub id or a local folder (default: ``$MOE_VIZ_DEFAULT_MODEL``, else the model
shipped in ``assets/``; see ``default_model_path``),
picks CUDA when present, puts the model in eval mode, keeps ``trust_remote_code`` off unless asked
and hub kernels off always, and installs the router hooks once. The result, a ``MoEModel``, is
safe to share between threads: nothing on it changes per call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._hooks import Instrumentation, instrument
from ._routers import CAPTURE_ONLY_ROUTERS, SUPPORTED_ROUTERS, RouterSite

# The default model: the folder named by MOE_VIZ_DEFAULT_MODEL, else the one shipped in assets/
# beside the package (present in a source checkout / editable install; a wheel does not carry it).
DEFAULT_MODEL_ENV = "MOE_VIZ_DEFAULT_MODEL"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODEL_DIR = ASSETS_DIR / "moe-viz-mini"


def default_model_location() -> Path:
    """Where the default model should be (``$MOE_VIZ_DEFAULT_MODEL`` or the shipped folder); not checked."""
    raw = os.environ.get(DEFAULT_MODEL_ENV, "").strip()
    return Path(os.path.expanduser(raw)).absolute() if raw else SHIPPED_MODEL_DIR


def default_model_path() -> str:
    """The default model's folder, read from the environment now; ValueError, saying where it
    looked and how to fix it, when that folder is missing or holds no config.json."""
    return _checked_default(default_model_location(), bool(os.environ.get(DEFAULT_MODEL_ENV, "").strip()))


def _checked_default(path: Path, from_env: bool) -> str:
    if from_env:
        where = f"{path} (from {DEFAULT_MODEL_ENV})"
        fix = f"point {DEFAULT_MODEL_ENV} at a model folder with config.json"
    else:
        where = f"{path} (the assets/ folder beside the moe_viz package; {DEFAULT_MODEL_ENV} is not set)"
        fix = (
            f"set {DEFAULT_MODEL_ENV}=/path/to/moe-viz-mini (a folder with config.json, e.g. the assets/ folder "
            "of a source checkout, or one written by `moe-viz train-default --out DIR`), or pass a model to "
            "load_model()"
        )
    if not path.is_dir():
        raise ValueError(f"default model not found: no folder at {where}. To fix: {fix}")
    if not (path / "config.json").is_file():
        raise ValueError(f"default model folder {where} has no config.json. To fix: {fix}")
    return str(path)


# Resolved once, at import (the library's and the app's default). Never raises: a missing
# folder is reported by default_model_path() / load_model() when the default is actually used.
_DEFAULT_FROM_ENV = bool(os.environ.get(DEFAULT_MODEL_ENV, "").strip())
DEFAULT_MODEL = str(default_model_location())


@dataclass(frozen=True)
class MoEModel:
    """A loaded, instrumented MoE model with its tokenizer. Share it; never mutate it."""

    model: nn.Module
    tokenizer: Any
    model_id: str
    instrumentation: Instrumentation

    @property
    def sites(self) -> tuple[RouterSite, ...]:
        return self.instrumentation.sites

    # The config does not change once loaded: its values are read once (transformers' config
    # attribute lookups cost microseconds each, and every run asks for these).
    @cached_property
    def architecture(self) -> str:
        return str(getattr(self.model.config, "model_type", type(self.model).__name__))

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (where input ids go)."""
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        return self._first_parameter().dtype

    def _first_parameter(self) -> torch.Tensor:
        """``next(model.parameters())``, read through the slot (module, name) that holds it.

        Every run asks for the device and dtype; walking the module tree for them costs more than
        reading one slot. The slot, not the tensor, is remembered: moving a model (``.to``,
        accelerate's dispatch) may put a new tensor in it, and the slot then holds that one."""
        slot = self.__dict__.get("_first_parameter_slot")
        if slot is not None:
            param = slot[0]._parameters.get(slot[1])
            if param is not None:
                return param
        for module in self.model.modules():  # the order parameters() walks
            for name, param in module._parameters.items():
                if param is not None:
                    self.__dict__["_first_parameter_slot"] = (module, name)  # frozen: as cached_property does
                    return param
        raise ValueError(f"model {self.model_id!r} has no parameters")

    @property
    def num_layers(self) -> int:
        config = self.model.config.get_text_config()
        return int(getattr(config, "num_hidden_layers", len(self.sites)))

    @property
    def moe_layers(self) -> list[int]:
        return [site.layer for site in self.sites]

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (the largest, should layers differ)."""
        return max(site.spec.num_experts for site in self.sites)

    @property
    def top_k(self) -> int:
        """The model's own k (the largest, should layers differ)."""
        return max(site.spec.top_k for site in self.sites)

    @property
    def routing_summary(self) -> str:
        """One sentence on how the routers' maths was established at load, e.g. 'routing maths
        verified on load for 4 routers'."""
        counts = {status: 0 for status in ("verified", "partial", "capture")}
        for site in self.sites:
            counts[getattr(site.verification, "status", "capture")] += 1
        parts = []
        if counts["verified"]:
            parts.append(
                f"routing maths verified on load for {counts['verified']} router{'s' * (counts['verified'] != 1)}"
            )
        if counts["partial"]:
            parts.append(f"partial support on {counts['partial']} (native choice only: other k and ensemble refused)")
        if counts["capture"]:
            parts.append(f"capture-only on {counts['capture']}")
        return "; ".join(parts)

    @property
    def capture_only(self) -> bool:
        """True when no router's maths is reproduced: only native routing (and, on routers with
        partial support, capacity at their own k) can run. A model that mixes verified routers with
        others (DeepSeek-V4's hash-routed layers) is not capture-only: policies run where they can."""
        return not any(site.spec.substitutable for site in self.sites)

    @cached_property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is unsupported); on CPU the checkpoint's dtype, except fp16,
    which CPUs run slowly and imprecisely, so it becomes fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if checkpoint_dtype in (torch.float32, torch.bfloat16):
        return checkpoint_dtype
    return torch.float32


def model_source(name_or_path: str) -> str:
    """What transformers should load for ``name_or_path``: the folder (``~`` expanded) when it is
    one, else the hub id. ValueError for a local-looking path that is not a folder."""
    expanded = os.path.expanduser(name_or_path)
    if looks_like_local_path(name_or_path) and not Path(expanded).is_dir():
        raise ValueError(f"model folder {name_or_path!r} does not exist (expected a folder with config.json)")
    return expanded if Path(expanded).is_dir() else name_or_path


def looks_like_local_path(name: str) -> bool:
    """A folder rather than a hub id ("org/name"): absolute, relative, home, more than one slash,
    a drive or scheme colon, or something that exists on disk."""
    return name.startswith(("/", ".", "~", "\\")) or ":" in name or name.count("/") > 1 or os.path.exists(name)


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    experts_implementation: str | None = None,
    **from_pretrained: Any,
) -> MoEModel:
    """Load ``name_or_path`` (hub id or local folder) as an instrumented ``MoEModel``.

    Raises ValueError when the folder is missing, the id cannot be loaded, or the model has no
    MoE layer. ``device_map`` (e.g. ``"auto"``) dispatches a large checkpoint with accelerate.
    """
    from transformers import AutoConfig, AutoTokenizer

    if name_or_path is None:  # the default model: $MOE_VIZ_DEFAULT_MODEL or the shipped one
        name_or_path = default_model_path()
    elif name_or_path == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
        _checked_default(Path(DEFAULT_MODEL), _DEFAULT_FROM_ENV)  # raises, saying how to set it
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model must be a hub id or a local folder; got {name_or_path!r}")
    name_or_path = name_or_path.strip()
    source = model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError / ValueError / KeyError variants
        raise ValueError(
            f"could not load model {name_or_path!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            "Give a local folder with config.json or a hub id of a causal-LM MoE checkpoint"
        ) from None
    checkpoint_dtype = getattr(config.get_text_config(), "dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = getattr(torch, checkpoint_dtype, None)
    target = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(target, checkpoint_dtype)
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_kernels=False)
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    kwargs.update(from_pretrained)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = _auto_model(source, kwargs)
    except ValueError as err:
        raise ValueError(f"could not load model {name_or_path!r} as a causal LM: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise ValueError(f"could not load model {name_or_path!r}: {str(err).splitlines()[0]}") from None
    if device_map is None:
        model.to(target)
    model.eval()
    return wrap_model(model, tokenizer, model_id=name_or_path)


# Auto classes tried in turn: a causal LM, then the multimodal wrappers whose text stack is an MoE
# (Qwen3-VL-MoE, Aria, GLM-4.5V, MiniMax-M3-VL: image-text-to-text; Qwen3-Omni-MoE: multimodal LM).
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")


def _auto_model(source: str, kwargs: dict[str, Any]) -> nn.Module:
    """The model of ``source`` from the first Auto class in ``AUTO_CLASSES`` that knows its config;
    a multimodal model runs text prompts alone."""
    import transformers

    for name in AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(source, **kwargs)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err) or name == AUTO_CLASSES[-1]:
                raise
    raise ValueError(f"no Auto class of this transformers loads {source!r}")


def wrap_model(model: nn.Module, tokenizer: Any, model_id: str) -> MoEModel:
    """Instrument an already-loaded transformers model (e.g. built from a config in a test)."""
    instrumentation = instrument(model, tokenizer)
    if not instrumentation.sites:
        instrumentation.remove()
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"model {model_id!r} (architecture {arch!r}) has no MoE layers: moe-viz needs a Mixture-of-Experts "
            f"model whose routers it recognises (supported: {', '.join(SUPPORTED_ROUTERS)}; "
            f"capture-only: {', '.join(CAPTURE_ONLY_ROUTERS)}; or any *TopKRouter with the standard output)"
        )
    return MoEModel(model=model, tokenizer=tokenizer, model_id=model_id, instrumentation=instrumentation)
