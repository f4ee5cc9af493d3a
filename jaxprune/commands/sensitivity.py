"""``jaxprune sensitivity``: PFEC's per-layer sensitivity analysis of a trained model."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import jax.numpy as jnp
import ml_collections

from jaxprune import augment as augment_lib
from jaxprune import validate
from jaxprune.experiment import setup
from jaxprune.files import write_text_atomic
from jaxprune.pretrained import baseline_provenance, load_trained


SENSITIVITY_CONVS = ("first", "second", "all")


def sensitivity_run(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike,
                    out: str | os.PathLike, *, convs: str = "all", batch_size: int = 100,
                    progress: bool = True) -> Path:
    """PFEC's sensitivity analysis of a trained model (a run directory or a ``jaxprune import``
    directory): each numbered conv pruned alone (L1) at rates 0.1..0.9, test accuracy of each.

    ``convs``: 'first' (the first conv of every residual block: what PFEC prunes in a ResNet),
    'second' (the second convs) or 'all' (every prunable numbered conv). Evaluation uses
    `jaxprune.cut_eval.CutEvaluator` (the unchanged prefix of the network is computed once per
    layer); ``config.test_subset`` limits the test images. Writes ``sensitivity.csv`` (row by
    row: an interrupted analysis resumes where it stopped), ``sensitivity.json`` (provenance)
    and ``sensitivity.png`` (one panel per stage, as PFEC draws it).
    """
    import csv

    from jaxprune import cut_eval
    from jaxprune.methods import pfec

    validate.one_of(convs, SENSITIVITY_CONVS, "convs")
    trained_cfg, variables, weights_from = load_trained(checkpoint)
    if trained_cfg.model != config.model:
        raise ValueError(f"config.model={config.model!r} but {str(checkpoint)!r} holds {trained_cfg.model!r}")
    config = ml_collections.ConfigDict(config.to_dict())
    if not tuple(config.mean) and trained_cfg.get("mean"):
        config.mean, config.std = tuple(trained_cfg.mean), tuple(trained_cfg.std)
    s = setup(config)
    ds = s.dataset
    preprocess = functools.partial(augment_lib.normalize, mean=ds.mean, std=ds.std)
    numbering = pfec.layer_numbers(s.graph)
    producers = s.graph.producer_to_group()
    wanted = {"first": ("conv1",), "second": ("conv2",), "all": None}[convs]
    layers = [n for n in sorted(numbering) if numbering[n] in producers
              and (wanted is None or numbering[n].split("/")[-1] in wanted)]
    if not layers:
        raise ValueError(f"convs={convs!r}: {config.model} has no such prunable conv")
    sample = jnp.zeros((1,) + ds.image_shape, jnp.float32)
    order = cut_eval.top_level_order(s.model, variables, sample)
    evaluator = cut_eval.CutEvaluator(s.model, variables, ds.x_test, ds.y_test, preprocess, batch_size)

    def prepare(group):
        members = [m.path for m in s.graph.groups[group].members] if group else []
        evaluator.set_cut(cut_eval.cut_for(members, order) if group else None)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rates = pfec.DEFAULT_RATES
    partial_path = out / "sensitivity.partial.csv"
    settings_path = out / "sensitivity.partial.json"
    # rows already written are reused only if they were measured the same way
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "model": config.model, "convs": convs,
                "test_images": int(ds.num_test), "rates": list(rates), "batch_size": int(batch_size),
                "normalization": {"mean": list(ds.mean), "std": list(ds.std)}}
    done: dict[str, list[float]] = {}
    if partial_path.is_file():
        before = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if before != settings:
            changed = sorted(k for k in settings if before is None or before.get(k) != settings[k])
            raise ValueError(f"{partial_path} holds rows measured with other settings "
                             f"({', '.join(changed)}); use another --out or delete it")
        for row in csv.reader(partial_path.open()):
            done[row[1]] = [float(v) for v in row[2:]]
    else:
        settings_path.write_text(json.dumps(settings, indent=2))

    def on_row(label, group, accs):
        with partial_path.open("a", newline="") as f:
            csv.writer(f).writerow([label, group, *accs])

    provenance = {**settings, "checkpoint": str(checkpoint), "criterion": "l1",
                  "weights_from": weights_from}
    if (Path(checkpoint) / "import.json").is_file() or (Path(checkpoint) / "checkpoints").is_dir():
        provenance["baseline"] = baseline_provenance(checkpoint)
    t0 = time.time()
    table = pfec.sensitivity(evaluator.accuracy, variables, s.graph, layers, rates, prepare=prepare,
                             done=done, on_row=on_row, progress=progress)
    provenance["baseline_accuracy"] = table.baseline
    provenance["wall_time_s"] = round(time.time() - t0, 1)
    pfec.write_sensitivity_csv(table, str(out / "sensitivity.csv"))
    write_text_atomic(out / "sensitivity.json", json.dumps(provenance, indent=2))
    subset = "" if ds.num_test >= 10000 else f", first {ds.num_test} test images"
    which = {"first": "first conv of each block", "second": "second conv of each block",
             "all": "every conv"}[convs]
    pfec.plot_sensitivity(table, str(out / "sensitivity.png"),
                          title=f"{config.model} on {config.dataset}: {which} pruned alone (L1){subset}",
                          stage_ends=pfec.stage_ends_of(config.model))
    partial_path.unlink()
    settings_path.unlink()
    return out
