"""Limits and settings of the app, in one place.

Every value comes from the environment, so a deployment changes the environment, not the code.
``MOE_VIZ_HOSTED=1`` switches on **hosted mode** for a public demo: models come from an
allow-list only (the default model always), local paths and remote code are refused, and every
request is bounded. Any single setting below can still be overridden by its own variable.

| setting | env var | local default | hosted default |
|---|---|---|---|
| hosted mode | ``MOE_VIZ_HOSTED`` | ``0`` | ``1`` |
| model shown at start | ``MOE_VIZ_MODEL`` | ``$MOE_VIZ_DEFAULT_MODEL``, else the model shipped in ``assets/`` | same |
| other models allowed (hosted: hub ids only) | ``MOE_VIZ_ALLOW_CUSTOM_MODELS`` | ``1`` | ``1`` if an allow-list is set |
| allow-list of hub ids (comma-separated) | ``MOE_VIZ_ALLOWED_MODELS`` | any | none: the default model only |
| max prompt tokens | ``MOE_VIZ_MAX_PROMPT_TOKENS`` | 2048 | 512 |
| max prompt characters (text box) | ``MOE_VIZ_MAX_PROMPT_CHARS`` | 20000 | 4000 |
| max new tokens when generating | ``MOE_VIZ_MAX_NEW_TOKENS`` | 64 | 32 |
| max k | ``MOE_VIZ_MAX_K`` | E | E |
| capacity factor range | ``MOE_VIZ_MIN_CAPACITY_FACTOR``, ``MOE_VIZ_MAX_CAPACITY_FACTOR`` | 0.1 .. 4 | 0.1 .. 4 |
| ensemble allowed up to E experts | ``MOE_VIZ_MAX_ENSEMBLE_EXPERTS`` | any | 64 |
| time budget per request, seconds | ``MOE_VIZ_TIME_BUDGET_S`` | none | 30 |
| model computations at once | ``MOE_VIZ_COMPUTE_SLOTS`` | unbounded | 2 |
| longest wait for a free slot, seconds | ``MOE_VIZ_MAX_WAIT_S`` | — | 120 |
| traces kept per session | ``MOE_VIZ_TRACES_PER_SESSION`` | 24 | 6 |
| memory for a session's traces, MiB (oldest evicted first; 0 = no bound) | ``MOE_VIZ_SESSION_MB`` | 0 | 64 |
| token rows per analysis (ablation grid, sweeps: copies x tokens x forwards) | ``MOE_VIZ_MAX_ANALYSIS_TOKENS`` | unbounded | 16384 |
| tokens per corpus run (Corpus and Paper pages) | ``MOE_VIZ_MAX_CORPUS_TOKENS`` | unbounded | 60000 |
| corpus upload size, MiB (hosted: uploads are the only source besides the demo) | ``MOE_VIZ_MAX_CORPUS_UPLOAD_MB`` | 200 | 2 |
| engine-routing import upload size, MiB (0 = Import off; hosted: uploads only, no paths) | ``MOE_VIZ_MAX_IMPORT_UPLOAD_MB`` | 200 | 2 |
| torch threads (set once, process-wide) | ``MOE_VIZ_TORCH_THREADS`` | cores − 2 (at least 1) | cores / slots |
| Explore's first chart before the rest of the page on a first visit (``app/first_paint.py``): ``auto`` (browsers only), ``always``, ``never`` | ``MOE_VIZ_FIRST_PAINT`` | ``auto`` | ``auto`` |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moe_viz import DEFAULT_MODEL, Limits
from moe_viz.models import default_model_location, looks_like_local_path

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


def _env_float(name: str, default: float | None, low: float = 0.0) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number; got {raw!r}") from None
    if not value > low or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > {low:g}; got {raw!r}")
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return raw


FIRST_PAINT_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class AppConfig:
    """The app's settings and limits. Built from the environment by ``load_config``."""

    default_model: str = DEFAULT_MODEL
    allow_custom_models: bool = True
    max_prompt_tokens: int = 2048
    max_prompt_chars: int = 20_000
    max_new_tokens: int = 64
    torch_threads: int | None = None
    default_prompt: str = DEFAULT_PROMPT
    hosted: bool = False
    allowed_models: tuple[str, ...] = ()
    max_k: int | None = None
    min_capacity_factor: float = 0.1
    max_capacity_factor: float = 4.0
    max_ensemble_experts: int | None = None
    time_budget_s: float | None = None
    compute_slots: int | None = None
    max_wait_s: float = 120.0
    traces_per_session: int = 24
    session_mb: int | None = None  # bytes a session's traces may hold, in MiB (None: only the count bounds them)
    max_analysis_tokens: int | None = None
    max_corpus_tokens: int | None = None
    max_corpus_upload_mb: int = 200
    max_import_upload_mb: int = 200
    first_paint: str = "auto"  # when Explore sends its first chart before the rest: FIRST_PAINT_MODES

    @property
    def limits(self) -> Limits:
        """The per-request limits the library enforces for this app."""
        return Limits(
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_new_tokens,
            max_k=self.max_k,
            min_capacity_factor=self.min_capacity_factor,
            max_capacity_factor=self.max_capacity_factor,
            max_ensemble_experts=self.max_ensemble_experts,
            time_budget_s=self.time_budget_s,
            max_analysis_tokens=self.max_analysis_tokens,
        )

    def check_model_request(self, name: str, trust_remote_code: bool = False) -> None:
        """Raise ValueError unless this server may load ``name`` (with ``trust_remote_code``)."""
        if name == self.default_model:
            return
        if not self.allow_custom_models:
            raise ValueError(f"this server only runs its default model; {name!r} is not available")
        if not self.hosted:
            return
        if trust_remote_code:
            raise ValueError("this server never runs a checkpoint's own code (trust_remote_code is refused)")
        if looks_like_local_path(name):
            raise ValueError(f"this server does not load local folders; {name!r} looks like a path")
        if name not in self.allowed_models:
            allowed = ", ".join(self.allowed_models) or "none besides the default model"
            raise ValueError(f"model {name!r} is not on this server's allow-list (allowed: {allowed})")

    def limit_rows(self) -> list[tuple[str, str]]:
        """(setting, value) rows to show users what this server allows."""
        unlimited = "no limit"
        return [
            ("mode", "hosted" if self.hosted else "local"),
            (
                "models",
                "default only"
                if not self.allow_custom_models
                else ("allow-list: " + (", ".join(self.allowed_models) or "default only"))
                if self.hosted
                else "any hub id or folder",
            ),
            ("prompt tokens", str(self.max_prompt_tokens)),
            ("new tokens", str(self.max_new_tokens)),
            ("k", f"1 .. {self.max_k}" if self.max_k else "1 .. number of experts"),
            ("capacity factor", f"{self.min_capacity_factor:g} .. {self.max_capacity_factor:g}"),
            (
                "ensemble mode",
                f"models with at most {self.max_ensemble_experts} experts" if self.max_ensemble_experts else unlimited,
            ),
            ("time per request", f"{self.time_budget_s:g} s" if self.time_budget_s else unlimited),
            ("computations at once", str(self.compute_slots) if self.compute_slots else unlimited),
            ("traces kept per session", str(self.traces_per_session)),
            (
                "memory per session",
                f"{self.session_mb} MiB of traces (oldest dropped first)" if self.session_mb else unlimited,
            ),
            (
                "analyses (ablation grid, sweeps)",
                f"at most {self.max_analysis_tokens} token rows each" if self.max_analysis_tokens else unlimited,
            ),
            ("corpus runs", f"at most {self.max_corpus_tokens} tokens" if self.max_corpus_tokens else unlimited),
            (
                "corpus sources",
                f"the demo corpus, or an upload of at most {self.max_corpus_upload_mb} MiB"
                if self.hosted
                else f"any file or folder here, uploads up to {self.max_corpus_upload_mb} MiB",
            ),
            (
                "engine-routing imports",
                "off"
                if not self.max_import_upload_mb
                else f"uploads of at most {self.max_import_upload_mb} MiB"
                if self.hosted
                else f"any file or folder here, uploads up to {self.max_import_upload_mb} MiB",
            ),
        ]


