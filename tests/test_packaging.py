"""The Dockerfile, README, CI entry point and requirements agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_serves_the_hosted_app_as_a_non_root_user_with_a_healthcheck():
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", docker, re.M)
    assert "torch==2.13.0" in docker and "download.pytorch.org/whl/cpu" in docker
    assert "MOE_VIZ_HOSTED=1" in docker
    assert "COPY assets ./assets" in docker  # the default model is inside the image
    assert re.search(r"^USER (?!root)\w+", docker, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/_stcore/health", docker, re.M)
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


def test_requirements_pin_cpu_torch_and_match_pyproject():
    pins = dict(
        line.split("==")
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name, version in pins.items():
        assert f'"{name}=={version}"' in pyproject, name
