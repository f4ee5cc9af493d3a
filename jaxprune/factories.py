"""What a config builds before training: the data set, the model, the LR schedule and the
pruning method (`jaxprune.experiment.setup` puts them together)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxprune import data as data_lib
from jaxprune import optim
from jaxprune.imagenet import StreamedDataset, load_imagenet
from jaxprune.methods.base import final_roles
from jaxprune.models import get_model


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset | StreamedDataset:
    """The config's data set: in-memory arrays (CIFAR, digits) or streams (ImageNet); optionally
    a subset, for smoke runs."""
    if config.dataset == "digits":
        ds = data_lib.load_digits_dataset(image_size=config.image_size or 16, seed=config.seed)
    elif config.dataset in ("cifar10", "cifar100"):
        ds = data_lib.load_cifar(config.dataset, config.data_dir or None)
    elif config.dataset == "imagenet2012":
        ds = load_imagenet(config.batch_size, config.eval_batch_size,
                           image_size=config.image_size or 224, seed=config.seed,
                           data_dir=config.data_dir or None, train_subset=config.train_subset,
                           test_subset=config.test_subset)
    else:
        raise ValueError(f"config.dataset={config.dataset!r}: expected cifar10, cifar100, digits "
                         "or imagenet2012")
    if tuple(config.mean):
        if len(config.mean) != len(ds.mean):
            raise ValueError(f"config.mean={tuple(config.mean)!r} has {len(config.mean)} values; "
                             f"{config.dataset} images have {len(ds.mean)} channels")
        ds = dataclasses.replace(ds, mean=tuple(config.mean), std=tuple(config.std))
    if isinstance(ds, StreamedDataset):
        return ds
    if config.train_subset or config.test_subset:
        n_tr = config.train_subset or ds.num_train
        n_te = config.test_subset or ds.num_test
        ds = dataclasses.replace(ds, x_train=ds.x_train[:n_tr], y_train=ds.y_train[:n_tr],
                                 x_test=ds.x_test[:n_te], y_test=ds.y_test[:n_te])
    return ds


# classes of each data set a config may name (the generated ImageNet copy has 1000 too)
NUM_CLASSES = {**{k: v["num_classes"] for k, v in data_lib.CIFAR_CONSTANTS.items()},
               "digits": 10, "imagenet2012": 1000}


def data_spec(config: ml_collections.ConfigDict) -> tuple[tuple[int, int, int], int]:
    """``(image_shape, num_classes)`` of the config's data set, without reading it: what a
    model's variables need (`jaxprune.pretrained.variables_target`)."""
    size = {"digits": config.image_size or 16, "imagenet2012": config.image_size or 224}
    return (size.get(config.dataset, 32),) * 2 + (3,), NUM_CLASSES[config.dataset]


def fit_sets(ds: data_lib.Dataset | StreamedDataset) -> tuple[Any, Any]:
    """The training and test sets as `training.fit` takes them: host arrays or streams."""
    if isinstance(ds, StreamedDataset):
        return ds.train, ds.test
    return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)


def test_set(ds: data_lib.Dataset | StreamedDataset) -> tuple[Any, Any]:
    """``(images, labels)`` of the test set as `evaluation.evaluate` takes them (a stream and
    None for a streamed data set)."""
    return (ds.test, None) if isinstance(ds, StreamedDataset) else (ds.x_test, ds.y_test)


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """The LR schedule the config names (per optimizer step)."""
    o = config.optimizer
    if o.schedule == "sfp_cifar":
        return optim.sfp_cifar_schedule(steps_per_epoch, base_lr=o.base_lr, warmup_lr=o.warmup_lr,
                                           boundaries=tuple(o.boundaries), factor=o.factor,
                                           warmup_epochs=float(o.get("warmup_epochs", 1.0)))
    if o.schedule == "step":
        return optim.step_schedule(steps_per_epoch, base_lr=o.base_lr,
                                      boundaries=tuple(o.boundaries), factor=o.factor)
    if o.schedule == "cosine":
        import optax

        return optax.cosine_decay_schedule(o.base_lr, max(1, config.epochs * steps_per_epoch))
    return optim.constant_schedule(o.base_lr)


