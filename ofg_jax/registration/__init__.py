"""Registering scans: files and geometry, a trained network or optimisation
alone, the outputs and their scores.

- scans of any geometry: :mod:`~ofg_jax.registration.scans`
  (:func:`register_volumes`, here too), :mod:`~ofg_jax.registration.geometry`,
  :mod:`~ofg_jax.registration.transforms`, :mod:`~ofg_jax.registration.affine`;
- two images on one grid: :mod:`~ofg_jax.registration.arrays` (a network or
  optimisation alone, compiled ahead of time and timed by
  :mod:`~ofg_jax.registration.compile_time`), the network path
  :mod:`~ofg_jax.registration.network`;
- files and pairs: :mod:`~ofg_jax.registration.pairs`; scores:
  :mod:`~ofg_jax.training.scoring`; drawings:
  :mod:`~ofg_jax.registration.figures`.

The names of :mod:`~ofg_jax.registration.scans` are imported on first use
(PEP 562), so that ``import ofg_jax.registration.pairs`` imports no JAX.
"""

from ofg_jax import _lazy

_SOURCES = {"register_volumes": "scans", "working_grid": "scans", "foreground": "scans",
            "write_run_figures": "scans", "FOREGROUND_FRACTION": "scans"}

__all__ = sorted(_SOURCES)


__getattr__, __dir__ = _lazy.attach(__name__, _SOURCES, __all__)
