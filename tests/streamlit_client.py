"""A headless Streamlit session speaking the server's own websocket protocol.

Used by the load test, ``bench/load.py`` and ``bench/soak.py``: each ``run_session`` opens a
websocket to a running ``streamlit run`` server, asks for one script run of a page (its URL path,
such as ``compare``; empty for the default page) with a query string (the app reads its prompt and
routing settings from the URL), and returns every text element the page sent, whether the run
raised, and how long it took. Far lighter than a browser, so 32 sessions fit on two cores.
``held_sessions`` keeps the websockets open after their runs, so that a server's memory per live
session can be measured.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import websockets
from streamlit.proto.Alert_pb2 import Alert
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app" / "streamlit_app.py"
if str(ROOT) not in sys.path:  # the launcher's readiness check (app.launch)
    sys.path.insert(0, str(ROOT))


@dataclass
class SessionResult:
    """What one session saw: text elements (kind, body), exceptions, timing."""

    query: str
    texts: list[tuple[str, str]] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False

    def find(self, prefix: str) -> str | None:
        """The first text element that starts with ``prefix`` (markdown/caption/alert bodies)."""
        return next((body for _, body in self.texts if body.startswith(prefix)), None)


def _text_of(fm: ForwardMsg) -> tuple[str, str] | None:
    """``(kind, text)`` of a text element: markdown, heading, ``metric`` ("label: value"), an
    exception, and alerts as ``error``, ``warning`` or ``alert`` (info, success) by their format."""
    if fm.WhichOneof("type") != "delta" or fm.delta.WhichOneof("type") != "new_element":
        return None
    element = fm.delta.new_element
    kind = element.WhichOneof("type")
    if kind in ("markdown", "heading"):
        return kind, getattr(element, kind).body
    if kind == "alert":
        name = {Alert.ERROR: "error", Alert.WARNING: "warning"}.get(element.alert.format, "alert")
        return name, element.alert.body
    if kind == "exception":
        return kind, f"{element.exception.type}: {element.exception.message}"
    if kind == "metric":
        return kind, f"{element.metric.label}: {element.metric.body}"
    return None


def _connect(port: int) -> websockets.connect:
    return websockets.connect(
        f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=None, open_timeout=60
    )


async def _run(ws: websockets.ClientConnection, result: SessionResult, page: str, timeout_s: float) -> None:
    """Ask for one run of ``page`` with the result's query and collect its output until it finishes."""
    start = time.perf_counter()
    msg = BackMsg()
    msg.rerun_script.query_string = result.query
    msg.rerun_script.page_script_hash = ""
    msg.rerun_script.page_name = page  # resolved against each page's url_pathname; "" = the default page
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


async def run_session(port: int, query: str, timeout_s: float = 300.0, page: str = "") -> SessionResult:
    """One browser-less session: connect, run ``page`` once with ``query``, collect its output.
    A failed connection or a timeout is recorded among the exceptions."""
    result = SessionResult(query=query)
    start = time.perf_counter()
    try:
        async with _connect(port) as ws:
            await _run(ws, result, page, timeout_s)
    except (OSError, TimeoutError, websockets.WebSocketException) as err:
        result.exceptions.append(f"client: {type(err).__name__}: {err}")
    result.seconds = time.perf_counter() - start
    return result


async def run_sessions(
    port: int, queries: list[str], timeout_s: float = 300.0, pages: list[str] | None = None
) -> list[SessionResult]:
    """Run all ``queries`` as concurrent sessions (on ``pages``, one per query; default page otherwise)."""
    pages = pages or [""] * len(queries)
    return list(
        await asyncio.gather(*(run_session(port, q, timeout_s, p) for q, p in zip(queries, pages, strict=True)))
    )


@asynccontextmanager
async def held_sessions(
    port: int, jobs: list[tuple[str, str]], timeout_s: float = 300.0
) -> AsyncIterator[list[SessionResult]]:
    """Open one session per ``(query, page)``, run each script once, and keep every websocket
    open (the sessions stay live on the server) until the block ends."""
    sockets = [await _connect(port) for _ in jobs]
    try:
        results = [SessionResult(query=q) for q, _ in jobs]
        await asyncio.gather(*(_run(ws, r, p, timeout_s) for ws, r, (_, p) in zip(sockets, results, jobs, strict=True)))
        yield results
    finally:
        for ws in sockets:
            await ws.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def streamlit_command(port: int, script: Path = APP) -> list[str]:
    """``streamlit run`` of ``script`` (the app) on loopback ``port``, headless, no usage stats, no file watcher."""
    return [sys.executable, "-m", "streamlit", "run", str(script), *server_options(port)]


def server_options(port: int) -> list[str]:
    return [
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]


class Server:
    """A Streamlit server on loopback with extra environment; a context manager.

    ``script`` (default: the app) under ``streamlit run``, ready when its health check answers; or,
    with ``launcher``, the app as it is served (``moe-viz app``, the Docker image: ``app/launch.py``
    loads and warms the models before the server starts), ready when the launcher says so.
    ``startup_s``: seconds from process start to ready."""

    def __init__(
        self, env: dict[str, str] | None = None, port: int | None = None, script: Path = APP, launcher: bool = False
    ) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.script = script
        self.launcher = launcher
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        if self.launcher:
            cmd = [sys.executable, str(ROOT / "app" / "launch.py"), *server_options(self.port)]
        else:
            cmd = streamlit_command(self.port, self.script)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while time.perf_counter() - t0 < 60 and self.proc.poll() is None:
            if self._ready():
                self.startup_s = time.perf_counter() - t0
                return self
            time.sleep(0.02)
        self.__exit__()
        raise RuntimeError(f"streamlit server ({' '.join(cmd[1:3])}) did not become ready within 60 s")

    def _ready(self) -> bool:
        if self.launcher:  # the launcher's own check: ready file written (models loaded), server answering
            from app.launch import is_ready

            return is_ready(self.port)
        try:
            with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
