"""The package stands on its own: version, licence, type marker, the tested dependency floors
stated alike in pyproject.toml, .ci/floors.txt and the README, optional imports that name
their extra."""

import re
import tomllib
from pathlib import Path

import pytest

import jaxprune
from jaxprune import _optional, cli

ROOT = Path(__file__).resolve().parent.parent
FLOORED = ("jax", "flax", "optax", "orbax-checkpoint", "chex")


def _floors_txt() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def test_floors_agree_in_pyproject_ci_and_readme():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lower = {}
    for dep in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep.split(";")[0].strip())
        if m:
            lower[m.group(1)] = m.group(2)
    pins = _floors_txt()
    assert set(FLOORED) <= set(pins) and pins["jaxlib"] == pins["jax"]
    for name in FLOORED:
        assert lower[name] == pins[name], name
    requirements = re.search(r"\*\*Requirements:\*\*(.*?)\n\n", (ROOT / "README.md").read_text(), re.S)
    line = " ".join(requirements.group(1).split())
    for name in FLOORED:
        assert f"{name} >= {pins[name]}" in line, name


def test_core_dependencies_leave_out_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for heavy in ("tensorflow", "matplotlib", "tensorboardX", "pillow"):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert set(_optional.EXTRAS) <= set(extras)
    for extra in _optional.EXTRAS:  # dev installs every optional feature the tests use
        assert extra in extras["dev"][0]


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxprune {jaxprune.__version__}"


def test_license_and_type_marker_ship():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert (ROOT / "jaxprune" / "py.typed").is_file()
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools_cfg["package-data"]["jaxprune"]


def test_require_names_the_extra_when_missing():
    assert _optional.require("json", "plots", "x").dumps([1]) == "[1]"
    with pytest.raises(_optional.MissingExtraError) as e:
        _optional.require("no_such_module_xyz.sub", "plots", "plotting results")
    assert str(e.value) == ("plotting results needs no_such_module_xyz (matplotlib), which is not "
                            "installed: pip install 'jaxprune[plots]'")
    with pytest.raises(ValueError, match="unknown extra 'gpu'"):
        _optional.require("json", "gpu", "x")


def test_cli_reports_a_missing_extra_in_one_line(monkeypatch, tmp_path, capsys):
    import jaxprune.report

    def needs_plots(*a, **k):
        _optional.require("no_such_module_xyz", "plots", "plotting results")

    monkeypatch.setattr(jaxprune.report, "write_report", needs_plots)
    assert cli.main(["report", "--records", str(tmp_path), "--out", str(tmp_path / "R.md"),
                     "--all-rows"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jaxprune report: error: plotting results needs no_such_module_xyz (matplotlib), "
                   "which is not installed: pip install 'jaxprune[plots]'")
