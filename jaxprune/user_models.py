"""Models of the user's own in the engine: ``config.model`` as an import path
(``"my_package.models:make_net"``) resolved by `build_model`, and `NNXModel`, which puts an
NNX model behind the Linen ``init``/``apply`` calls the engine makes.

An import path names a Linen module class, an NNX module class, or a factory returning a
Linen module or an NNX model; ``config.model_kwargs`` are its keyword arguments. A callable
that takes ``num_classes`` gets the data set's when the kwargs do not set it; an NNX class or
factory that takes ``rngs`` gets ``nnx.Rngs(config.seed)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Mapping

import flax.linen as nn
from flax import nnx


def is_import_path(name: Any) -> bool:
    """True for ``"package.module:attribute"`` (a model of the user's own), False for a
    bundled model's name."""
    return isinstance(name, str) and ":" in name


def import_object(path: str) -> Any:
    """The object an import path ``"package.module:attr.sub"`` names (ValueError in one line
    when it cannot be imported)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"config.model={path!r} is not an import path; expected "
                         "'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"config.model={path!r}: cannot import {module_name!r} ({e}); is its "
                         "package on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"config.model={path!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(eq=False)
class NNXModel:
    """An NNX model behind Linen's calls: ``init(rng, x, train=False)`` returns its current
    Params and BatchStats as a variables dict (`jaxprune.pruner.nnx_variables`; the model was
    initialised when it was built, so ``rng`` is unused) and ``apply(variables, x, train=False,
    mutable=())`` runs a copy of it with those variables, in train mode (``model.train()``:
    batch statistics, dropout on) or eval mode, returning ``(out, {'batch_stats': ...})`` when
    ``mutable`` is given. Pure: ``module`` itself is never changed. Its other state (an RNG
    stream for dropout) is the model's at construction in every call."""

    module: nnx.Module

    def __call__(self, x: Any, train: bool = False) -> Any:  # the signature the engine reads
        return self.apply(self.init(None, x), x, train=train)

    def init(self, rng: Any, x: Any, train: bool = False) -> dict:
        from jaxprune.pruner import nnx_variables

        del rng, x, train
        return nnx_variables(self.module)

    def apply(self, variables: Mapping[str, Any], x: Any, train: bool = False,
              mutable: Any = ()) -> Any:
        graphdef, params, stats, rest = nnx.split(self.module, nnx.Param, nnx.BatchStat, ...)
        nnx.replace_by_pure_dict(params, variables["params"])
        if variables.get("batch_stats"):
            nnx.replace_by_pure_dict(stats, variables["batch_stats"])
        model = nnx.merge(graphdef, params, stats, rest)
        model.train() if train else model.eval()
        out = model(x)
        if mutable:
            return out, {"batch_stats": nnx.state(model, nnx.BatchStat).to_pure_dict()}
        return out

    def eval_module(self) -> nnx.Module:
        """A copy of ``module`` in eval mode (what compaction traces)."""
        graphdef, state = nnx.split(self.module)
        model = nnx.merge(graphdef, state)
        model.eval()
        return model


def _call(obj: Any, kwargs: dict, num_classes: int, seed: int) -> Any:
    try:
        params = inspect.signature(obj.__init__ if isinstance(obj, type) else obj).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = dict(kwargs)
    if "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    if "rngs" in params and "rngs" not in kwargs:
        kwargs["rngs"] = nnx.Rngs(seed)
    return obj(**kwargs)


def build_model(spec: Any, kwargs: Mapping[str, Any] | None = None, *, num_classes: int,
                seed: int = 0) -> nn.Module | NNXModel:
    """The model ``spec`` names: an import path or the object itself (a Linen module or an NNX
    model, used as it is; a Linen/NNX class or a factory, called with ``kwargs``). An NNX model
    comes back wrapped in `NNXModel`."""
    kwargs = dict(kwargs or {})
    obj = import_object(spec) if isinstance(spec, str) else spec
    if isinstance(obj, (nn.Module, nnx.Module, NNXModel)):
        if kwargs:
            raise ValueError(f"config.model_kwargs={kwargs!r}: the model is an instance "
                             f"({type(obj).__name__}), not a class or factory to call with them")
        model = obj
    elif callable(obj):
        try:
            model = _call(obj, kwargs, num_classes, seed)
        except TypeError as e:
            raise ValueError(f"config.model={spec!r} with config.model_kwargs={kwargs!r}: {e}") from None
    else:
        raise ValueError(f"config.model={spec!r} is a {type(obj).__name__}; expected a Linen "
                         "module class, an NNX module class, or a factory returning one")
    if isinstance(model, nnx.Module):
        return NNXModel(model)
    if not isinstance(model, (nn.Module, NNXModel)):
        raise ValueError(f"config.model={spec!r} returned a {type(model).__name__}; expected a "
                         "Flax Linen module or an NNX model")
    return model


def import_path_of(model: Any) -> str:
    """``"module:QualName"`` of a model object's class (what a run records as ``config.model``)."""
    obj = model.module if isinstance(model, NNXModel) else model
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"
