"""The Dockerfile, README, CI entry point, requirements and pyproject agree with each other."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_serves_the_hosted_app_as_a_non_root_user_with_a_healthcheck():
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", docker, re.M)
    assert "torch==2.13.0" in docker and "download.pytorch.org/whl/cpu" in docker
    assert "MOE_VIZ_HOSTED=1" in docker
    assert "COPY assets ./assets" in docker  # the default model is inside the image
    assert re.search(r"^USER (?!root)\w+", docker, re.M)
    # ready only once the launcher has loaded the default model (not Streamlit's bare /_stcore/health)
    assert re.search(r'^HEALTHCHECK .*\n?.*"moe-viz", "app", "--check"', docker, re.M)
    assert re.search(r'^CMD \["moe-viz", "app"', docker, re.M)
    assert "EXPOSE 8501" in docker and "--server.port=8501" in docker


def test_readme_gives_the_docker_commands_and_the_port_the_image_uses():
    readme = (ROOT / "README.md").read_text()
    assert "docker build -t moe-viz ." in readme
    assert "docker run --rm -p 8501:8501 moe-viz" in readme


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/install.sh --dev && python3 -m pytest" in readme
    assert "bash scripts/install.sh --dev\npython3 -m pytest\n" in ci


def _pins(name: str) -> dict[str, Version]:
    """{canonical name: version} of every ``name==version`` line of a requirements file."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{name}: {line!r} is not an exact pin"
        pins[canonicalize_name(req.name)] = Version(specs[0].version)
    return pins


def _ranges(requirements: list[str]) -> dict[str, SpecifierSet]:
    """{canonical name: specifier} of pyproject requirements, leaving out moe-viz's own extras."""
    reqs = [Requirement(r) for r in requirements]
    return {canonicalize_name(r.name): r.specifier for r in reqs if canonicalize_name(r.name) != "moe-viz"}


def test_requirements_pin_cpu_torch_and_match_pyproject():
    """requirements.txt pins exactly what pyproject's dependencies + [app] extra need, each pin
    inside pyproject's range; the same for requirements-dev.txt and the [dev] extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pins = _pins("requirements.txt")
    assert pins["torch"] == Version("2.13.0")
    wanted = _ranges(project["dependencies"]) | _ranges(extras["app"])
    assert sorted(pins) == sorted(wanted), (
        "requirements.txt and pyproject (dependencies + [app]) list different packages"
    )
    for name, version in pins.items():
        assert str(wanted[name]), f"pyproject gives no version range for {name}"
        assert wanted[name].contains(version), (
            f"requirements.txt pins {name}=={version}, outside pyproject's {wanted[name]}"
        )
    dev_pins, dev_wanted = _pins("requirements-dev.txt"), _ranges(extras["dev"])
    assert sorted(dev_pins) == sorted(dev_wanted), "requirements-dev.txt and pyproject [dev] list different packages"
    for name, version in dev_pins.items():
        assert dev_wanted[name].contains(version), (
            f"requirements-dev.txt pins {name}=={version}, outside {dev_wanted[name]}"
        )
    assert "ruff" in dev_pins


def test_pyproject_gives_ranges_not_pins_and_keeps_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"app", "dev", "bench"} <= set(project["optional-dependencies"])
    for req in map(Requirement, project["dependencies"]):
        ops = {spec.operator for spec in req.specifier}
        assert ">=" in ops and "<" in ops and "==" not in ops, f"{req}: want a range >=low,<next-major"


def test_training_is_a_package_the_cli_imports_not_a_script_it_runs():
    cli = (ROOT / "moe_viz" / "cli.py").read_text()
    assert "runpy" not in cli and "train_default_model.py" not in cli
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "moe_viz*" in config["packages"]["find"]["include"]
    assert "corpus_manifest.json" in config["package-data"]["moe_viz.training"]
    from moe_viz.training import corpus

    assert corpus.MANIFEST.is_file() and corpus.MANIFEST.parent == ROOT / "moe_viz" / "training"


def test_train_default_help_runs_from_any_directory_via_cli_and_both_shims(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    commands = [
        [sys.executable, "-m", "moe_viz.cli", "train-default", "--help"],
        [sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--help"],
        [sys.executable, str(ROOT / "scripts" / "build_corpus.py"), "--help"],
    ]
    for cmd in commands:
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert res.returncode == 0, f"{cmd}: {res.stderr[-2000:]}"
        assert "--out" in res.stdout
    assert (
        "moe-viz train-default"
        in subprocess.run(commands[0], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env).stdout
    )


def test_script_shims_are_the_package_modules():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_corpus
        import train_default_model
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from moe_viz.training import corpus, train_default

    assert train_default_model is train_default and build_corpus is corpus
