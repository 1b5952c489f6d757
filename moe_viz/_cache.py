"""An explicit cache of statistics per trace (or pair of traces), kept outside the traces.

Pages, views and explanations ask for the same statistics of one trace several times (the
balance table, the effect of a mode against native). A trace is frozen, so a result computed
once stays right. Entries are keyed by the traces' identity and live as long as the traces do
(weak references): when a session drops a trace, its statistics go with it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class TraceCache:
    """``get(trace, name, compute, partner=None)``: ``compute()`` once per (trace, partner, name)."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[Any, dict[tuple[Hashable, int | None], tuple[Any, Any]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self, trace: Any, name: Hashable, compute: Callable[[], T], partner: Any = None) -> T:
        key = (name, None if partner is None else id(partner))
        with self._lock:
            entry = self._entries.get(trace, {}).get(key)
        # identity check: an id can be reused once the partner is garbage-collected
        if entry is not None and (entry[0] is None or entry[0]() is partner):
            return entry[1]
        value = compute()  # outside the lock: two sessions never wait on each other's maths
        ref = None if partner is None else weakref.ref(partner)
        with self._lock:
            self._entries.setdefault(trace, {})[key] = (ref, value)
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


STATS = TraceCache()  # the statistics cache that ``metrics`` uses
