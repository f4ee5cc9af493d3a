"""Golden records of every pruning method: what a change to the core must reproduce exactly.

Each case trains a small bundled model on scikit-learn's digits (offline) for a few epochs
through ``jaxprune.experiment.run`` with one method, keeping every epoch's checkpoint, and
records:

- the masks and the hard set of every group after every epoch (the re-selections), from the
  checkpoints;
- a SHA-256 of the final checkpoint's params (bitwise) and each leaf's float64 L2 norm;
- the masked and compact accuracies of the run's result, and the logits of the saved compact
  model (``jaxprune.load``) on 8 fixed test images, with their SHA-256.

::

    python experiments/golden_records.py --out tests/data/golden_methods.json   # write
    python experiments/golden_records.py --check tests/data/golden_methods.json  # compare

``--check`` prints one line per case and exits 1 on a difference: masks, hard sets and the
result's accuracies must be equal; params and compact logits must be bitwise equal on the CPU
model that wrote the records (``cpu`` in the file), within 1e-5 elsewhere (XLA:CPU's kernels
depend on the instruction set).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

CASES: dict[str, dict] = {
    # name -> config overrides (method.*, epochs, model)
    "sfp": {"method.name": "sfp", "method.rate": 0.3},
    "sfp_mask_bn": {"method.name": "sfp", "method.rate": 0.3, "method.kwargs.mask_bn": True},
    "asfp": {"method.name": "asfp", "method.rate": 0.4},
    "asfp_cubic": {"method.name": "asfp", "method.rate": 0.4, "method.kwargs.rate_shape": "cubic"},
    "srfp": {"method.name": "srfp", "method.rate": 0.3, "method.kwargs.alpha0": 0.5},
    "asrfp": {"method.name": "asrfp", "method.rate": 0.4, "method.kwargs.alpha0": 0.5},
    "ghfp_reading": {"method.name": "ghfp", "method.rate": 0.4, "method.kwargs.soft": "sfp"},
    "ghfp_author": {"method.name": "ghfp", "method.rate": 0.4, "method.kwargs.soft": "asfp",
                    "method.kwargs.rate_shape": "cubic", "method.kwargs.end": 1.0,
                    "method.kwargs.hard_count": "layer", "method.kwargs.harden_at_init": True,
                    "cutout": 4},
    "hfp": {"method.name": "hfp", "method.rate": 0.0, "method.criterion": "bn_scale",
            "method.residual": "coupled", "method.kwargs.macs_reduction": 0.3,
            "method.kwargs.params_reduction": 0.3, "finetune_epochs": 1},
    "pfec": {"method.name": "pfec", "method.rate": 0.0, "method.criterion": "l1",
             "method.kwargs.config": "resnet56-A", "model": "resnet56", "epochs": 2},
}


def base_config():
    from jaxprune import config as config_lib

    c = config_lib.base_config()
    c.name = "golden"
    c.model = "resnet20"
    c.dataset = "digits"
    c.image_size = 8
    c.epochs = 3
    c.batch_size = 64
    c.eval_batch_size = 200
    c.train_subset = 640
    c.test_subset = 200
    c.keep_checkpoints = 10
    c.steps_per_call = 1
    c.optimizer.schedule = "cosine"
    c.optimizer.base_lr = 0.05
    return c


def case_config(name: str):
    from jaxprune import config as config_lib

    c = base_config()
    c.name = f"golden-{name}"
    return config_lib.override(c, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                   for k, v in CASES[name].items()])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sha(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode_mask(mask) -> str:
    """A ``[C]`` mask as text: ``'1'`` and ``'0'`` for kept and pruned channels, the float's
    ``repr`` for a decayed one (SRFP), comma-separated."""
    return ",".join("1" if v == 1 else "0" if v == 0 else repr(float(v))
                    for v in np.asarray(mask, np.float32).tolist())


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], prefix + (str(k),))
    else:
        yield "/".join(prefix), np.asarray(tree)


def run_case(name: str, workdir: Path) -> dict:
    import orbax.checkpoint as ocp

    import jaxprune
    from jaxprune import checkpoints, data, experiment
    from jaxprune.augment import normalize

    config = case_config(name)
    result = experiment.run(config, workdir, progress=False)
    manager = checkpoints.make_checkpoint_manager(workdir / "checkpoints", max_to_keep=10)
    epochs = []
    for step in sorted(manager.all_steps()):
        restored = manager.restore(step, args=ocp.args.Composite(**{
            checkpoints.STATE_ITEM: ocp.args.StandardRestore()}))
        state = restored[checkpoints.STATE_ITEM]
        prune = state.get("prune", state)  # the pruning state (older checkpoints: top level)
        epochs.append({
            "step": int(step),
            "masks": {g: encode_mask(m) for g, m in sorted(prune["masks"].items())},
            "hard": {g: encode_mask(m) for g, m in sorted(prune["hard"].items())},
        })
        params = list(_leaves(state["params"]))
    manager.close()
    model, variables, _ = jaxprune.load(workdir / "compact")
    ds = data.load_digits_dataset(image_size=config.image_size)
    x = normalize(ds.x_test[:8], ds.mean, ds.std)
    logits = np.asarray(model.apply(variables, x))
    return {
        "epochs": epochs,
        "final_params_sha256": _sha(a for _, a in params),
        "final_params_l2": {k: float(np.linalg.norm(a.astype(np.float64))) for k, a in params},
        "masked_accuracy": result["masked_accuracy"],
        "compact_accuracy": result["compact_accuracy"],
        "compact_logits": logits.astype(np.float64).tolist(),
        "compact_logits_sha256": _sha([logits]),
    }


def compare(name: str, want: dict, got: dict, same_cpu: bool) -> list[str]:
    """The differences between two records of one case (empty when they agree)."""
    bad = []
    if len(want["epochs"]) != len(got["epochs"]):
        return [f"{len(got['epochs'])} checkpoints, recorded {len(want['epochs'])}"]
    for w, g in zip(want["epochs"], got["epochs"]):
        for key in ("masks", "hard"):
            if w[key] != g[key]:
                groups = [k for k in w[key] if w[key][k] != g[key].get(k)]
                bad.append(f"{key} after step {w['step']} differ in {groups}")
    for key in ("masked_accuracy", "compact_accuracy"):
        if want[key] != got[key]:
            bad.append(f"{key} {got[key]} != recorded {want[key]}")
    if same_cpu:
        for key in ("final_params_sha256", "compact_logits_sha256"):
            if want[key] != got[key]:
                bad.append(f"{key} differs (bitwise, same CPU)")
    for k, v in want["final_params_l2"].items():
        if abs(got["final_params_l2"].get(k, np.inf) - v) > 1e-5 * max(1.0, abs(v)):
            bad.append(f"params {k}: L2 {got['final_params_l2'].get(k)} != recorded {v}")
    if not np.allclose(got["compact_logits"], want["compact_logits"], rtol=1e-5, atol=1e-5):
        bad.append("compact logits differ beyond 1e-5")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the records here")
    group.add_argument("--check", type=Path, help="compare against the records here")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)
    recorded = json.loads(args.check.read_text()) if args.check else None
    same_cpu = recorded is not None and recorded.get("cpu") == cpu_model()
    records, failed = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            rec = run_case(name, Path(tmp) / name)
            records[name] = rec
            if recorded is not None:
                bad = compare(name, recorded["cases"][name], rec, same_cpu)
                failed += bool(bad)
                print(f"{name}: {'ok' if not bad else '; '.join(bad)}", flush=True)
            else:
                print(f"{name}: {len(rec['epochs'])} checkpoints, compact {rec['compact_accuracy']}",
                      flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_model(), "cases": records}, indent=1) + "\n")
    elif not same_cpu:
        print(f"note: recorded on {recorded.get('cpu')!r}, this is {cpu_model()!r}: params and "
              "logits compared within 1e-5, not bitwise")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
