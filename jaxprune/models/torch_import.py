"""Import trained PyTorch CIFAR ResNets (option-A shortcuts) into the bundled `CifarResNet`.

``from_torch(name, state_dict)`` maps a PyTorch ``state_dict`` of the standard CIFAR ResNet
(He et al. 2016, as in ``akamaster/pytorch_resnet_cifar10``; the layout of
``../shared/data/pretrained/*.npz``) to ``(model, variables)``:

=====================================  ======================================================
PyTorch key                            Flax variable
=====================================  ======================================================
``conv1.weight`` (O, I, kh, kw)        ``params/stem/kernel`` (kh, kw, I, O)
``bn1.{weight,bias}``                  ``params/stem_bn/{scale,bias}``
``bn1.{running_mean,running_var}``     ``batch_stats/stem_bn/{mean,var}``
``layer{s}.{b}.conv{k}.weight``        ``params/layer{s}_{b-0based}/conv{k}/kernel``
``layer{s}.{b}.bn{k}.*``               ``.../bn{k}/*`` as for the stem
``linear.weight`` (out, in)            ``params/fc/kernel`` (in, out)
``linear.bias``                        ``params/fc/bias``
=====================================  ======================================================

Strict: a missing, unexpected or misshaped tensor is a ValueError naming the key (and both
shapes); nothing is filled in. ``num_batches_tracked`` counters (PyTorch bookkeeping, not
weights) are ignored, and a uniform ``module.`` prefix (``nn.DataParallel``) is stripped.
The option-A shortcut of the source pads ``planes // 4`` zero channels on each side of the
subsampled input, which is the bundled model's ``(C_out - C_in) // 2``; both use 1-pixel conv
padding and BatchNorm epsilon 1e-5 (`BN_EPSILON`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from jaxprune.models.common import BN_EPSILON

_IGNORED_SUFFIX = ".num_batches_tracked"
_BN_FIELDS = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{key: float32 numpy array}`` from a mapping or an ``.npz`` path (keys as in PyTorch)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"state dict file {str(path)!r} does not exist")
        if path.suffix != ".npz":
            raise ValueError(f"state dict file {str(path)!r}: expected an .npz of PyTorch "
                             "state_dict arrays (convert a .pt/.th file with numpy first)")
        try:
            with np.load(path) as f:
                out = {k: np.asarray(f[k]) for k in f.files}
        except Exception as e:  # noqa: BLE001 - truncated zip, pickled objects, garbage
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"state dict file {str(path)!r} is not a readable .npz of arrays "
                             f"({type(e).__name__}: {text[:200]})") from None
    elif isinstance(source, Mapping):
        out = {str(k): np.asarray(v) for k, v in source.items()}
    else:
        raise TypeError(f"state_dict must be a mapping of arrays or an .npz path, got "
                        f"{type(source).__name__}")
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return {k: v for k, v in out.items() if not k.endswith(_IGNORED_SUFFIX)}


def _torch_name(flax_module: str) -> str:
    """``'layer2_0/bn1'`` -> ``'layer2.0.bn1'``; ``'stem'`` -> ``'conv1'``; ``'fc'`` -> ``'linear'``."""
    if flax_module == "stem":
        return "conv1"
    if flax_module == "stem_bn":
        return "bn1"
    if flax_module == "fc":
        return "linear"
    m = re.fullmatch(r"layer(\d+)_(\d+)/(\w+)", flax_module)
    if m is None:
        raise ValueError(f"no PyTorch name for module {flax_module!r}")
    return f"layer{m.group(1)}.{m.group(2)}.{m.group(3)}"


def _mapping(variables: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], Any]]:
    """PyTorch key -> (Flax variable path, transform) for every leaf of the bundled model."""
    out: dict[str, tuple[tuple[str, ...], Any]] = {}
    for module in variables["params"]:
        for sub, leaves in _modules(variables["params"][module], module):
            tname = _torch_name(sub)
            if "kernel" in leaves:
                ndim = np.ndim(leaves["kernel"])
                transform = (lambda a: np.transpose(a, (2, 3, 1, 0))) if ndim == 4 else np.transpose
                out[f"{tname}.weight"] = (("params", *sub.split("/"), "kernel"), transform)
                if "bias" in leaves:
                    out[f"{tname}.bias"] = (("params", *sub.split("/"), "bias"), None)
            else:  # BatchNorm
                for tfield, coll, ffield in _BN_FIELDS:
                    out[f"{tname}.{tfield}"] = ((coll, *sub.split("/"), ffield), None)
    return out


def _modules(tree: Mapping[str, Any], prefix: str):
    """``(module path, {leaf name: array})`` of every innermost module under ``prefix``."""
    if all(not isinstance(v, Mapping) for v in tree.values()):
        yield prefix, tree
        return
    for k, v in tree.items():
        yield from _modules(v, f"{prefix}/{k}")


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def from_torch(name: str, state_dict: str | os.PathLike | Mapping[str, Any], *,
               num_classes: int | None = None, bn_epsilon: float = 1e-5) -> tuple[Any, dict]:
    """``(model, variables)`` of bundled CIFAR ResNet ``name`` (resnet20/32/44/56/110) with the
    weights of a PyTorch ``state_dict`` (a mapping of keys to arrays, or an ``.npz`` path).

    ``num_classes`` defaults to the rows of ``linear.weight``. ``bn_epsilon`` is the source's
    BatchNorm epsilon; it must be the bundled models' (1e-5, PyTorch's default), otherwise the
    imported model would not compute what the source computes.
    """
    import jax
    import jax.numpy as jnp

    from jaxprune.models import get_model
    from jaxprune.models.cifar_resnet import CIFAR_RESNET_DEPTHS

    allowed = tuple(f"resnet{d}" for d in CIFAR_RESNET_DEPTHS)
    if str(name).lower() not in allowed:
        raise ValueError(f"from_torch: model {name!r} is not supported; allowed: {', '.join(allowed)}")
    if float(bn_epsilon) != BN_EPSILON:
        raise ValueError(f"from_torch: bn_epsilon={bn_epsilon} differs from the bundled models' "
                         f"BatchNorm epsilon {BN_EPSILON}")
    sd = read_state_dict(state_dict)
    if "linear.weight" not in sd:
        raise ValueError("state dict has no 'linear.weight' (the classifier): missing key")
    if num_classes is None:
        num_classes = int(np.shape(sd["linear.weight"])[0])
    model = get_model(name, num_classes=num_classes)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False))
    mapping = _mapping(target)

    missing = [k for k in mapping if k not in sd]
    unexpected = [k for k in sd if k not in mapping]
    if missing:
        raise ValueError(f"state dict for {name} is missing {len(missing)} key(s): "
                         f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        raise ValueError(f"state dict for {name} has {len(unexpected)} unexpected key(s): "
                         f"{', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
    flat = {}
    for key, (path, transform) in mapping.items():
        raw = np.asarray(sd[key])
        if not np.issubdtype(raw.dtype, np.floating):
            raise ValueError(f"state dict key {key!r} has dtype {raw.dtype}; weights must be "
                             "floating point")
        arr = raw.astype(np.float32)
        value = transform(arr) if transform is not None else arr
        want = tuple(_get(target, path).shape)
        if tuple(value.shape) != want:
            shown = tuple(arr.shape)
            raise ValueError(f"state dict key {key!r} has shape {shown} (PyTorch layout); "
                             f"{name} expects {want} at {'/'.join(path)} after the layout change")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"state dict key {key!r} holds non-finite values")
        if path[-1] == "var" and np.any(value < 0):
            raise ValueError(f"state dict key {key!r} (a BatchNorm running variance) holds "
                             f"negative values (min {float(value.min()):g}); variances are >= 0")
        flat[path] = np.ascontiguousarray(value)
    return model, _unflatten(flat)


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


__all__ = ["from_torch", "read_state_dict"]