def soft_methods() -> tuple[str, ...]:
    """The methods whose final model SFP's closed-form MACs reduction describes: the soft
    variants (`jaxprune.methods.sfp.SOFT_VARIANTS`) and GHFP (soft, then gradually hard)."""
    from jaxprune.methods.sfp import SOFT_VARIANTS

    return (*SOFT_VARIANTS, "ghfp")


def width_methods() -> tuple[str, ...]:
    """The registered methods that take a width policy (``round_to``, a latency table): every
    one that prunes (all of `jaxprune.methods.METHODS` but ``dense``)."""
    from jaxprune.methods import METHODS

    return tuple(name for name in METHODS if name != "dense")


def make_method(config: ml_collections.ConfigDict):
    """The pruning method the config names."""
    from jaxprune.methods import get_method

    m = config.method
    kwargs = dict(m.kwargs.to_dict()) if m.kwargs else {}
    round_to, direction = int(m.get("round_to", 1)), m.get("round_direction", "up")
    table = m.get("width_table", "")
    if round_to != 1 or table:
        if m.name not in width_methods():
            what = f"round_to={round_to}" if round_to != 1 else f"width_table={table!r}"
            raise ValueError(f"config.method.{what}: method {m.name!r} does not take a "
                             f"width policy ({', '.join(width_methods())} do)")
        from jaxprune.width_bench import load_table

        kwargs["width"] = {"round_to": round_to, "direction": direction,
                           "latency": load_table(table) if table else None}
    return get_method(m.name, rate=m.rate, criterion=m.criterion, exclude=tuple(m.exclude), **kwargs)


def make_model(config: ml_collections.ConfigDict, num_classes: int, model: Any = None) -> Any:
    """The config's model: a bundled one by name, or a model of the user's own
    (`jaxprune.user_models.build_model`): ``model`` (an object) if given, else the import
    path ``config.model`` with ``config.model_kwargs``. An NNX model comes back as a
    `jaxprune.user_models.NNXModel`."""
    from jaxprune.user_models import build_model

    if model is None and not is_own_model(config):
        return get_model(config.model, num_classes=num_classes, dtype=jnp.dtype(config.dtype))
    if config.dtype != "float32":
        raise ValueError(f"config.dtype={config.dtype!r} is not allowed for a model of your own; "
                         "expected 'float32' (set the compute dtype in the model itself)")
    if config.compact_before_retraining:
        raise ValueError("config.compact_before_retraining=True is not allowed for a model of "
                         "your own; expected False (it retrains a bundled model's compact form)")
    kwargs = config.get("model_kwargs")
    kwargs = kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs or {})
    return build_model(model if model is not None else config.model, kwargs,
                       num_classes=num_classes, seed=config.seed)


def is_own_model(config: ml_collections.ConfigDict) -> bool:
    """True when ``config.model`` is an import path (a model of the user's own)."""
    from jaxprune.user_models import is_import_path

    return is_import_path(config.model)


def is_bundled(model: Any) -> bool:
    """Whether ``model`` follows the bundled models' ``keep_out``/``keep_in`` contract."""
    return hasattr(model, "keep_out")


def for_compaction(model: Any) -> Any:
    """What `jaxprune.compaction.compact` takes for ``model`` (an NNX model in eval mode)."""
    from jaxprune.user_models import NNXModel

    return model.eval_module() if isinstance(model, NNXModel) else model


def own_model_method(method: Any, config: ml_collections.ConfigDict) -> Any:
    """A method whose final model keeps pruned channels' BN constants (SFP's official
    ``final_bn='keep'``) needs a bundled model to carry them; a model of the user's own is
    compacted from its program, so its final model zeroes them (``final_bn='zero'``) unless
    the config asks for 'keep' (then refused)."""
    if final_roles(method) is None:
        return method
    asked = (config.method.kwargs.to_dict() if config.method.kwargs else {}).get("final_bn")
    if asked is None and dataclasses.is_dataclass(method) and hasattr(method, "final_bn"):
        return dataclasses.replace(method, final_bn="zero")
    raise ValueError(f"config.method.kwargs.final_bn={asked!r} is not allowed for a model of "
                     "your own; expected 'zero' (keeping pruned channels' BN constants needs a "
                     "bundled model)")
