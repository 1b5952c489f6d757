"""Limits and settings of the app, in one place.

Every value has a default suitable for a student's laptop and can be overridden by an
environment variable, so a later hosted deployment changes the environment, not the code:

| setting | env var | default |
|---|---|---|
| model shown at start | ``MOE_VIZ_MODEL`` | the model shipped in ``assets/`` |
| custom models (hub id / folder) allowed | ``MOE_VIZ_ALLOW_CUSTOM_MODELS`` | ``1`` |
| max prompt tokens | ``MOE_VIZ_MAX_PROMPT_TOKENS`` | 2048 |
| max prompt characters (text box) | ``MOE_VIZ_MAX_PROMPT_CHARS`` | 20000 |
| max new tokens when generating | ``MOE_VIZ_MAX_NEW_TOKENS`` | 64 |
| torch threads (set once, process-wide) | ``MOE_VIZ_TORCH_THREADS`` | unset: torch's default |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moe_viz import DEFAULT_MODEL

DEFAULT_PROMPT = "The router sends each token to two of eight experts, and the experts add up their answers."


def _env_int(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1/0, true/false, yes/no or on/off; got {raw!r}")


@dataclass(frozen=True)
class AppConfig:
    """The app's limits. Built from the environment by ``load_config``."""

    default_model: str = DEFAULT_MODEL
    allow_custom_models: bool = True
    max_prompt_tokens: int = 2048
    max_prompt_chars: int = 20_000
    max_new_tokens: int = 64
    torch_threads: int | None = None
    default_prompt: str = DEFAULT_PROMPT


def load_config() -> AppConfig:
    """The config for this process, read from the environment (see the module docstring)."""
    threads = os.environ.get("MOE_VIZ_TORCH_THREADS", "").strip()
    return AppConfig(
        default_model=os.environ.get("MOE_VIZ_MODEL", "").strip() or DEFAULT_MODEL,
        allow_custom_models=_env_bool("MOE_VIZ_ALLOW_CUSTOM_MODELS", True),
        max_prompt_tokens=_env_int("MOE_VIZ_MAX_PROMPT_TOKENS", 2048),
        max_prompt_chars=_env_int("MOE_VIZ_MAX_PROMPT_CHARS", 20_000),
        max_new_tokens=_env_int("MOE_VIZ_MAX_NEW_TOKENS", 64),
        torch_threads=_env_int("MOE_VIZ_TORCH_THREADS", 1) if threads else None,
    )
