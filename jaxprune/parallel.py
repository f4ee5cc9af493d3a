"""Devices: the data-parallel mesh, batch sharding, replication, multi-host start-up.

Data parallelism uses `jax.sharding`, not ``pmap``: a 1-D mesh named ``'data'`` over all devices,
the batch sharded on its leading axis, the state replicated; XLA inserts the gradient
all-reduce, and BatchNorm's batch statistics are computed over the GLOBAL batch (the
cross-device mean is part of the sharded computation), so an N-device step computes what the
1-device step computes on the same batch, up to float summation order.

Multi-host: call `maybe_initialize_distributed` first. Every process then runs the same program;
`shard_batch` builds a global batch from each process's rows
(``jax.make_array_from_process_local_data``), `replicate` / `put_replicated` place arrays that
every process holds in full (the data sets, the state).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


DATA_AXIS = "data"

def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize`` when the environment describes a multi-host run.

    Reads ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; all three or none must be set. Returns True if it initialised (or
    JAX already was), False for a single-process run. Call it before anything touches a
    device. Each process then feeds its own slice of every global batch (see module docstring).
    """
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = {n: os.environ[n] for n in names if os.environ.get(n)}
    if not present:
        return False
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"multi-host run needs all of {names}; missing {missing}")
    if jax.distributed.is_initialized():
        return True
    try:
        num, pid = int(present["JAX_NUM_PROCESSES"]), int(present["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                         f"{present['JAX_NUM_PROCESSES']!r}, {present['JAX_PROCESS_ID']!r}") from None
    if not 0 <= pid < num:
        raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num})")
    jax.distributed.initialize(coordinator_address=present["JAX_COORDINATOR_ADDRESS"],
                               num_processes=num, process_id=pid)
    return True

def device_label() -> str:
    """The devices this process computes on, as run records name them:
    ``'<platform>:<device kind> x<global device count>'`` (e.g. ``'gpu:NVIDIA H200 x1'``)."""
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices, all hosts)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (DATA_AXIS,))

def check_batch(mesh: Mesh, local_batch: int) -> None:
    """Raises ValueError unless ``local_batch`` splits evenly over this process's devices."""
    n_local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    if local_batch % max(n_local, 1):
        if jax.process_count() == 1:
            raise ValueError(f"batch size {local_batch} is not divisible by the {mesh.size} devices "
                             "of the mesh; use a multiple of the device count")
        raise ValueError(f"process-local batch size {local_batch} is not divisible by this "
                         f"process's {n_local} devices of the mesh")

def shard_batch(mesh: Mesh, images: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
    """Places a batch on the mesh, split along its leading axis (``P('data')``).

    ``images``/``labels`` are this process's rows of the global batch (the whole batch in a
    single-process run); the global array is assembled with
    ``jax.make_array_from_process_local_data``. Raises ValueError if the batch does not split
    evenly over the devices.
    """
    check_batch(mesh, int(np.shape(images)[0]))
    if np.shape(labels)[0] != np.shape(images)[0]:
        raise ValueError(f"images and labels disagree on the batch size: {np.shape(images)[0]} "
                         f"vs {np.shape(labels)[0]}")
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    if jax.process_count() == 1:
        return jax.device_put((images, labels), sharding)
    return (jax.make_array_from_process_local_data(sharding, np.asarray(images)),
            jax.make_array_from_process_local_data(sharding, np.asarray(labels)))

def replicate(mesh: Mesh, tree: Any) -> Any:
    """Puts every leaf of ``tree`` fully replicated on the mesh (``P()``)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)

def process_rows(global_batch: int) -> slice:
    """This process's rows of a global batch (devices are ordered by process in the mesh)."""
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {n} processes")
    local = global_batch // n
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)

def put_replicated(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
    """Host arrays placed once on every device of ``mesh`` (explicit transfers; every process
    passes the same full arrays)."""
    return tuple(replicate(mesh, np.asarray(a)) for a in arrays)


__all__ = [
    "DATA_AXIS",
    "maybe_initialize_distributed",
    "make_mesh",
    "shard_batch",
    "replicate",
    "put_replicated",
]
