"""moe_viz is a library: it imports and runs without streamlit (and without plotly), declares
streamlit/plotly only in its [app] extra, finds its default model through an explicit setting,
and works from a wheel (no assets/ beside the package, no source checkout)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import moe_viz.models as models

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "assets" / "moe-viz-mini"
needs_shipped_model = pytest.mark.skipif(
    not (SHIPPED / "model.safetensors").exists(), reason=f"default model weights not found in {SHIPPED}"
)

# Runs in a fresh interpreter: a finder placed first on sys.meta_path makes the BLOCKED top-level
# packages (and their submodules) unimportable, even though they are installed on this machine.
BLOCKING_RUN = """
import json, sys

BLOCKED = set(sys.argv[1].split(","))


class BlockFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, BlockFinder())
for name in BLOCKED:  # the block works
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} imported despite the block")

import moe_viz

model = moe_viz.load_model(device="cpu")
trace = moe_viz.run_prompt(model, "hello")
print(json.dumps({
    "file": moe_viz.__file__,
    "model_id": model.model_id,
    "tokens": trace.num_tokens,
    "leaked": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
}))
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", models.DEFAULT_MODEL_ENV)}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


@needs_shipped_model
@pytest.mark.parametrize("blocked", ["streamlit", "streamlit,plotly"])
def test_engine_imports_and_runs_a_prompt_without_streamlit(blocked, tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", BLOCKING_RUN, blocked],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["leaked"] == [], f"import moe_viz pulled in {out['leaked']}"
    assert out["tokens"] >= 1 and out["model_id"] == str(SHIPPED)


def test_pyproject_keeps_streamlit_and_plotly_out_of_the_engine_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {canonicalize_name(Requirement(r).name) for r in reqs}

    core, app = names(project["dependencies"]), names(project["optional-dependencies"]["app"])
    assert "streamlit" not in core and "plotly" not in core
    assert {"streamlit", "plotly"} <= app
    assert {"torch", "transformers"} <= core


def test_default_model_comes_from_the_env_var_else_the_shipped_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(models.DEFAULT_MODEL_ENV, raising=False)
    assert models.default_model_location() == SHIPPED
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setenv(models.DEFAULT_MODEL_ENV, str(model_dir))
    assert models.default_model_path() == str(model_dir)


def test_a_missing_default_model_is_a_clear_error_naming_the_folder_and_the_variable(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(models.DEFAULT_MODEL_ENV, str(missing))
    with pytest.raises(ValueError, match=models.DEFAULT_MODEL_ENV) as err:
        models.default_model_path()
    assert str(missing) in str(err.value)
    with pytest.raises(ValueError, match="default model not found"):
        models.load_model()  # no name: the default
    missing.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        models.default_model_path()
    # Not set, shipped folder absent (as in a wheel install): says where it looked and what to set.
    monkeypatch.delenv(models.DEFAULT_MODEL_ENV)
    monkeypatch.setattr(models, "SHIPPED_MODEL_DIR", tmp_path / "assets" / "moe-viz-mini")
    with pytest.raises(ValueError, match=f"{models.DEFAULT_MODEL_ENV} is not set") as err:
        models.default_model_path()
    assert str(tmp_path / "assets" / "moe-viz-mini") in str(err.value)
    assert f"set {models.DEFAULT_MODEL_ENV}=" in str(err.value)


# In a fresh interpreter without site processing (so the editable install's finder is not loaded):
# only the wheel's copy of moe_viz (argv[1]) plus this machine's site-packages are importable.
WHEEL_RUN = """
import json, os, sys

site_dir, *system_dirs = sys.argv[1:]
sys.path[:0] = [site_dir]
sys.path += system_dirs
import moe_viz
from moe_viz import models
from moe_viz.training import corpus, train_default

assert moe_viz.__file__.startswith(site_dir), moe_viz.__file__
result = {"manifest": corpus.MANIFEST.is_file(), "default_out": train_default.DEFAULT_OUT}
try:
    train_default.main(["--quick"])
except ValueError as err:
    result["train_error"] = str(err)
os.environ.pop(models.DEFAULT_MODEL_ENV, None)
try:
    models.default_model_path()
except ValueError as err:
    result["missing_error"] = str(err)
os.environ[models.DEFAULT_MODEL_ENV] = os.environ["SHIPPED_MODEL"]
model = moe_viz.load_model(device="cpu")
result["tokens"] = moe_viz.run_prompt(model, "hello").num_tokens
result["leaked"] = sorted(m for m in sys.modules if m.split(".")[0] == "streamlit")
print(json.dumps(result))
"""


@pytest.mark.slow
@needs_shipped_model
def test_a_wheel_install_works_with_the_default_model_named_by_the_env_var(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "moe_viz", src / "moe_viz", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("moe_viz-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "moe_viz" / "training" / "train_default.py").is_file()
    assert (target / "moe_viz" / "training" / "corpus_manifest.json").is_file()
    assert not (target / "assets").exists()

    res = subprocess.run(
        [sys.executable, "-S", "-c", WHEEL_RUN, str(target), *site.getsitepackages()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(SHIPPED_MODEL=str(SHIPPED)),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["manifest"] and out["default_out"] is None
    assert "--out is required" in out["train_error"]
    assert str(target / "assets" / "moe-viz-mini") in out["missing_error"]
    assert f"set {models.DEFAULT_MODEL_ENV}=" in out["missing_error"]
    assert out["tokens"] >= 1 and out["leaked"] == []
