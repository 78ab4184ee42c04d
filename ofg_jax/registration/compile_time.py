"""Compilation timed apart from computation, from JAX's monitoring events.

:func:`compile_ahead` compiles a jitted function for given arguments and says
whether the program was compiled or loaded from the persistent compilation
cache; :func:`compile_clock` measures, around any block of code, the seconds
spent compiling programs (or loading them from the cache) and the wall seconds.

JAX's persistent cache is looked up only after a program is traced and lowered
again, which takes about a second for the optimiser of registration with no
network. So where that cache is on, :func:`compile_ahead` also keeps the
compiled executable itself in its ``executables/`` folder, keyed on the
function, its static arguments, the arguments' shapes and dtypes, the JAX
version, the device, ``XLA_FLAGS`` and this package's source, and a later
process loads it without tracing. Only an executable that XLA compiled in this
process is kept (one that JAX loaded from its cache does not load again once
serialised).
"""

import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
import time
from typing import Any, Callable, Iterator, Optional

import jax
from jax.experimental import serialize_executable
import numpy as np

CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"
# XLA compilation (or loading the program from the persistent cache), and
# lowering to StableHLO: the part of a first call that a compiled program skips.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
# A program of compile_ahead loaded from the executable cache (no tracing).
EXECUTABLE_HIT_EVENT = "ofg_jax/executable_cache_hit"
EXECUTABLES = "executables"  # The executable cache's folder in JAX's cache.
# Compiler options that change nothing but JAX's cache key (the default value).
_FRESH_COMPILE = {"xla_embed_ir_in_executable": False}


@dataclasses.dataclass
class Clock:
    """Seconds measured by :func:`compile_clock`, filled in when its block ends.

    Attributes:
      compile_seconds: lowering and XLA compilation (or loading from the cache).
      wall_seconds: the whole block.
      events: JAX's monitoring events seen in the block.
    """
    compile_seconds: float = 0.0
    wall_seconds: float = 0.0
    events: list = dataclasses.field(default_factory=list)

    @property
    def compute_seconds(self) -> float:
        """The block's wall seconds less its compilation."""
        return self.wall_seconds - self.compile_seconds

    def how_compiled(self) -> str:
        """Whether the block's programs were compiled or loaded from the cache."""
        if EXECUTABLE_HIT_EVENT in self.events:
            return "loaded from the persistent compilation cache (the executable, untraced)"
        if CACHE_HIT_EVENT in self.events:
            if CACHE_MISS_EVENT in self.events:
                return "partly loaded from the persistent compilation cache"
            return "loaded from the persistent compilation cache"
        if CACHE_MISS_EVENT in self.events:
            return "compiled (not in the persistent compilation cache yet)"
        if BACKEND_COMPILE_EVENT in self.events:
            return "compiled (persistent compilation cache off)"
        return "compiled earlier in this process"


@contextlib.contextmanager
def compile_clock() -> Iterator[Clock]:
    """Yields a :class:`Clock` of the block (compilation in any thread counts)."""
    clock = Clock()

    def on_event(event: str, **_) -> None:
        clock.events.append(event)

    def on_duration(event: str, seconds: float, **_) -> None:
        clock.events.append(event)
        if event in (BACKEND_COMPILE_EVENT, LOWERING_EVENT):
            clock.compile_seconds += seconds

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    start = time.perf_counter()
    try:
        yield clock
    finally:
        clock.wall_seconds = time.perf_counter() - start
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_duration)


def compile_ahead(jitted: Callable, *args, **static) -> tuple[Any, Clock]:
    """``jitted.lower(*args, **static).compile()`` and its :class:`Clock` (whose
    wall seconds include tracing), or the same executable loaded from the
    executable cache where JAX's persistent cache is on (module docstring)."""
    path = _executable_path(jitted, args, static)
    if path is not None:
        start = time.perf_counter()
        program = _load_executable(path)
        if program is not None:
            seconds = time.perf_counter() - start
            return program, Clock(compile_seconds=seconds, wall_seconds=seconds,
                                  events=[EXECUTABLE_HIT_EVENT])
    with compile_clock() as clock:
        lowered = jitted.lower(*args, **static)
        program = lowered.compile()
    if path is None:
        return program, clock
    if not _compiled_afresh(clock):
        # JAX loaded the program from its own cache (or this process compiled it
        # before). XLA:CPU cannot serialise such an executable again: loaded
        # from the file it misses its functions. So it is compiled afresh, once,
        # under another cache key (an option at its default value) to be kept.
        with compile_clock() as fresh:
            fresh_program = lowered.compile(_FRESH_COMPILE)
        clock = Clock(clock.compile_seconds + fresh.compile_seconds,
                      clock.wall_seconds + fresh.wall_seconds, clock.events + fresh.events)
        if not _compiled_afresh(fresh):
            return program, clock
        program = fresh_program
    _save_executable(program, path)
    return program, clock


def _compiled_afresh(clock: Clock) -> bool:
    """Whether XLA compiled the block's program (not loaded, not reused)."""
    return BACKEND_COMPILE_EVENT in clock.events and CACHE_HIT_EVENT not in clock.events


def _executable_path(jitted: Callable, args, static) -> Optional[str]:
    """Where the executable of this call is kept, or None (the cache is off)."""
    folder = jax.config.jax_compilation_cache_dir
    if not (jax.config.jax_enable_compilation_cache and folder):
        return None
    function = getattr(jitted, "__wrapped__", jitted)
    device = jax.devices()[0]
    key = repr((
        f"{function.__module__}.{function.__qualname__}", sorted(static.items()),
        [None if a is None else (np.shape(a), _dtype_name(a), isinstance(a, (bool, int, float)))
         for a in args],
        jax.__version__, device.platform, device.device_kind, jax.device_count(),
        os.environ.get("XLA_FLAGS", ""), jax.config.jax_enable_x64, _source_digest()))
    return os.path.join(folder, EXECUTABLES,
                        hashlib.sha256(key.encode()).hexdigest() + ".pkl")


def _dtype_name(value) -> str:
    return str(value.dtype if hasattr(value, "dtype") else np.result_type(value))


@functools.cache
def _source_digest() -> str:
    """SHA-256 of this package's source files: an edited package misses the cache."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, folders, names in os.walk(package):
        folders.sort()
        for name in sorted(names):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()


def _load_executable(path: str) -> Optional[Any]:
    """The executable kept at ``path``, or None (missing or unreadable: it is
    compiled again and written over)."""
    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception:  # pylint: disable=broad-except  # Whatever the file holds.
        return None


def _save_executable(program: Any, path: str) -> None:
    """Writes ``program`` to ``path`` atomically; a cache that cannot be written
    is skipped."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as f:
            pickle.dump(serialize_executable.serialize(program), f)
        os.replace(temporary, path)
    except (OSError, pickle.PicklingError, TypeError, ValueError, RuntimeError):
        pass
