"""Measuring speed: interleaved timing, peak memory, the machine, a compiled step.

Shared by the benchmarks (``experiments.benchmark``, ``experiments.bench_models``,
``experiments.profile_refine``) and the step-time tables of the experiments.
"""

import ctypes
import ctypes.util
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np


def parse_shape(text: str) -> tuple[int, ...]:
    """``"D,H,W"`` -> ``(D, H, W)``; raises ``ValueError`` on anything else."""
    try:
        shape = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise ValueError(f"--shape must be three integers like 64,64,64, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--shape must be three positive integers, got {text!r}")
    return shape


def synthetic_batch(shape: Sequence[int], batch: int, seed: int = 0):
    """Smooth random ``(B, *shape)`` float32 moving and fixed images in [0, 1]."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)

    def image():
        x = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
        return (x - x.min()) / max(float(np.ptp(x)), 1e-6)

    moving = np.stack([image() for _ in range(batch)]).astype(np.float32)
    fixed = np.stack([image() for _ in range(batch)]).astype(np.float32)
    return moving, fixed


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int,
                        warmup: int, on_timed_start: Optional[Callable[[], object]] = None
                        ) -> tuple[dict, dict, dict]:
    """Median wall time of each ``fn()``, the functions called in turn.

    ``warmup`` untimed rounds, then ``repeats`` timed rounds; each round calls
    every function once, in order, so that a slow spell of a shared machine falls
    on all of them alike and their ratios stay meaningful. ``fn`` must return only
    when its work is done (block on device outputs).

    ``on_timed_start()``, if given, is called once between the warm-up and the
    timed rounds (e.g. :func:`reset_peak_rss`).

    Returns ``(medians, all timings, first-call times)``; with ``warmup=0`` the
    first calls are also the first timed ones.
    """
    times = {key: [] for key in fns}
    first = {}
    for round_ in range(warmup + repeats):
        if round_ == warmup and on_timed_start is not None:
            on_timed_start()
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            first.setdefault(key, elapsed)
            if round_ >= warmup:
                times[key].append(elapsed)
    medians = {key: statistics.median(t) for key, t in times.items()}
    return medians, times, first


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB.

    Since the last :func:`reset_peak_rss` where that worked (Linux ``VmHWM``),
    else since the process started (``getrusage``; Linux reports KiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Sets this process's peak RSS to its current RSS; False where that is unsupported.

    Linux: writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM``, so that
    :func:`peak_rss_mb` measures what follows (the timed calls) and not what came
    before (imports, compilation, building the inputs). Heap memory freed before
    is first given back to the OS (glibc's ``malloc_trim``, as ofg_jax's training
    loop does after compiling), in every framework alike.
    """
    # Not ofg_jax.training.host_memory: importing ofg_jax would load JAX into the
    # PyTorch processes and count it in their peaks.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_description() -> str:
    """``"<CPU model> (<n> cores)"`` from /proc/cpuinfo where available."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_description() -> str:
    """JAX's first device: ``"cpu: <model> (<n> cores)"`` or ``"gpu: <kind>"``."""
    import jax
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"cpu: {cpu_description()}"
    return f"{device.platform}: {device.device_kind}"


class CompiledStep:
    """One training step of a config on one batch, compiled ahead of time.

    The train state is that of ``ofg_jax.training.step.create_train_state``; a very
    long epoch keeps both learning rates at their epoch-0 values. Each call runs
    one step (the state is carried from call to call) and blocks on its result.

    Attributes:
      model: the network.
      state: the current train state.
      compile_seconds: ``create_train_state`` (almost all of it the compilation
        of the initialiser) plus the ahead-of-time compilation of the step.
    """

    def __init__(self, config: Any, img_size: Sequence[int], batch: dict[str, Any]):
        from ofg_jax.settings import config as config_lib
        from ofg_jax.training.step import create_train_state, make_train_step

        steps_per_epoch = 10 ** 6
        start = time.perf_counter()
        self.model = config_lib.build_model(config, img_size)
        self.state = create_train_state(config, self.model, img_size, steps_per_epoch)
        self._compiled = make_train_step(config_lib.resolve(config), steps_per_epoch,
                                         img_size).lower(self.state, batch).compile()
        self.compile_seconds = time.perf_counter() - start
        self._batch = batch

    def __call__(self) -> None:
        import jax
        self.state, metrics = self._compiled(self.state, self._batch)
        jax.block_until_ready((self.state.params, metrics))
