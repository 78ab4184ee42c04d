"""compile_ahead's executable cache: a later call loads the compiled executable
without tracing, keyed so that another call, or another package source, misses."""

import functools
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofg_jax.registration import compile_time

REPO = pathlib.Path(__file__).resolve().parents[2]

TRACES = []  # The static argument of each tracing of _program.


@functools.partial(jax.jit, static_argnames=("power",))
def _program(x, y, power):
    TRACES.append(power)  # Python runs when JAX traces, not when the program runs.
    return jnp.sum(jnp.sin(x) ** power) + y


@pytest.fixture
def persistent_cache(tmp_path):
    """JAX's persistent cache, on or off, in a fresh folder for the test only;
    yields the setter and the executable cache's folder."""
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
    previous = {name: getattr(jax.config, name) for name in names}

    def use(enabled):
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        return tmp_path / compile_time.EXECUTABLES

    yield use
    for name, value in previous.items():
        jax.config.update(name, value)


def test_the_executable_is_kept_and_loaded_untraced(persistent_cache):
    cache = persistent_cache(True)
    x = np.random.default_rng(0).random((5, 7), np.float32)
    program, clock = compile_time.compile_ahead(_program, x, 2.0, power=3)
    assert "compiled" in clock.how_compiled() and len(os.listdir(cache)) == 1
    TRACES.clear()
    loaded, hit = compile_time.compile_ahead(_program, x, 2.0, power=3)
    assert TRACES == [] and hit.how_compiled().endswith("(the executable, untraced)")
    np.testing.assert_array_equal(loaded(x, 1.5), program(x, 1.5))
    np.testing.assert_allclose(loaded(x, 1.5), np.sum(np.sin(x) ** 3) + 1.5, rtol=1e-5)
    # Another static argument, another shape: other entries, traced.
    compile_time.compile_ahead(_program, x, 2.0, power=2)
    compile_time.compile_ahead(_program, x[:3], 2.0, power=3)
    assert TRACES == [2, 3] and len(os.listdir(cache)) == 3


def test_an_edited_package_or_a_damaged_file_compiles_again(persistent_cache,
                                                            monkeypatch):
    cache = persistent_cache(True)
    x = np.ones((4,), np.float32)
    compile_time.compile_ahead(_program, x, 0.0, power=1)
    (entry,) = os.listdir(cache)
    with monkeypatch.context() as patch:
        patch.setattr(compile_time, "_source_digest", lambda: "edited")
        _, clock = compile_time.compile_ahead(_program, x, 0.0, power=1)
    assert "untraced" not in clock.how_compiled() and len(os.listdir(cache)) == 2
    (cache / entry).write_bytes(b"not a pickle")
    program, clock = compile_time.compile_ahead(_program, x, 0.0, power=1)
    assert "untraced" not in clock.how_compiled()
    assert float(program(x, 0.0)) == pytest.approx(4 * np.sin(1.0), rel=1e-6)


# One process of a later run: compile_ahead of a small program with JAX's
# persistent cache in sys.argv[1]; prints how it was compiled, and its value.
PROCESS = """
import functools, sys
import jax, jax.numpy as jnp, numpy as np
from ofg_jax.registration import compile_time
for name, value in (("jax_enable_compilation_cache", True),
                    ("jax_compilation_cache_dir", sys.argv[1]),
                    ("jax_persistent_cache_min_compile_time_secs", 0.0),
                    ("jax_persistent_cache_min_entry_size_bytes", 0)):
    jax.config.update(name, value)
program = jax.jit(lambda x: jnp.sum(jnp.where(x > 0.5, jnp.sin(x) ** 3, x)))
x = np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7)
compiled, clock = compile_time.compile_ahead(program, x)
print(clock.how_compiled(), float(compiled(x)), sep="|")
"""


def test_an_executable_of_jax_s_own_cache_is_compiled_afresh_to_be_kept(tmp_path):
    """Processes in turn. When JAX's cache holds the program but the executable
    cache does not (a package upgraded, the folder deleted), the process that
    finds it so compiles it afresh: what it keeps loads and runs in the next
    (an executable JAX had loaded from its cache, kept as it was, failed there:
    "Function ... not found")."""
    x = np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7)
    want = float(np.sum(np.where(x > 0.5, np.sin(x) ** 3, x)))

    def process():
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", PROCESS, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        how, value = proc.stdout.strip().splitlines()[-1].split("|")
        assert float(value) == pytest.approx(want, rel=1e-6)
        return how

    assert process().startswith("compiled")
    assert process().endswith("(the executable, untraced)")
    shutil.rmtree(tmp_path / compile_time.EXECUTABLES)
    assert process() == "partly loaded from the persistent compilation cache"
    assert process().endswith("(the executable, untraced)")


def test_without_the_persistent_cache_nothing_is_kept(persistent_cache):
    cache = persistent_cache(False)
    compile_time.compile_ahead(_program, np.ones(3, np.float32), 0.0, power=1)
    assert not cache.exists()