def load_config() -> AppConfig:
    """The config for this process, read from the environment (see the module docstring)."""
    hosted = _env_bool("MOE_VIZ_HOSTED", False)
    allowed = tuple(m.strip() for m in os.environ.get("MOE_VIZ_ALLOWED_MODELS", "").split(",") if m.strip())
    slots = (
        _env_int("MOE_VIZ_COMPUTE_SLOTS", 2) if hosted or os.environ.get("MOE_VIZ_COMPUTE_SLOTS", "").strip() else None
    )
    threads = os.environ.get("MOE_VIZ_TORCH_THREADS", "").strip()
    if threads:
        torch_threads: int | None = _env_int("MOE_VIZ_TORCH_THREADS", 1)
    elif slots is not None:
        torch_threads = max(1, (os.cpu_count() or 1) // slots)  # slots x threads = cores: no oversubscription
    else:
        # The browser drawing the page shares this machine (local use) and is busiest while the
        # first run computes; a torch thread pool over every core then waits on preempted threads
        # (the default model's 26-token forward: 230 ms instead of 8 on 2 cores). Leave it two.
        torch_threads = max(1, (os.cpu_count() or 1) - 2)
    return AppConfig(
        default_model=os.environ.get("MOE_VIZ_MODEL", "").strip() or str(default_model_location()),
        allow_custom_models=_env_bool("MOE_VIZ_ALLOW_CUSTOM_MODELS", bool(allowed) or not hosted),
        max_prompt_tokens=_env_int("MOE_VIZ_MAX_PROMPT_TOKENS", 512 if hosted else 2048),
        max_prompt_chars=_env_int("MOE_VIZ_MAX_PROMPT_CHARS", 4_000 if hosted else 20_000),
        max_new_tokens=_env_int("MOE_VIZ_MAX_NEW_TOKENS", 32 if hosted else 64),
        torch_threads=torch_threads,
        hosted=hosted,
        allowed_models=allowed,
        max_k=_env_int("MOE_VIZ_MAX_K", 0, low=0) or None,
        min_capacity_factor=_env_float("MOE_VIZ_MIN_CAPACITY_FACTOR", 0.1) or 0.1,
        max_capacity_factor=_env_float("MOE_VIZ_MAX_CAPACITY_FACTOR", 4.0) or 4.0,
        max_ensemble_experts=_env_int("MOE_VIZ_MAX_ENSEMBLE_EXPERTS", 64 if hosted else 0, low=0) or None,
        time_budget_s=_env_float("MOE_VIZ_TIME_BUDGET_S", 30.0 if hosted else None),
        compute_slots=slots,
        max_wait_s=_env_float("MOE_VIZ_MAX_WAIT_S", 120.0) or 120.0,
        traces_per_session=_env_int("MOE_VIZ_TRACES_PER_SESSION", 6 if hosted else 24),
        session_mb=_env_int("MOE_VIZ_SESSION_MB", 64 if hosted else 0, low=0) or None,
        max_analysis_tokens=_env_int("MOE_VIZ_MAX_ANALYSIS_TOKENS", 16_384 if hosted else 0, low=0) or None,
        max_corpus_tokens=_env_int("MOE_VIZ_MAX_CORPUS_TOKENS", 60_000 if hosted else 0, low=0) or None,
        max_corpus_upload_mb=_env_int("MOE_VIZ_MAX_CORPUS_UPLOAD_MB", 2 if hosted else 200),
        max_import_upload_mb=_env_int("MOE_VIZ_MAX_IMPORT_UPLOAD_MB", 2 if hosted else 200, low=0),
        first_paint=_env_choice("MOE_VIZ_FIRST_PAINT", "auto", FIRST_PAINT_MODES),
    )
