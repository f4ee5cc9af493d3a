"""The BN constants of removed channels, carried into a compact bundled model.

SFP's official final model zeroes a removed channel's filter only, so the channel still emits
its BN constant. `carry_constants` computes, on the dense model, what those constants
contribute downstream (a bias map at each consumer conv, a constant at each reindexed add
operand) and stores it in the compact model's ``'carry'`` collection
(`jaxprune.models.common.carried`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models.common import CARRY, CARRY_SITES


def _probes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two different inputs: what removed channels emit must not depend on the input."""
    return x, 1.0 - 0.5 * x


def _consumer_inputs(model: Any, variables: Any, x: jax.Array, paths: set[str]) -> dict:
    """Module path -> (standalone clone, its input) of every conv/dense in ``paths``."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
            path = "/".join(mod.path)
            if path in paths:
                seen[path] = (mod.clone(parent=None), args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, x)
    return seen


def _check_constant(name: str, values: Sequence[jax.Array]) -> np.ndarray:
    """The first example of ``values[0]``, after checking that every example of every probe's
    value is the same (a removed channel's output is a constant of the weights)."""
    first = np.asarray(values[0][0], np.float32)
    scale = max(1.0, float(np.max(np.abs(first)))) if first.size else 1.0
    for v in values:
        if not np.allclose(np.asarray(v, np.float32), first[None], rtol=0, atol=1e-5 * scale):
            raise ValueError(f"keep_constants: what the removed channels feed into {name!r} depends "
                             "on the input, so it cannot be carried as a constant")
    return first


def carry_constants(model: Any, ref_vars: Any, small: Any, small_vars: Any,
                    keep_in: Mapping[str, tuple[int, ...]], keep_out: Mapping[str, tuple[int, ...]],
                    x: jax.Array) -> Any:
    """``small_vars`` with a ``'carry'`` collection that makes the compact model ``small``
    compute what the dense ``model`` computes with ``ref_vars`` (filters-only masked: removed
    channels emit constants). Two kinds of constants are carried:

    - at a conv/dense whose input lost channels: what the lost (constant) input channels added
      to its kept outputs: ``conv(x * removed) - conv(0)``, a map over the output positions (so
      zero padding at the borders is exact);
    - at a reindexed add operand (`jaxprune.models.common.carried_reindex`): the dense model's
      values at the positions the compact operand lacks.

    Raises ValueError when the compact model, with them, differs from the dense one on ``x``.
    """
    # the constants are weights: computed (and checked) in float32 whatever the compute dtype,
    # else a bfloat16 model would carry bf16-rounded constants (~1e-2 off)
    model, small = _float32(model), _float32(small)
    carry: dict[tuple[str, ...], np.ndarray] = {}
    probes = _probes(x)
    seen = [_consumer_inputs(model, ref_vars, p, set(keep_in)) for p in probes]
    params = flax.traverse_util.flatten_dict(flax.core.unfreeze(ref_vars["params"]), sep="/")
    for path, kept in keep_in.items():
        if path not in seen[0]:
            continue
        mod, x_in = seen[0][path]
        removed = np.ones(x_in.shape[-1], np.float32)
        removed[np.asarray(kept, np.int64)] = 0.0
        if not removed.any():
            continue
        p = {k[len(path) + 1:]: v for k, v in params.items() if k.startswith(path + "/")}
        p = flax.traverse_util.unflatten_dict(p, sep="/")
        contrib = [mod.apply({"params": p}, s[path][1] * removed) - mod.apply({"params": p}, 0 * s[path][1])
                   for s in seen]
        value = _check_constant(path, contrib)
        value = value[..., np.asarray(keep_out.get(path, range(value.shape[-1])), np.int64)]
        if np.any(value):
            carry[tuple(path.split("/")[:-1]) + (path.split("/")[-1] + "_const",)] = value
    with_convs = _with_carry(small_vars, carry)
    dense_sites = [model.apply(ref_vars, p, mutable=[CARRY_SITES])[1].get(CARRY_SITES, {})
                   for p in probes]
    small_sites = small.apply(with_convs, x, mutable=[CARRY_SITES])[1].get(CARRY_SITES, {})
    dense_flat = [flax.traverse_util.flatten_dict(flax.core.unfreeze(d)) for d in dense_sites]
    for key, ((_, dst, present),) in flax.traverse_util.flatten_dict(flax.core.unfreeze(small_sites)).items():
        missing = 1.0 - np.asarray(present)
        if not missing.any():
            continue
        vals = [np.asarray(d[key][0][0])[..., np.asarray(dst)] * missing for d in dense_flat]
        value = _check_constant("/".join(key), vals)
        if np.any(value):
            carry[key[:-1] + (key[-1] + "_const",)] = value
    out = _with_carry(small_vars, carry)
    ref = model.apply(ref_vars, probes[1])
    got = np.asarray(small.apply(out, probes[1]), np.float32)
    # a missing hook costs O(1); bf16 compute rounds at ~1e-2
    tol = max(1e-4, 16 * float(jnp.finfo(ref.dtype).eps))
    ref = np.asarray(ref, np.float32)
    err = float(np.max(np.abs(ref - got)))
    if err > tol * max(1.0, float(np.max(np.abs(ref)))):
        raise ValueError(f"keep_constants: the compact {type(small).__name__} differs from the "
                         f"masked model by up to {err:.3g}: the model has no `carried` hook where "
                         "a removed channel's constant flows (see jaxprune.models.common.carried)")
    return out


def _float32(model: Any) -> Any:
    """``model`` computing in float32 (a bundled model with another ``dtype`` is cloned)."""
    dtype = getattr(model, "dtype", None)
    return model if dtype is None or jnp.dtype(dtype) == jnp.float32 else model.clone(dtype=jnp.float32)


def _with_carry(variables: Any, carry: Mapping[tuple[str, ...], np.ndarray]) -> Any:
    """``variables`` with ``carry`` (path tuple -> array) as its ``'carry'`` collection."""
    out = {k: v for k, v in dict(variables).items() if k != CARRY}
    if carry:
        out[CARRY] = flax.traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32)
                                                        for k, v in carry.items()})
    return out
