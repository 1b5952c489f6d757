"""A headless Streamlit session speaking the server's own websocket protocol.

Used by the load test and ``bench/load.py``: each ``run_session`` opens a websocket to a running
``streamlit run`` server, asks for one script run with a query string (the app reads its prompt
and routing settings from the URL), and returns every text element the page sent, whether the run
raised, and how long it took. Far lighter than a browser, so 32 sessions fit on two cores.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

ROOT = Path(__file__).resolve().parent.parent


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
    if fm.WhichOneof("type") != "delta" or fm.delta.WhichOneof("type") != "new_element":
        return None
    element = fm.delta.new_element
    kind = element.WhichOneof("type")
    if kind in ("markdown", "alert", "heading"):
        return kind, getattr(element, kind).body
    if kind == "exception":
        return kind, f"{element.exception.type}: {element.exception.message}"
    return None


async def run_session(port: int, query: str, timeout_s: float = 300.0) -> SessionResult:
    """One browser-less session: connect, run the script once with ``query``, collect its output."""
    result = SessionResult(query=query)
    start = time.perf_counter()
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=None, open_timeout=60
    ) as ws:
        msg = BackMsg()
        msg.rerun_script.query_string = query
        msg.rerun_script.page_script_hash = ""
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
            if fm.WhichOneof("type") == "script_finished":
                result.finished = True
                break
    result.seconds = time.perf_counter() - start
    return result


async def run_sessions(port: int, queries: list[str], timeout_s: float = 300.0) -> list[SessionResult]:
    """Run all ``queries`` as concurrent sessions."""
    return list(await asyncio.gather(*(run_session(port, q, timeout_s) for q in queries)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def streamlit_command(port: int) -> list[str]:
    """``streamlit run`` of the app on loopback ``port``, headless, no usage stats, no file watcher."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app" / "streamlit_app.py"),
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
    """``streamlit run app/streamlit_app.py`` on loopback, with extra environment; a context manager."""

    def __init__(self, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        cmd = streamlit_command(self.port)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise RuntimeError("streamlit server did not become healthy within 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
