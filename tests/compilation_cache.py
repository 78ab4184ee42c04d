"""A persistent XLA compilation cache for test modules that train many tiny runs."""

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache as cc


@contextlib.contextmanager
def persistent_compilation_cache(directory: str):
    """Caches every compilation (even quick ones) in ``directory`` while active.

    Each ``train_and_evaluate`` builds its functions afresh; with the cache only
    the first run of a kind compiles them. The previous settings are restored.
    """
    settings = {"jax_compilation_cache_dir": directory,
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    cc.reset_cache()
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        cc.reset_cache()
