"""Shared pieces of the experiment configs: the recipes of ../shared/docs/methods.md and the
``config.paper`` block. Not a row itself (the runner and the report skip this file).

Every row file imports it as ``from jaxprune.configs import common`` (a config file loaded by
path, as ``jaxprune.config.load_config`` does, still finds it: it is part of the package).

Conventions shared by all rows:

- ``config.name`` is the row name (the file name without ``.py``); runs land in
  ``experiments/runs/<row>/seed<k>/`` and records in ``experiments/results/<row>/seed<k>.json``.
- ``config.pretrained`` of a row that starts from a trained model is the dense baseline row's
  seed-0 run directory as the runner lays it out, ``experiments/runs/<dense row>/seed0`` (relative
  to the repository root). ``experiments/run.py`` recognises that form, runs the baseline first
  when it is missing, and rewrites the path to its own ``--runs-dir``. Every seed of the
  dependent row starts from the same seed-0 baseline (PFEC prunes one trained model; the seeds
  vary the retraining).
- ``config.paper`` holds the published figures as printed (percent); ``-1`` means the reference
  gives no figure. Extra keys: ``table`` (which report table: 'SFP', 'PFEC', 'GHFP', 'HFP',
  'Baselines'), ``metric`` ('top-1' or 'accuracy'), ``note`` (free text), ``controls`` (GHFP
  rows: the rows they are compared with).
- ``config.num_seeds``: 3 on CIFAR (the papers report mean +- std), 1 on ImageNet.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from jaxprune.config import base_config

CONFIG_DIR = Path(__file__).resolve().parent
RUNS_DIR = "experiments/runs"

TABLES = ("SFP", "PFEC", "GHFP", "HFP", "Baselines")

SFP_CIFAR_SOURCE = ("SFP (He et al., IJCAI 2018, arXiv 1808.06866), CIFAR-10 from scratch, "
                    "as tabulated in FPGM (He et al., CVPR 2019)")
SFP_IMAGENET_SOURCE = "SFP (He et al., IJCAI 2018, arXiv 1808.06866), ImageNet from scratch"
SFP_FORMULA_SOURCE = "SFP (He et al., IJCAI 2018): FLOPs reduction by keep ratio (official formula)"
PFEC_SOURCE = "PFEC (Li et al., ICLR 2017, arXiv 1608.08710), Table 1"
GHFP_SOURCE = "GHFP (Cai, An, Xu, IJCNN 2021, arXiv 2011.03170)"
HFP_SOURCE = "HFP (Enderich, Timm, Burgard, WACV 2021, arXiv 2009.08169)"

CIFAR_SEEDS = 3
IMAGENET_SEEDS = 1


def run_dir(row: str, seed: int = 0) -> str:
    """The runner's run directory of ``row``'s seed ``seed`` (relative to the repo root)."""
    return f"{RUNS_DIR}/{row}/seed{seed}"


# ----------------------------------------------------------------------------- recipes


def cifar(name: str, model: str, dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The SFP CIFAR recipe (methods.md 2), written out: 200 epochs, batch 128, SGD Nesterov
    momentum 0.9, weight decay 5e-4, LR 0.01 for the first epoch then 0.1, x0.2 at epochs 60,
    120, 160; flip + 4-pixel pad + crop augmentation (jaxprune.experiment applies it to CIFAR)."""
    c = base_config()
    c.name = name
    c.model = model
    c.dataset = dataset
    c.epochs = 200
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_seeds = CIFAR_SEEDS
    o = c.optimizer
    o.schedule = "sfp_cifar"
    o.base_lr = 0.1
    o.warmup_lr = 0.01
    o.boundaries = (60, 120, 160)
    o.factor = 0.2
    o.momentum = 0.9
    o.nesterov = True
    o.weight_decay = 5e-4
    return c


