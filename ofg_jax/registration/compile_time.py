"""Compilation timed apart from computation, from JAX's monitoring events.

:func:`compile_ahead` compiles a jitted function for given arguments and says
whether the program was compiled or loaded from the persistent compilation
cache; :func:`compile_clock` measures, around any block of code, the seconds
spent compiling programs (or loading them from the cache) and the wall seconds.
"""

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator

import jax

CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"
# XLA compilation (or loading the program from the persistent cache), and
# lowering to StableHLO: the part of a first call that a compiled program skips.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


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
    wall seconds include tracing)."""
    with compile_clock() as clock:
        program = jitted.lower(*args, **static).compile()
    return program, clock
