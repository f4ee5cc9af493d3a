"""jaxprune as a user installs it: the wheel, built from this checkout and installed into a fresh
virtual environment outside the repository, works on its own (packaged configs, CLI, report).

The environment reuses the already installed dependencies (``--system-site-packages``) and
installs the wheel alone (``--no-deps``), so the test needs no download beyond the build
backend; every command runs from a scratch directory with no repository around it.
"""

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args, cwd, env, timeout=900):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
         cwd=root, env=dict(os.environ))
    (wheel,) = dist.glob("jaxprune-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # --ignore-installed: an editable install of this checkout in the base environment (visible
    # through --system-site-packages) must not make pip skip the wheel
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--ignore-installed", "-q", str(wheel)], cwd=root, env=dict(os.environ))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAXPRUNE_DATA_DIR")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", XDG_CACHE_HOME=str(root / "cache"))
    work = root / "user"
    work.mkdir()
    return wheel, env_dir / "bin" / "jaxprune", python, env, work


def test_the_wheel_holds_the_package_its_configs_and_its_type_marker(installed):
    wheel = installed[0]
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxprune/configs/sfp_resnet20_cifar10.py" in names and "jaxprune/py.typed" in names
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)


def test_an_installed_wheel_trains_reports_and_knows_its_version(installed):
    _, jaxprune, python, env, work = installed
    where = _run([str(python), "-c", "import jaxprune; print(jaxprune.__file__)"], work, env)
    assert str(REPO) not in where and "site-packages" in where  # the wheel, not this checkout
    version = _run([str(jaxprune), "--version"], work, env)
    assert version.startswith("jaxprune ")
    info = _run([str(jaxprune), "info", "resnet20"], work, env)
    assert "40550400" in info  # ResNet-20's conv MACs (SFP's dense baseline)
    # a paper row's packaged config by name, on a tiny budget of bundled (offline) data
    _run([str(jaxprune), "train", "--config", "sfp_resnet20_cifar10", "--workdir", "run",
          "--no-progress", "--config.dataset=digits", "--config.image_size=8", "--config.epochs=1",
          "--config.batch_size=64", "--config.train_subset=128", "--config.test_subset=64",
          "--config.eval_batch_size=64"], work, env)
    result = json.loads((work / "run" / "result.json").read_text())
    assert result["masked_accuracy"] == result["compact_accuracy"]
    report = _run([str(jaxprune), "report", "--records", "run"], work, env)
    assert "run" in report
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # report wrote nothing unasked
