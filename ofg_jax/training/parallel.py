"""Data-parallel training over every device of every host, with ``jax.sharding``.

The global batch (``train.batch_size``) is split along its first axis over a 1D
mesh of all devices (axis ``"data"``); the train state is replicated. The jitted
train step needs no change: XLA partitions it from the shardings of its inputs
and inserts the all-reduce of the gradients (the batch mean of the loss). On
several hosts, each process loads only its own slice of the global batch.
"""

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh() -> Mesh:
    """A 1D mesh over ``jax.devices()`` (all hosts), axis ``"data"``."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def progress_disabled() -> Optional[bool]:
    """tqdm's ``disable`` of this process: only the first one draws progress bars
    (None: tqdm's own choice, off where stderr is no terminal)."""
    return None if jax.process_index() == 0 else True


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises ``ValueError`` unless the global batch splits evenly over devices and hosts."""
    devices, hosts = mesh.devices.size, jax.process_count()
    if batch_size % devices:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the {devices} devices "
            f"({jax.devices()[0].platform}) it is split over; use a multiple of "
            f"{devices}")
    if batch_size % hosts:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the "
                         f"{hosts} processes")


def local_slice(batch_size: int) -> slice:
    """The items of a global batch that this process loads."""
    per_host = batch_size // jax.process_count()
    start = jax.process_index() * per_host
    return slice(start, start + per_host)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array replicated on every device of ``mesh``.

    On several processes every process must pass the same values (a state
    initialised from the same seed): each one fills its own devices from its
    host copy, so nothing is sent between processes. (``jax.device_put`` of an
    array that is already on a device would go through JAX's cross-host
    transfer, whose results orbax cannot save on CPU processes.)
    """
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """The global batch from each process's slice, sharded along axis 0 over ``mesh``.

    Args:
      local_batch: a tree of host arrays ``(B / processes, ...)``: this process's
        items of the global batch, in order.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch)
