"""The training input pipeline: an epoch's batches, checked, loaded ahead of the step.

Batches follow the dataset's plan of the epoch (a pure function of the seed and
the epoch, so a resumed run replays it); a background thread loads them and
copies them to the device while the current step runs.
"""

import queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from ofg_jax.data import RegistrationData
from ofg_jax.data import TrainItem


def check_pair(moving: np.ndarray, fixed: np.ndarray, img_size: Sequence[int],
               where: str) -> None:
    """Raises ``ValueError`` unless both images have shape ``img_size`` and are finite."""
    img_size = tuple(img_size)
    if moving.shape != fixed.shape:
        raise ValueError(f"{where}: moving image of shape {moving.shape} and fixed "
                         f"image of shape {fixed.shape} differ in shape")
    if moving.shape != img_size:
        raise ValueError(f"{where}: images of shape {moving.shape}, but the dataset's "
                         f"img_size is {img_size}")
    for name, image in (("moving", moving), ("fixed", fixed)):
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{where}: the {name} image has non-finite intensities "
                             f"({int(np.sum(~np.isfinite(image)))} voxels)")


def epoch_batches(data: RegistrationData, epoch: int, start: int,
                  steps_per_epoch: int, batch_size: int, local: slice = slice(None),
                  targets: Optional[Callable[[TrainItem], np.ndarray]] = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of ``epoch`` from step ``start`` on (to resume mid-epoch).

    Items past ``steps_per_epoch * batch_size`` (an incomplete last batch) are
    dropped so that every batch has the same shape. Only the items ``local`` of
    each global batch are loaded (this process's share on several hosts). With
    ``targets``, each batch also holds ``"target"``: ``targets(item)`` stacked,
    fixed pseudo labels for the train step.
    """
    plan = data.train_plan(epoch)
    if len(plan) < steps_per_epoch * batch_size:
        raise ValueError(
            f"train_plan({epoch}) has {len(plan)} items, fewer than the "
            f"{steps_per_epoch * batch_size} of epoch 0")
    for step in range(start, steps_per_epoch):
        items = plan[step * batch_size:(step + 1) * batch_size][local]
        moving, fixed = [], []
        for item in items:
            pair = data.load_train(item)
            m, f = np.asarray(pair["moving"]), np.asarray(pair["fixed"])
            check_pair(m, f, data.img_size, f"training item {item!r} of epoch {epoch}")
            moving.append(m.astype(np.float32))
            fixed.append(f.astype(np.float32))
        batch = {"moving": np.stack(moving), "fixed": np.stack(fixed)}
        if targets is not None:
            batch["target"] = np.stack([targets(item) for item in items])
        yield batch


class Prefetcher:
    """Loads batches on a background thread and copies them to the device ahead.

    Iterating yields device arrays (``put(batch)``, by default ``jax.device_put``)
    while up to ``size`` further batches are being loaded; an exception raised by
    the loader is re-raised by the iterator.
    """

    _DONE = object()

    def __init__(self, batches: Iterator[Any], size: int = 2,
                 put: Callable[[Any], Any] = jax.device_put):
        self._put_on_device = put
        self._queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches,),
                                        daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _fill(self, batches):
        try:
            for batch in batches:
                if not self._put(self._put_on_device(batch)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # pylint: disable=broad-except
            self._put(e)

    def __iter__(self):
        while True:
            value = self._queue.get()
            if value is self._DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield value

    def close(self) -> None:
        """Stops the loader thread (it may be waiting to hand over a batch)."""
        self._stop.set()
        self._thread.join()