def from_trained(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """SFP from a trained model (methods.md 2): the CIFAR recipe at one tenth of the learning
    rate for the same 200 epochs, as the reference reimplementation runs it (rethinking-network-
    pruning: ``--learning_rate 0.001 --schedule 1 60 120 160 --gammas 10 0.2 0.2 0.2``): LR 0.001
    for the first epoch, then 0.01, x0.2 at epochs 60, 120 and 160."""
    c.optimizer.warmup_lr = 0.001
    c.optimizer.base_lr = 0.01
    return c


# Cutout side per data set in the GHFP first author's code (pruning_resnet_soft_hard.py)
GHFP_AUTHOR_CUTOUT = {"cifar10": 12, "cifar100": 6}


def ghfp_author_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training recipe of the GHFP first author's public code (methods.md 4 and 7): the SFP
    CIFAR recipe with Cutout always on (12 px on CIFAR-10, 6 px on CIFAR-100) and LR 0.1 from
    the first epoch (no warm-up epoch)."""
    c.cutout = GHFP_AUTHOR_CUTOUT[c.dataset]
    c.optimizer.warmup_lr = c.optimizer.base_lr
    return c


def imagenet(name: str, model: str, epochs: int = 100, *,
             nesterov: bool = False) -> ml_collections.ConfigDict:
    """The ImageNet recipe (methods.md 2): ``epochs`` epochs (100), batch 256, LR 0.1 x0.1 every
    30 epochs, weight decay 1e-4, momentum 0.9, input 224 (random-resized-crop + flip; eval
    resize 256 + crop). ``nesterov``: the official SFP script (he-y/soft-filter-pruning,
    pruning_train.py) builds ``torch.optim.SGD(..., nesterov=True)``, so the SFP rows pass True;
    the other rows follow PyTorch's ImageNet example (plain momentum)."""
    c = base_config()
    c.name = name
    c.model = model
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.epochs = epochs
    c.batch_size = 256
    c.eval_batch_size = 250
    c.num_seeds = IMAGENET_SEEDS
    o = c.optimizer
    o.schedule = "step"
    o.base_lr = 0.1
    o.warmup_lr = 0.1
    o.boundaries = tuple(e for e in (30, 60, 90) if e < epochs)
    o.factor = 0.1
    o.momentum = 0.9
    o.nesterov = nesterov
    o.weight_decay = 1e-4
    return c


def dense(c: ml_collections.ConfigDict, residual: str = "scatter") -> ml_collections.ConfigDict:
    """No pruning (a baseline). ``residual`` must be the policy of the rows that start from this
    baseline: the checkpoint holds per-group masks, whose groups depend on the policy."""
    c.method.name = "dense"
    c.method.rate = 0.0
    c.method.criterion = "l2"
    c.method.residual = residual
    return c


def soft(c: ml_collections.ConfigDict, method: str, rate: float,
         exclude: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """SFP / ASFP at ``rate``: L2 criterion, residual policy 'scatter' (SFP's small model,
    methods.md 6 (a)); CIFAR prunes every conv (stem and both convs of every block)."""
    c.method.name = method
    c.method.rate = rate
    c.method.criterion = "l2"
    c.method.residual = "scatter"
    c.method.exclude = tuple(exclude)
    return c


# ImageNet SFP: every conv except the projection (downsample) convs (methods.md 2).
IMAGENET_EXCLUDE = ("*/downsample",)


def ghfp(c: ml_collections.ConfigDict, rate: float, variant: str = "author") -> ml_collections.ConfigDict:
    """GHFP at ``rate`` (methods.md 4 and 7).

    ``variant='author'`` (the rows): as the first author's public code runs it, the only
    evidence of what the paper's experiments ran: ASFP with the cubic rate as the soft part, the
    cubic hard-fraction ramp reaching 1 at T, ``int(N * P_t * h)`` hard filters per layer, the
    epoch-0 hard fraction already at the first selection, and `ghfp_author_recipe` (Cutout, no
    warm-up epoch). ``variant='reading'``: methods.md section 4's reading: SFP as the soft part,
    the ramp reaching 1 at 0.9 T, ``floor(h * int(N * P_t))`` hard filters, the SFP recipe."""
    soft(c, "ghfp", rate)
    k = c.method.kwargs
    if variant == "author":
        k.soft, k.rate_shape, k.shape, k.end = "asfp", "cubic", "cubic", 1.0
        k.hard_count, k.harden_at_init = "layer", True
        ghfp_author_recipe(c)
    elif variant == "reading":
        k.soft, k.shape, k.end = "sfp", "cubic", 0.9
    else:
        raise ValueError(f"variant={variant!r}: expected 'author' or 'reading'")
    return c


def asfp_control(c: ml_collections.ConfigDict, rate: float) -> ml_collections.ConfigDict:
    """The ASFP control of a GHFP row: GHFP's soft part alone (ASFP with the cubic rate) on the
    same recipe (`ghfp_author_recipe`), so the comparison isolates the hard part."""
    soft(c, "asfp", rate)
    c.method.kwargs.rate_shape = "cubic"
    return ghfp_author_recipe(c)


def pfec(c: ml_collections.ConfigDict, pfec_config: str, baseline_row: str,
         epochs: int, residual: str = "scatter") -> ml_collections.ConfigDict:
    """PFEC (methods.md 1): start from the trained baseline ``baseline_row``, prune one-shot
    (L1, independent selection, named config ``pfec_config`` of
    ``jaxprune.methods.PFEC_CONFIGS``), retrain ``epochs`` epochs at a constant LR 0.001 (the
    rest of the optimizer as the PFEC reference on CIFAR: batch 64, momentum 0.9 without
    Nesterov, weight decay 1e-4; as the row's recipe elsewhere).

    ``residual`` must equal the baseline row's policy (its checkpoint's per-group state is
    restored into this row's structure). The CIFAR configs prune only first convs of blocks and
    VGG convs, whose groups are the same under both policies: 'scatter', as their SFP-recipe
    baselines. ResNet-34-C prunes a projection conv and the second convs that add to it with
    shared indices, which needs 'coupled': the ResNet-34 rows and their baseline use it."""
    c.method.name = "pfec"
    c.method.rate = 0.0
    c.method.criterion = "l1"
    c.method.residual = residual
    c.method.kwargs.config = pfec_config
    c.method.kwargs.selection = "independent"
    # as PFEC: the pruned filters are removed after the one shot and the smaller model is
    # retrained (cheaper per epoch; the same function as retraining the masked model, tested)
    c.compact_before_retraining = True
    c.pretrained = run_dir(baseline_row, 0)
    c.epochs = epochs
    c.optimizer.schedule = "constant"
    c.optimizer.base_lr = 0.001
    c.optimizer.warmup_lr = 0.001
    c.optimizer.boundaries = ()
    if c.dataset in ("cifar10", "cifar100"):
        # the PFEC reference retraining (methods.md 7): batch 64, SGD momentum 0.9 without
        # Nesterov, weight decay 1e-4
        c.batch_size = 64
        c.optimizer.nesterov = False
        c.optimizer.weight_decay = 1e-4
    return c


def hfp(c: ml_collections.ConfigDict, macs_reduction: float | None = None,
        params_reduction: float | None = None, finetune_epochs: int = 20,
        finetune_lr: float = 0.001) -> ml_collections.ConfigDict:
    """HFP (methods.md 5) with targets as fractions of the dense model to remove; MACs counted
    conv + FC ('the number of multiplications'); residual policy 'coupled' (coupled channels
    share one count). After the final hard pruning the model is fine-tuned (methods.md 5) for
    ``finetune_epochs`` at the constant LR ``finetune_lr`` (our choice: the paper's fine-tuning
    schedule was not available; 0.001 is PFEC's retraining LR)."""
    c.finetune_epochs = finetune_epochs
    c.finetune_lr = finetune_lr
    c.method.name = "hfp"
    c.method.rate = 0.0
    c.method.criterion = "bn_scale"
    c.method.residual = "coupled"
    if macs_reduction is not None:
        c.method.kwargs.macs_reduction = macs_reduction
    if params_reduction is not None:
        c.method.kwargs.params_reduction = params_reduction
    c.method.kwargs.convention = "conv_fc"
    c.method.kwargs.lam = 1.0
    return c


def paper(c: ml_collections.ConfigDict, *, table: str, source: str, row: str,
          baseline_acc: float = -1.0, pruned_acc: float = -1.0, macs_reduction: float = -1.0,
          params_reduction: float = -1.0, metric: str = "accuracy", note: str = "",
          controls: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Fills ``config.paper`` (figures in percent as printed; -1 = not given)."""
    if table not in TABLES:
        raise ValueError(f"table={table!r}: expected one of {TABLES}")
    p = c.paper
    p.source = source
    p.row = row
    p.baseline_acc = float(baseline_acc)
    p.pruned_acc = float(pruned_acc)
    p.macs_reduction = float(macs_reduction)
    p.params_reduction = float(params_reduction)
    p.table = table
    p.metric = metric
    p.note = note
    p.controls = tuple(controls)
    return c
