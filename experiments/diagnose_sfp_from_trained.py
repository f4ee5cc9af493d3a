"""Why SFP started from a trained ResNet-20 trains well but tests badly (issue 12).

Starts SFP (30%, the ResNet-20 recipe shortened to 6 epochs, as the recorded run
``pretrained_records/sfp_resnet20_from_trained``) from the imported weights, trains one epoch
of steps at the peak learning rate ``--lr`` (after a 0.03-epoch warm-up at a tenth of it: 0.1 is
the from-scratch recipe's peak, 0.01 the from-trained recipe's, one tenth of it, as the SFP/FPGM
authors prune a trained model), and evaluates the model four ways on the first
``--test-images`` test images:

- ``soft``: the trained weights with the pruned filters regrown (what training sees), running
  BN statistics;
- ``reselected``: after the end-of-epoch re-selection has zeroed the filters again (what SFP
  evaluates, and what the official code's ``val_acc_2`` measures), running BN statistics;
- each of them again with the BN statistics re-estimated on ``--recal-batches`` training
  batches (no weight changes): the gap that closes is the BN statistics' share.

It also counts how many of the channels pruned at the start are no longer pruned after one
re-selection (churn). Writes ``record.json`` into ``--out``::

    python experiments/diagnose_sfp_from_trained.py /work/runs/import_resnet20 --lr 0.1 \\
        --out experiments/pretrained_records/sfp_bn_diagnosis
    python experiments/diagnose_sfp_from_trained.py /work/runs/import_resnet20 --lr 0.01 \\
        --out experiments/pretrained_records/sfp_bn_diagnosis_lr0.01
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import augment as augment_lib
from jaxprune import evaluation, experiment, factories, pretrained, train_step
from jaxprune.models.common import BN_MOMENTUM

CONFIG = Path(__file__).resolve().parent / "configs" / "sfp_resnet20_cifar10.py"


def _config(pretrained: str, test_images: int, lr: float):
    spec = importlib.util.spec_from_file_location("sfp_resnet20_cifar10", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.pretrained, c.epochs, c.test_subset = pretrained, 6, test_images
    c.optimizer.boundaries, c.optimizer.warmup_epochs = (1.8, 3.6, 4.8), 0.03
    c.optimizer.base_lr, c.optimizer.warmup_lr = lr, lr / 10
    return pretrained.with_pretrained_normalization(c)


def recalibrated(model, variables, images, preprocess, rng, batches: int, batch_size: int = 256):
    """``variables`` with every BN's running statistics replaced by the mean, over ``batches``
    random training batches, of the batch statistics (train-mode forward, weights unchanged)."""
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    total = None
    for _ in range(batches):
        x = preprocess(jnp.asarray(images[rng.choice(len(images), batch_size, replace=False)]))
        _, upd = model.apply({"params": variables["params"], "batch_stats": zeros}, x, train=True,
                             mutable=["batch_stats"])
        # from zero running statistics one update leaves (1 - momentum) * the batch statistics
        stats = jax.tree.map(lambda a: a / (1.0 - BN_MOMENTUM), upd["batch_stats"])
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    return {"params": variables["params"], "batch_stats": jax.tree.map(lambda a: a / batches, total)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pretrained", help="directory written by `jaxprune import resnet20 ...`")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=390, help="SFP training steps (390 = one epoch)")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--recal-batches", type=int, default=20)
    ap.add_argument("--lr", type=float, required=True,
                    help="peak learning rate of the epoch (0.1: from-scratch recipe; 0.01: from-trained)")
    args = ap.parse_args(argv)

    s = experiment.setup(_config(args.pretrained, args.test_images, args.lr))
    ds = s.dataset
    x0 = jnp.zeros((1,) + ds.image_shape, jnp.float32)
    fresh = lambda: experiment._initial_params(s, train_step.create_train_state(  # noqa: E731
        s.model, s.graph, jax.random.PRNGKey(0), x0, s.optimizer))[0]
    pre = functools.partial(augment_lib.normalize, mean=ds.mean, std=ds.std)
    test_x, test_y = factories.test_set(ds)
    (train_x, train_y), _ = factories.fit_sets(ds)
    rng = np.random.default_rng(0)

    def acc(v):
        return float(evaluation.evaluate(s.model, v, test_x, test_y, 500, preprocess=pre)["accuracy"])

    def both(v):
        return {"running_stats": acc(v),
                "recalibrated": acc(recalibrated(s.model, v, train_x, pre, rng, args.recal_batches))}

    state = fresh()
    rec = {"test_images": int(ds.num_test), "steps": args.steps, "peak_lr": args.lr,
           "pretrained": acc(state.variables)}
    state = train_step.prune_init(s.pruner, state)
    start_masks = state.masks
    rec["after_init"] = both(state.variables)
    aug = functools.partial(augment_lib.augment_batch, mean=ds.mean, std=ds.std, flip=True, pad=4)
    step = train_step.make_train_step(s.model, s.graph, s.optimizer, s.pruner, augment=aug)
    train_acc = []
    for _ in range(args.steps):
        idx = rng.choice(len(train_x), s.config.batch_size, replace=False)
        state, met = step(state, jnp.asarray(train_x[idx]), jnp.asarray(train_y[idx]))
        train_acc.append(float(met["accuracy"]))
    rec["train_accuracy_last_50_steps"] = float(np.mean(train_acc[-50:]))
    rec["soft"] = both(state.variables)
    state = train_step.prune_update(s.pruner, state)  # the re-selection after epoch 0
    rec["reselected"] = both(state.variables)
    pruned = changed = 0
    for g, m in start_masks.items():
        before, after = np.asarray(m) == 0, np.asarray(state.masks[g]) == 0
        pruned += int(before.sum())
        changed += int((before & ~after).sum())
    rec["pruned_channels"], rec["no_longer_pruned_after_one_reselection"] = pruned, changed
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "record.json").write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
