"""Sharing one machine between many callers: request limits and a fair compute gate.

``Limits`` bounds what one request may ask for (prompt tokens, new tokens, k, capacity factor,
ensemble on very many experts, time) and refuses the rest with a ValueError that names the
argument, the value and the allowed range. ``ComputeGate`` lets at most ``slots`` model
computations run at once; the others wait in first-come order and can see their place in the
queue. Neither knows about the web framework: the app wires them to its pages.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ._routers import RouterSpec
from .policies import Policy, check_policy


class Busy(RuntimeError):
    """The server was too busy to start the request within its wait limit."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits. ``None`` means unlimited (beyond the library's own sanity checks)."""

    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_k: int | None = None
    min_capacity_factor: float | None = None
    max_capacity_factor: float | None = None
    max_ensemble_experts: int | None = None
    time_budget_s: float | None = None
    max_analysis_tokens: int | None = None  # token rows one analysis (ablation grid, sweep) may run in all

    def check_analysis(self, what: str, forwards: int, copies: int, tokens: int) -> None:
        """Raise ValueError when ``what`` (an analysis that runs ``forwards`` batched forwards of
        ``copies`` copies of a ``tokens``-token prompt) is bigger than this server allows."""
        total = forwards * copies * tokens
        if self.max_analysis_tokens is not None and total > self.max_analysis_tokens:
            fits = self.max_analysis_tokens // max(1, forwards * copies)
            raise ValueError(
                f"{what} runs {forwards} forward(s) of {copies} copies of the {tokens}-token prompt ({total} token "
                f"rows); this server allows at most {self.max_analysis_tokens} token rows per analysis. "
                + (f"Shorten the prompt to {fits} tokens or fewer." if fits else "It cannot run on this model here.")
            )

    def check_policy(self, policy: Policy | None, num_experts: int, top_k: int | None = None) -> None:
        """Raise ValueError if ``policy`` is outside these limits or cannot run on a layer of
        ``num_experts`` experts whose own k is ``top_k`` (the model's own k is always allowed).

        Reads only the policy protocol (``experts_per_token``, ``runs_every_expert``,
        ``capacity_factor``), so a new kind of policy is bounded like the built-in ones.
        """
        router = RouterSpec("softmax", num_experts=num_experts, top_k=top_k if top_k is not None else 1)
        check_policy(policy, router)
        if policy is None:
            return
        if policy.runs_every_expert:
            if self.max_ensemble_experts is not None and num_experts > self.max_ensemble_experts:
                raise ValueError(
                    f"{policy.spec} runs every expert for every token; this server allows that for models with at "
                    f"most {self.max_ensemble_experts} experts per layer, and this model has {num_experts}"
                )
        else:
            k = policy.experts_per_token(router)
            if self.max_k is not None and k > self.max_k and k != router.top_k:
                raise ValueError(f"k must satisfy 1 <= k <= {self.max_k} on this server; got {k}")
        factor = policy.capacity_factor
        if factor is not None:
            low = self.min_capacity_factor if self.min_capacity_factor is not None else 0.0
            high = self.max_capacity_factor if self.max_capacity_factor is not None else float("inf")
            if not low <= factor <= high:
                raise ValueError(
                    f"capacity factor must satisfy {low:g} <= factor <= {high:g} on this server; got {factor:g}"
                )

    def check_new_tokens(self, max_new_tokens: int) -> None:
        if self.max_new_tokens is not None and not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens must satisfy 1 <= max_new_tokens <= {self.max_new_tokens} on this server; "
                f"got {max_new_tokens}"
            )


class ComputeGate:
    """At most ``slots`` computations at once; waiters are served first come, first served."""

    def __init__(self, slots: int) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1; got {slots!r}")
        self.slots = slots
        self._lock = threading.Lock()
        self._running = 0
        self._queue: deque[threading.Event] = deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _admit_next(self) -> None:
        while self._queue and self._running < self.slots:
            self._running += 1
            self._queue.popleft().set()

    @contextmanager
    def slot(self, max_wait_s: float | None = None, on_wait: Callable[[int], None] | None = None) -> Iterator[float]:
        """Hold one slot for the block; yields the seconds spent waiting.

        ``on_wait(place)`` is called (place 1 = next) while queued, about twice a second.
        Raises ``Busy`` if no slot frees up within ``max_wait_s``.
        """
        start = time.monotonic()
        ticket = threading.Event()
        with self._lock:
            self._queue.append(ticket)
            self._admit_next()
        try:
            while not ticket.wait(0.5):
                with self._lock:
                    place = next((i + 1 for i, t in enumerate(self._queue) if t is ticket), 0)
                    if max_wait_s is not None and time.monotonic() - start > max_wait_s and not ticket.is_set():
                        self._queue.remove(ticket)
                        raise Busy(
                            f"the server is busy ({self._running} running, {len(self._queue) + 1} waiting); "
                            f"gave up after {max_wait_s:g} s, please try again"
                        )
                if on_wait is not None and place:
                    on_wait(place)
        except BaseException:
            with self._lock:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                elif ticket.is_set():
                    self._running -= 1
                    self._admit_next()
            raise
        try:
            yield time.monotonic() - start
        finally:
            with self._lock:
                self._running -= 1
                self._admit_next()
