"""The README's library examples run as written; the first shows compact == masked."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    err = float(re.search(r"max \|compact - masked\| = (\S+)", out.stdout).group(1))
    assert err < 1e-4
    dense, pruned = map(int, re.search(r"(\d+) -> (\d+) conv MACs", out.stdout).groups())
    assert dense == 40_550_400 and pruned < dense


def test_readme_own_loop_example_runs(tmp_path):
    """The second example: GHFP in a flax.training TrainState loop with hard_masked."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    script = tmp_path / "own_loop.py"
    script.write_text(blocks[1])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(re.search(r"hard-pruned channels: (\d+)", out.stdout).group(1)) > 0


def test_readme_own_model_compaction_example_runs(tmp_path):
    """The third example: a user's Linen model (SE gate, concat) compacts exactly, shrinks, and
    its jax.export artifact and save_compact/jaxprune.load copy give the compact outputs."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    script = tmp_path / "own_model.py"
    script.write_text(blocks[2].replace('"/tmp/my_small_net"', repr(str(tmp_path / "small"))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(re.search(r"max \|compact - masked\| = (\S+)", out.stdout).group(1)) < 1e-5
    dense, small = map(int, re.search(r"params: (\d+) -> (\d+)", out.stdout).groups())
    assert small < 0.7 * dense
    assert "restored == compact: True" in out.stdout


def test_readme_own_nnx_model_through_the_engine_runs(tmp_path):
    """The fourth example: an NNX model of the user's own trained with SFP by
    `jaxprune.experiment.run(model=..., data=...)`; compact == masked; loaded without its class."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    script = tmp_path / "own_nnx.py"
    script.write_text(blocks[3].replace("/tmp/my_nnx_run", str(tmp_path / "run")))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    masked, small = map(float, re.search(r"accuracy masked (\S+) compact (\S+)", out.stdout).groups())
    assert masked == small
    assert "widths: {'conv1': 4, 'conv2': 8}" in out.stdout
    assert "compact output: (3, 10)" in out.stdout


def test_readme_normalised_channels_example_runs(tmp_path):
    """The fifth example: a ConvNeXt-style block's LayerNorm'd channels pruned, compact ==
    masked apply."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    script = tmp_path / "convnext.py"
    script.write_text(blocks[4])
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "['fc1', 'stem'] normalised: ['stem']" in out.stdout
    assert float(re.search(r"max \|compact - masked\| = (\S+)", out.stdout).group(1)) < 1e-5
