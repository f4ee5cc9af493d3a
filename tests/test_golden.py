"""The golden records of every method (experiments/golden_records.py): a change to the core must
reproduce the masks and hard sets after every re-selection, the final params and the compact
model's outputs of each case (slow: about a minute per case on a 2-core CPU)."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECORDS = REPO / "tests" / "data" / "golden_methods.json"


def _module():
    spec = importlib.util.spec_from_file_location("jaxprune_golden_records",
                                                  REPO / "experiments" / "golden_records.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_golden_records_cover_every_method_and_compare_catches_changes():
    mod = _module()
    recorded = json.loads(RECORDS.read_text())
    assert set(recorded["cases"]) == set(mod.CASES)
    methods = {mod.case_config(n).method.name for n in mod.CASES}
    assert methods == {"sfp", "asfp", "srfp", "asrfp", "ghfp", "hfp", "pfec"}
    case = recorded["cases"]["ghfp_author"]
    assert mod.compare("ghfp_author", case, copy.deepcopy(case), same_cpu=True) == []
    changed = copy.deepcopy(case)
    group = sorted(changed["epochs"][-1]["hard"])[0]
    hard = changed["epochs"][-1]["hard"][group].split(",")
    hard[hard.index("1")] = "0"  # one more hard channel after the last epoch
    changed["epochs"][-1]["hard"][group] = ",".join(hard)
    assert mod.compare("ghfp_author", case, changed, same_cpu=False) == [
        f"hard after step {case['epochs'][-1]['step']} differ in {[group]}"]
    drift = copy.deepcopy(case)
    drift["compact_logits"][0][0] += 1e-3
    drift["compact_logits_sha256"] = "0"
    assert mod.compare("ghfp_author", case, drift, same_cpu=True) == [
        "compact_logits_sha256 differs (bitwise, same CPU)", "compact logits differ beyond 1e-5"]


@pytest.mark.slow
def test_every_method_reproduces_its_golden_record():
    assert _module().main(["--check", str(RECORDS)]) == 0
