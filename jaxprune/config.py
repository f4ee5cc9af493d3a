"""Experiment configs: `ml_collections.ConfigDict`s written as Python files.

Every experiment file in ``jaxprune/configs/`` defines ``get_config()`` returning
``base_config()`` with its own values, and states in its docstring the paper row it
reproduces. The CLI loads a file with `load_config` and applies ``--config.key=value``
overrides with `override`; `validate` checks every value at the boundary and names the bad
one.
"""

from __future__ import annotations

import ast
import math
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import ml_collections

DATASETS = ("cifar10", "cifar100", "digits", "imagenet2012")
LR_SCHEDULES = ("sfp_cifar", "step", "constant", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run may set, with the SFP CIFAR-10 recipe as defaults (methods.md 2)."""
    c = ml_collections.ConfigDict()
    c.name = "run"
    # a bundled model's name (jaxprune.models.MODEL_NAMES) or a model of your own by import
    # path, 'my_package.models:make_net' (a Linen/NNX module class or a factory returning one),
    # called with model_kwargs (jaxprune.user_models)
    c.model = "resnet20"
    c.model_kwargs = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.data_dir = ""  # local copy or TFDS data_dir; '' = $JAXPRUNE_DATA_DIR / ~/.cache/jaxprune (jaxprune data)
    c.image_size = 0  # 0 = the data set's own size
    c.epochs = 200
    c.batch_size = 128
    c.eval_batch_size = 500
    c.seed = 0
    c.num_seeds = 1  # how many seeds the paper row averages over (experiments runner)
    c.train_subset = 0  # >0: train on the first N training images only (smoke runs)
    c.test_subset = 0
    # Input normalisation (per channel, 0..1 units): () = the data set's own constants (SFP's
    # CIFAR statistics). A run that starts from `pretrained` weights inherits theirs when unset.
    c.mean = ()
    c.std = ()
    # Cutout (DeVries & Taylor 2017) on top of the CIFAR augmentation: the side in pixels of the
    # square zeroed in each training image after normalisation; 0 = off (the SFP/PFEC recipes).
    # The GHFP author's code uses 12 on CIFAR-10 and 6 on CIFAR-100.
    c.cutout = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.schedule = "sfp_cifar"  # one of LR_SCHEDULES
    c.optimizer.base_lr = 0.1
    c.optimizer.warmup_lr = 0.01  # sfp_cifar: LR of the warm-up (the first epoch)
    c.optimizer.warmup_epochs = 1.0  # sfp_cifar: length of the warm-up (fractional epochs allowed)
    c.optimizer.boundaries = (60, 120, 160)  # epochs (fractional allowed: shortened recipes)
    c.optimizer.factor = 0.2
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4

    c.method = ml_collections.ConfigDict()
    c.method.name = "dense"  # see jaxprune.methods.METHODS
    c.method.rate = 0.0
    c.method.criterion = "l2"
    c.method.residual = "scatter"  # 'scatter' (policy a) or 'coupled' (policy b)
    c.method.exclude = ()  # producer module paths never pruned
    # Hardware-aware widths of the final selection (jaxprune.selection.WidthPolicy): kept counts
    # rounded to a multiple of round_to ('up': keep the next-best filters; 'down'); 1 = exact
    # (the paper rows keep the papers' exact widths).
    c.method.round_to = 1
    c.method.round_direction = "up"
    c.method.width_table = ""  # a `jaxprune bench-widths` table: per group the fastest width >= selected
    c.method.kwargs = ml_collections.ConfigDict()  # method-specific options

    # Fine-tuning after the method's final hard pruning (HFP: methods.md 5): this many epochs
    # at the constant LR finetune_lr with the final masks fixed (hard); 0 = none.
    c.finetune_epochs = 0
    c.finetune_lr = 0.001

    c.pretrained = ""  # checkpoint directory to start from (its latest or best params)
    # PFEC: physically remove the one-shot pruned filters before retraining and retrain the
    # smaller model (as PFEC does; cheaper per epoch). The same function as retraining the
    # masked model, up to float rounding.
    c.compact_before_retraining = False
    c.keep_checkpoints = 3
    # The engine: train steps per jitted device call (the largest divisor of the epoch's steps
    # up to this; 0 = the whole epoch; -1 = auto: 50 on accelerators, 1 on CPU, where XLA runs a
    # rolled loop's convolutions far slower: BENCHMARKS.md). The progress bar and a stop signal
    # act between calls; chunks agree with single steps to float rounding.
    c.steps_per_call = -1
    # Compute dtype: 'bfloat16' runs convolutions and activations in bf16 while params,
    # optimizer state, BN statistics, masks and the loss stay float32.
    c.dtype = "float32"

    c.paper = ml_collections.ConfigDict()
    c.paper.source = ""  # e.g. 'SFP (He et al. 2018), Table 1'
    c.paper.row = ""
    c.paper.baseline_acc = -1.0
    c.paper.pruned_acc = -1.0
    c.paper.macs_reduction = -1.0  # percent, as printed
    c.paper.params_reduction = -1.0
    return c


def with_defaults(recorded: dict) -> dict:
    """A recorded config (``config.json`` of a run) completed with the `base_config` defaults of
    keys added since it was written, as JSON types; recorded values win."""
    import json

    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                out[k] = merge(base.get(k), v) if k in base else v
            return out
        return over

    base = json.loads(json.dumps(base_config().to_dict(), default=list))
    return merge(base, json.loads(json.dumps(recorded, default=list)))


def packaged_configs() -> tuple[str, ...]:
    """Names of the experiment configs shipped in `jaxprune.configs` (``jaxprune train
    --config NAME``)."""
    here = Path(__file__).parent / "configs"
    return tuple(sorted(p.stem for p in here.glob("*.py") if p.stem not in ("__init__", "common")))


def config_path(name: str | Path) -> Path:
    """The file a ``--config`` value names: an existing path, else a packaged config's name
    (``sfp_resnet56_cifar10``, with or without ``.py``)."""
    p = Path(name)
    if p.exists() or p.parent != Path("."):
        return p
    packaged = Path(__file__).parent / "configs" / (p.stem + ".py")
    if p.suffix in ("", ".py") and p.stem in packaged_configs():
        return packaged
    return p


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """Imports the Python file ``path`` (or the packaged config of that name, see
    `config_path`) and returns its ``get_config()``; a file that fails to load raises
    ValueError in one line naming the file and line."""
    import difflib
    import traceback

    p = config_path(path)
    if p.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory; expected a Python file "
                         "defining get_config()")
    if not p.is_file():
        close = difflib.get_close_matches(Path(path).stem, packaged_configs(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (nor a packaged config's name)"
        raise FileNotFoundError(f"config file {str(path)!r} does not exist{hint}")
    spec = importlib.util.spec_from_file_location(f"jaxprune_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"config file {str(p)!r} defines no get_config()")
        return module.get_config()
    except ValueError:
        raise
    except SyntaxError as e:
        raise ValueError(f"config file {str(p)!r}, line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the user's file: name where it failed
        frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == p]
        where = f", line {frames[-1].lineno}" if frames else ""
        raise ValueError(f"config file {str(p)!r}{where}: {type(e).__name__}: {e}") from None


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _did_you_mean(name: str, node: ml_collections.ConfigDict) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(node.keys()), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def override(config: ml_collections.ConfigDict, assignments: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``['a.b=1', ...]`` (from ``--config.a.b=1``) to a copy of ``config``.

    Values are Python literals (``0.3``, ``(60, 120)``, ``True``) or bare strings. Unknown keys
    and type changes are refused with the key named.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ValueError(f"unknown config key {key!r}{_did_you_mean(part, node)}")
            node = node[part]
        if leaf not in node and not (parents and parents[-1] in ("kwargs", "model_kwargs")):
            raise ValueError(f"unknown config key {key!r}{_did_you_mean(leaf, node)}; known here: "
                             f"{', '.join(sorted(node.keys()))}")
        value = _parse_value(text)
        old = node[leaf] if leaf in node else None
        if isinstance(old, str) and not isinstance(value, str):
            value = text
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, (int, float, str)):
            value = (value,)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"config key {key!r}: {value!r} has the wrong type ({e})") from None
    return config


def _numbers(tree: Any, prefix: str = ""):
    """``(dotted key, float value)`` of every number in a nested dict/list (bools excluded)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{prefix[:-1]}[{i}].")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix[:-1], float(tree)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad value of ``config`` (`jaxprune.validate`'s one
    line); the allowed names come from the registries (methods, criteria, residual policies)."""
    from jaxprune import validate
    from jaxprune.criteria import CRITERIA
    from jaxprune.graph import RESIDUAL_POLICIES
    from jaxprune.methods import METHODS
    from jaxprune.models import MODEL_NAMES
    from jaxprune.user_models import is_import_path

    def bad(key, value, allowed):
        validate.refuse(f"config.{key}", value, allowed)

    for key, v in _numbers(config.to_dict()):
        if not math.isfinite(v):
            bad(key, v, "a finite number")
    if config.model not in MODEL_NAMES and not is_import_path(config.model):
        bad("model", config.model, f"one of {', '.join(MODEL_NAMES)} or an import path "
            "'package.module:name' of a model of your own")
    if config.dataset not in DATASETS:
        bad("dataset", config.dataset, f"one of {', '.join(DATASETS)}")
    for key in ("epochs", "batch_size", "eval_batch_size", "num_seeds", "keep_checkpoints"):
        if not isinstance(config[key], int) or config[key] < 1:
            bad(key, config[key], "a positive integer")
    if config.dtype not in COMPUTE_DTYPES:
        bad("dtype", config.dtype, f"one of {', '.join(COMPUTE_DTYPES)}")
    if not isinstance(config.steps_per_call, int) or config.steps_per_call < -1:
        bad("steps_per_call", config.steps_per_call, "-1 (auto), 0 (whole epoch) or a positive integer")
    for key in ("seed", "train_subset", "test_subset", "image_size", "finetune_epochs", "cutout"):
        if not isinstance(config[key], int) or config[key] < 0:
            bad(key, config[key], "a non-negative integer")
    if config.cutout and config.dataset not in ("cifar10", "cifar100", "digits"):
        bad("cutout", config.cutout, "0 for a streamed data set (Cutout runs on in-memory "
            "CIFAR and digits batches)")
    cbr = config.get("compact_before_retraining", False)
    if not isinstance(cbr, bool):
        bad("compact_before_retraining", cbr, "True or False")
    if cbr and config.method.name != "pfec":
        bad("compact_before_retraining", cbr,
            "False unless method.name is 'pfec' (the one-shot method whose masks never change)")
    if not (isinstance(config.finetune_lr, (int, float)) and config.finetune_lr > 0):
        bad("finetune_lr", config.finetune_lr, "a number > 0")
    opt = config.optimizer
    if opt.schedule not in LR_SCHEDULES:
        bad("optimizer.schedule", opt.schedule, f"one of {', '.join(LR_SCHEDULES)}")
    for key in ("base_lr", "warmup_lr", "weight_decay", "momentum", "factor", "warmup_epochs"):
        v = opt.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            bad(f"optimizer.{key}", v, "a finite number >= 0")
    bounds = tuple(opt.boundaries)
    if any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0
           for b in bounds) or list(bounds) != sorted(bounds):
        bad("optimizer.boundaries", opt.boundaries, "sorted finite epochs >= 0")

    for key in ("mean", "std"):
        v = tuple(config[key])
        if v and not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            bad(key, config[key], "a tuple of finite numbers (one per channel) or ()")
        if key == "std" and any(x <= 0 for x in v):
            bad(key, config[key], "positive numbers")
    if len(tuple(config.mean)) != len(tuple(config.std)):
        bad("std", config.std, f"as many values as config.mean={tuple(config.mean)!r}")
    m = config.method
    if m.name not in METHODS:
        bad("method.name", m.name, f"one of {', '.join(METHODS)}")
    if not (isinstance(m.rate, (int, float)) and 0.0 <= m.rate < 1.0):
        bad("method.rate", m.rate, "a number in [0, 1)")
    if m.criterion not in CRITERIA:
        bad("method.criterion", m.criterion, f"one of {', '.join(CRITERIA)}")
    rt = m.get("round_to", 1)
    if isinstance(rt, bool) or not isinstance(rt, int) or rt < 1:
        bad("method.round_to", rt, "a positive integer (1 = exact widths)")
    if m.get("round_direction", "up") not in ("up", "down"):
        bad("method.round_direction", m.round_direction, "'up' or 'down'")
    if m.residual not in RESIDUAL_POLICIES:
        bad("method.residual", m.residual, f"one of {', '.join(RESIDUAL_POLICIES)}")
