"""Bundled compactable models and their registry.

``get_model(name, num_classes=10, **kwargs)`` builds a Linen model by name (``MODEL_NAMES``);
extra kwargs are model fields (``keep_out``, ``keep_in``, ``dtype``, ...).
``model_config(model)`` / ``model_from_config(cfg)`` round-trip a model, its keep dicts included,
through JSON-safe types (for checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from jaxprune.models.cifar_resnet import CifarBasicBlock, CifarResNet
from jaxprune.models.common import (dtype_from_name, dtype_name, freeze_keep, gather_channels, materialize,
                                    positions, reindex, width)
from jaxprune.models.densenet import DenseNetTiny
from jaxprune.models.imagenet_resnet import ImageNetResNet, ResNetBlock
from jaxprune.models.mobilenet import InvertedResidual, MobileNetV2Tiny
from jaxprune.models.nnx_models import SmallNNXCNN
from jaxprune.models.torch_import import from_torch
from jaxprune.models.vgg import CifarVGG

# registry name -> (class, fixed fields)
_REGISTRY: dict[str, tuple[type, dict[str, Any]]] = {
    "resnet20": (CifarResNet, {"depth": 20}),
    "resnet32": (CifarResNet, {"depth": 32}),
    "resnet44": (CifarResNet, {"depth": 44}),
    "resnet56": (CifarResNet, {"depth": 56}),
    "resnet110": (CifarResNet, {"depth": 110}),
    "vgg11": (CifarVGG, {"depth": 11}),
    "vgg13": (CifarVGG, {"depth": 13}),
    "vgg16": (CifarVGG, {"depth": 16}),
    "vgg19": (CifarVGG, {"depth": 19}),
    "resnet18": (ImageNetResNet, {"depth": 18}),
    "resnet34": (ImageNetResNet, {"depth": 34}),
    "resnet50": (ImageNetResNet, {"depth": 50}),
    "resnet101": (ImageNetResNet, {"depth": 101}),
    "resnet152": (ImageNetResNet, {"depth": 152}),
    "mobilenetv2_tiny": (MobileNetV2Tiny, {}),
    "densenet_tiny": (DenseNetTiny, {}),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# classes model_from_config may build
MODEL_CLASSES: dict[str, type] = {
    c.__name__: c for c in (CifarResNet, CifarVGG, ImageNetResNet, MobileNetV2Tiny, DenseNetTiny)
}

_KEEP_FIELDS = ("keep_out", "keep_in")


def get_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """The bundled model called ``name`` (see ``MODEL_NAMES``) with ``num_classes`` outputs."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not allowed; expected a positive integer")
    cls, fixed = _REGISTRY[key]
    clash = set(fixed) & set(kwargs)
    if clash:
        raise ValueError(f"model {name!r} fixes {sorted(clash)}; do not pass them")
    return cls(num_classes=num_classes, **fixed, **kwargs)


def _user_fields(model: nn.Module) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(model) if f.init and f.name not in ("parent", "name")]


def registry_name(model: nn.Module) -> str | None:
    """The ``MODEL_NAMES`` entry whose architecture ``model`` has, or None."""
    for key, (cls, fixed) in _REGISTRY.items():
        if type(model) is cls and all(getattr(model, k) == v for k, v in fixed.items()):
            return key
    return None


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return value.item()
    raise TypeError(f"cannot serialise model field value {value!r}")


def model_config(model: nn.Module) -> dict:
    """JSON-safe description of a bundled model: ``{'class', 'model', <fields>...}``.

    Keep dicts become ``{path: [int, ...]}``, dtypes their names, tuples lists.
    """
    cls_name = type(model).__name__
    if MODEL_CLASSES.get(cls_name) is not type(model):
        raise TypeError(f"model_config supports the bundled models {sorted(MODEL_CLASSES)}, got {cls_name}")
    cfg: dict[str, Any] = {"class": cls_name, "model": registry_name(model)}
    for f in _user_fields(model):
        v = getattr(model, f.name)
        if f.name in _KEEP_FIELDS:
            cfg[f.name] = {str(k): [int(i) for i in idx] for k, idx in freeze_keep(v).items()}
        elif f.name == "dtype":
            cfg[f.name] = dtype_name(v)
        else:
            cfg[f.name] = _to_json(v)
    return cfg


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def model_from_config(cfg: dict) -> nn.Module:
    """Inverse of :func:`model_config`. Also accepts ``{'model': name, <fields>...}`` only."""
    cfg = dict(cfg)
    cls_name = cfg.pop("class", None)
    reg = cfg.pop("model", None)
    if cls_name is None:
        if reg is None:
            raise ValueError("model config needs a 'class' or a 'model' entry")
        cls, fixed = _REGISTRY[reg] if reg in _REGISTRY else (None, None)
        if cls is None:
            raise ValueError(f"unknown model {reg!r}; allowed: {', '.join(MODEL_NAMES)}")
        cls_name = cls.__name__
        cfg = {**fixed, **cfg}
    if cls_name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {cls_name!r}; allowed: {sorted(MODEL_CLASSES)}")
    kwargs: dict[str, Any] = {}
    for k, v in cfg.items():
        if k in _KEEP_FIELDS:
            kwargs[k] = freeze_keep(v)
        elif k == "dtype":
            kwargs[k] = dtype_from_name(v)
        else:
            kwargs[k] = _from_json(v)
    return MODEL_CLASSES[cls_name](**kwargs)


__all__ = [
    "from_torch",
    "MODEL_NAMES",
    "MODEL_CLASSES",
    "get_model",
    "model_config",
    "model_from_config",
    "registry_name",
    "reindex",
    "gather_channels",
    "materialize",
    "width",
    "positions",
    "CifarResNet",
    "CifarBasicBlock",
    "CifarVGG",
    "ImageNetResNet",
    "ResNetBlock",
    "MobileNetV2Tiny",
    "InvertedResidual",
    "DenseNetTiny",
    "SmallNNXCNN",
]
