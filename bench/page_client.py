"""Websocket sessions on any page of the app, and sessions held open (for bench/soak.py).

``tests/streamlit_client.py`` runs the default page (Explore) and closes each websocket when the
script finishes. This adds what the soak needs on top of it, without changing it: a page picked by
its URL path (``compare`` for Compare modes; Streamlit resolves ``page_name`` against each page's
``url_pathname``), metric elements among the collected texts (the Compare page shows its numbers as
``st.metric``), and sessions that stay connected after their run so that the server's memory per
live session can be measured.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import websockets
from streamlit.proto.Alert_pb2 import Alert
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from streamlit_client import SessionResult  # noqa: E402


def _text_of(fm: ForwardMsg) -> tuple[str, str] | None:
    """Like streamlit_client's, plus ``("metric", "label: value")``; alerts are ``error``, ``warning``
    or ``alert`` (info, success) by their format."""
    if fm.WhichOneof("type") != "delta" or fm.delta.WhichOneof("type") != "new_element":
        return None
    element = fm.delta.new_element
    kind = element.WhichOneof("type")
    if kind in ("markdown", "heading"):
        return kind, getattr(element, kind).body
    if kind == "alert":  # errors and warnings as their own kinds: the soak counts them as failures
        name = {Alert.ERROR: "error", Alert.WARNING: "warning"}.get(element.alert.format, "alert")
        return name, element.alert.body
    if kind == "exception":
        return kind, f"{element.exception.type}: {element.exception.message}"
    if kind == "metric":
        return kind, f"{element.metric.label}: {element.metric.body}"
    return None


async def _run(ws: websockets.ClientConnection, result: SessionResult, page: str, timeout_s: float) -> None:
    start = time.perf_counter()
    msg = BackMsg()
    msg.rerun_script.query_string = result.query
    msg.rerun_script.page_script_hash = ""
    msg.rerun_script.page_name = page
    await ws.send(msg.SerializeToString())
    while time.perf_counter() - start < timeout_s:
        raw = await asyncio.wait_for(ws.recv(), timeout=timeout_s)
        fm = ForwardMsg()
        fm.ParseFromString(raw)
        text = _text_of(fm)
        if text is not None:
            result.texts.append(text)
            if text[0] == "exception":
                result.exceptions.append(text[1])
        if fm.WhichOneof("type") == "page_not_found":
            result.exceptions.append(f"page not found: {page!r}")
        if fm.WhichOneof("type") == "script_finished":
            result.finished = True
            break
    result.seconds = time.perf_counter() - start


def _connect(port: int) -> websockets.connect:
    return websockets.connect(
        f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=None, open_timeout=60
    )


async def run_page_session(port: int, query: str, page: str = "", timeout_s: float = 300.0) -> SessionResult:
    """One session on ``page`` (a URL path such as ``compare``; empty for the default page)."""
    result = SessionResult(query=query)
    start = time.perf_counter()
    try:
        async with _connect(port) as ws:
            await _run(ws, result, page, timeout_s)
    except (OSError, TimeoutError, websockets.WebSocketException) as err:
        result.exceptions.append(f"client: {type(err).__name__}: {err}")
    result.seconds = time.perf_counter() - start
    return result


async def run_page_sessions(port: int, jobs: list[tuple[str, str]], timeout_s: float = 300.0) -> list[SessionResult]:
    """Run ``(query, page)`` jobs as concurrent sessions."""
    return list(await asyncio.gather(*(run_page_session(port, q, p, timeout_s) for q, p in jobs)))


@asynccontextmanager
async def held_sessions(
    port: int, jobs: list[tuple[str, str]], timeout_s: float = 300.0
) -> AsyncIterator[list[SessionResult]]:
    """Open one session per ``(query, page)``, run each script once, and keep every websocket
    open (the sessions stay live on the server) until the block ends."""
    sockets = [await _connect(port) for _ in jobs]
    try:
        results = [SessionResult(query=q) for q, _ in jobs]
        await asyncio.gather(*(_run(ws, r, p, timeout_s) for ws, r, (_, p) in zip(sockets, results, jobs)))
        yield results
    finally:
        for ws in sockets:
            await ws.close()
