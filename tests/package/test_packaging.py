"""Packaging: the licence ships, runtime dependencies are compatible ranges (unireg installs
beside other packages), and constraints.txt pins every one of them to the version CI tests."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_the_apache_licence_is_in_the_repository_and_declared_for_the_wheel():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    project = _project()
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_runtime_dependencies_are_ranges_and_constraints_pin_each():
    deps = _project()["dependencies"]
    constraints = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            constraints[name.strip().lower()] = version.strip()
    for dep in deps:
        name = re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower()
        assert "==" not in dep, f"{dep}: an exact pin forces its version on every environment"
        assert ">=" in dep, f"{dep}: give the oldest version that works"
        assert name in constraints, f"{name} is not pinned in constraints.txt"
    assert constraints["torch"] == "2.13.0"  # the CPU wheel CI installs


def test_ci_installs_with_the_constraints():
    run = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text().splitlines()
    assert "pip install -c constraints.txt" in run
    assert any("pip install -c constraints.txt" in line for line in readme[:6])
