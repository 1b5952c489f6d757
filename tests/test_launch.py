"""The launcher (``moe-viz app`` / ``app/launch.py``): the readiness check turns ready only after
the default model is loaded, and the first session then finds it loaded (no second load)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit_client import free_port, run_sessions

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "app" / "launch.py"
sys.path.insert(0, str(ROOT))

from app.launch import is_ready  # noqa: E402

pytestmark = pytest.mark.slow


def test_readiness_waits_for_the_model_and_the_first_session_finds_it_loaded(tmp_path, monkeypatch):
    port = free_port()
    monkeypatch.setenv("MOE_VIZ_READY_FILE", str(tmp_path / "ready"))
    assert not is_ready(port)  # nothing runs yet
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MOE_VIZ_READY_FILE": str(tmp_path / "ready")}
    flags = ["--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1"]
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCH), *flags, "--browser.gatherUsageStats", "false"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        seen_not_ready = False
        while not is_ready(port):
            seen_not_ready = True
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the launcher did not become ready in 120 s"
            time.sleep(0.1)
        text = (tmp_path / "server.log").read_text()
        assert seen_not_ready
        assert text.count("moe-viz: loading model") == 1 and "loaded in" in text  # loaded before ready
        assert text.index("warmed up in") < text.index("ready on port")  # the first pages ran once before ready
        frozen = int(re.search(r"(\d+) objects set aside from garbage collection", text).group(1))
        assert frozen > 100_000  # the libraries and the model: full collections no longer walk them
        result = asyncio.run(run_sessions(port, ["prompt=hello%20experts"]))[0]
        assert result.finished and not result.exceptions, result.exceptions
        assert result.find("Run summary:") is not None
        time.sleep(0.5)
        text = (tmp_path / "server.log").read_text()
        assert text.count("moe-viz: loading model") == 1, text  # the session found the model loaded
        check = subprocess.run([sys.executable, str(LAUNCH), "--check", "--server.port", str(port)], env=env, cwd=ROOT)
        assert check.returncode == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert not is_ready(port)  # a stopped server is not ready, whatever file is left
