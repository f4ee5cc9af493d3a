"""The benchmark scripts' own checks on what they measured (no timing here)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))

import engine  # noqa: E402


def test_a_chunk_timed_faster_per_step_than_more_steps_per_call_is_flagged():
    # the first GPU window's ResNet-20 table: 1 step per call at 2.3M images/s, a whole
    # 100-step epoch per call at 73,295: one step per call cannot be 32x faster per step
    step_s = {"plain flax": 128 / 51981,
              "jaxprune chunk bf16 (1 steps/call)": 128 / 2335279,
              "jaxprune chunk bf16 (100 steps/call)": 128 / 73295,
              "jaxprune chunk bf16, 4 runs together (100 steps/call)": 4 * 128 / 44029}
    got = engine.implausible_chunks(step_s)
    assert list(got) == ["jaxprune chunk bf16 (1 steps/call)"]
    assert "0.055 ms per step at 1 steps/call" in got["jaxprune chunk bf16 (1 steps/call)"]
    # slower per step with fewer steps per call (dispatch costs) is plausible, so is a near tie
    step_s["jaxprune chunk bf16 (1 steps/call)"] = 128 / 60000
    assert engine.implausible_chunks(step_s) == {}
    step_s["jaxprune chunk bf16 (1 steps/call)"] = 0.6 * 128 / 73295  # within 2x: not flagged
    assert engine.implausible_chunks(step_s) == {}
    step_s["jaxprune chunk bf16 (1 steps/call)"] = 0.4 * 128 / 73295
    assert list(engine.implausible_chunks(step_s)) == ["jaxprune chunk bf16 (1 steps/call)"]
    # compared within one dtype: a float32 chunk is not held against a bfloat16 one
    assert engine.implausible_chunks({"jaxprune chunk (1 steps/call)": 1e-3,
                                      "jaxprune chunk bf16 (100 steps/call)": 5e-3}) == {}
