"""Start the app with its models already loaded, and say when it is ready.

    python app/launch.py [streamlit options ...]      # or: moe-viz app [streamlit options ...]
    python app/launch.py --check [--server.port N]    # exit 0 only when the server is ready

Plain ``streamlit run`` loads a model when the first visitor arrives, so that visitor waits for
the load (seconds on the default model, minutes on a large checkpoint). This launcher loads the
default model (and every id in ``MOE_VIZ_PRELOAD_MODELS``, comma-separated, each checked against
the server's allow-list) into the process-wide model cache *before* it starts the server in the
same process, then runs the default prompt and builds the first pages' views once (``warm_up``)
and sets what is loaded aside from garbage collection (``freeze_loaded_objects``); the first
session then finds the model loaded and the code paths warm. Once the server answers its health
check, the launcher writes a ready file (``MOE_VIZ_READY_FILE``, default
``$TMPDIR/moe-viz-ready-<port>``); ``--check`` reports ready only when that file names a live
process and the server answers. Streamlit's own ``/_stcore/health`` turns OK as soon as the server
listens, before any model is loaded: the Docker image's HEALTHCHECK uses ``--check`` instead.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCRIPT = ROOT / "app" / "streamlit_app.py"
DEFAULT_PORT = 8501
log = logging.getLogger("moe_viz.launch")


def _option(args: list[str], name: str, default: str) -> str:
    """The value of a ``--name value`` or ``--name=value`` option among streamlit's arguments."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def ready_file(port: int) -> Path:
    return Path(os.environ.get("MOE_VIZ_READY_FILE") or Path(tempfile.gettempdir()) / f"moe-viz-ready-{port}")


def healthy(port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def is_ready(port: int) -> bool:
    """True when a launcher wrote the ready file (models loaded), its process lives, and the server answers."""
    path = ready_file(port)
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)  # signal 0: does the process exist
    except (OSError, ValueError):
        return False
    return healthy(port)


def preload() -> list[str]:
    """Load the default model and the ids in MOE_VIZ_PRELOAD_MODELS into the app's shared cache."""
    from app.config import load_config
    from app.resources import _cached_model

    cfg = load_config()
    names = [cfg.default_model]
    names += [n.strip() for n in os.environ.get("MOE_VIZ_PRELOAD_MODELS", "").split(",") if n.strip()]
    for name in names:
        cfg.check_model_request(name)
        start = time.perf_counter()
        model = _cached_model(name, False)  # the arguments exactly as get_model passes them: the cache key
        log.warning("moe-viz: %s loaded in %.1f s (%d experts)", name, time.perf_counter() - start, model.num_experts)
    return names


def warm_up(name: str) -> float:
    """Run the default prompt through model ``name`` and build the first pages' views and figure
    JSON once, so that the first visitor does not pay for what a process does only once (plotly's
    figure classes and validators, pandas and torch code paths: about 0.1 s on the default model).
    Returns the seconds it took."""
    from app.config import load_config
    from app.resources import _cached_model
    from moe_viz import run_prompt, views
    from moe_viz.views._plotly import wire_json

    start = time.perf_counter()
    cfg = load_config()
    model = _cached_model(name, False)
    trace = run_prompt(model, cfg.default_prompt, None, max_tokens=cfg.max_prompt_tokens)
    layer = trace.layer_ids[0]
    shown = [*views.iter_explore_views(trace, layer), *views.token_views(trace, layer, trace.num_tokens - 1)]
    shown += views.balance_views(trace, layer)
    views.metric_cards(trace, layer)
    views.run_summary(trace)
    for view in shown:
        if view.figure is not None:
            wire_json(view.figure)
    return time.perf_counter() - start


def freeze_loaded_objects() -> int:
    """Move every object alive now (the libraries, the preloaded models) out of the garbage
    collector's reach, and return how many there were.

    With torch, transformers, plotly and a model loaded a process holds about half a million
    objects, and every full collection walks them all: about 0.2 s on the project's 2-core machine,
    during which no session runs. Those objects live as long as the server does, so the collector
    never needs to look at them again; what sessions create afterwards is collected as before."""
    gc.collect()  # what the load and the warm-up left behind goes first
    gc.freeze()
    return gc.get_freeze_count()


def _announce_when_healthy(port: int, path: Path) -> None:
    while not healthy(port, timeout_s=1.0):
        time.sleep(0.2)
    path.write_text(str(os.getpid()))
    log.warning("moe-viz: ready on port %d (%s)", port, path)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    port = int(_option(args, "--server.port", str(DEFAULT_PORT)))
    if "--check" in args:
        return 0 if is_ready(port) else 1
    logging.basicConfig(format="%(message)s")
    path = ready_file(port)
    path.unlink(missing_ok=True)  # a file left by an earlier server must not announce this one
    names = preload()
    log.warning("moe-viz: warmed up in %.2f s", warm_up(names[0]))
    log.warning("moe-viz: %d objects set aside from garbage collection", freeze_loaded_objects())
    threading.Thread(target=_announce_when_healthy, args=(port, path), daemon=True).start()
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(SCRIPT), *args]
    try:
        return cli.main()
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
