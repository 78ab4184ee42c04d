"""The inner optimiser of a training run, as ``config.ofg`` describes it.

Every place that refines a prediction with the run's settings (the train step,
test-time refinement in ``register`` and ``evaluate``, the experiments) builds
its refiner here: :class:`RefineSettings` holds the settings, :func:`make_refiner`
turns them into one function. To try another inner optimiser, change this file
(or pass an ``optax.GradientTransformation`` to :func:`ofg_jax.refine`).
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ofg_jax import models
from ofg_jax.refine import OPTIMIZERS
from ofg_jax.refine import SIMILARITIES
from ofg_jax.refine import refine
from ofg_jax.refine import refine_with_network

DESIGNS = ("instance", "network")

# refiner(moving, fixed, disp, learning_rate) -> refined disp; unbatched (*S) images.
Refiner = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """The settings of OFG's inner optimiser (``config.ofg``); defaults: the reference.

    Attributes:
      steps: optimiser updates per pair.
      learning_rate: the learning rate at epoch 0 (training decays it like the
        model's).
      reg_weight: Grad weight of the inner energy.
      similarity: data term of the inner energy, "ncc" or "mse".
      optimizer: "amsgrad" (PyTorch semantics), "adam" or "sgd".
      downsample: 2 = optimise a half-resolution field.
      design: "instance" (the field itself) or "network" (the weights of a
        cascaded VoxelMorph of width ``network_width``, fresh for every pair).
      network_width: channels of the "network" design's VoxelMorph (32 = the
        reference's).
    """
    steps: int = 10
    learning_rate: float = 0.1
    reg_weight: float = 1.0
    similarity: str = "ncc"
    optimizer: str = "amsgrad"
    downsample: int = 1
    design: str = "instance"
    network_width: int = 32

    @classmethod
    def from_config(cls, ofg_config: Any) -> "RefineSettings":
        """From ``config.ofg``; keys that older configs lack take the defaults."""
        return cls(**{field.name: ofg_config[field.name]
                      for field in dataclasses.fields(cls) if field.name in ofg_config})

    def at_test_time(self, steps: int) -> "RefineSettings":
        """These settings with ``steps`` steps, for refining a trained network's
        prediction (test-time OFG).

        Raises:
          ValueError: ``steps < 0``, or ``steps > 0`` for a run whose inner
            optimiser trains network weights (``design="network"``).
        """
        if steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {steps}")
        if steps and self.design != "instance":
            raise ValueError(
                "test-time refinement optimises the field itself; this run was "
                f"trained with ofg.design={self.design!r}, whose ofg.learning_rate "
                "is meant for network weights")
        return dataclasses.replace(self, steps=int(steps))

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first invalid ``ofg.*`` setting."""

        def check(ok, key, expected):
            if not ok:
                raise ValueError(f"invalid config: ofg.{key}={getattr(self, key)!r}; "
                                 f"expected {expected}")

        check(self.similarity in SIMILARITIES, "similarity", f"one of {SIMILARITIES}")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        check(isinstance(self.steps, int) and self.steps >= 0, "steps",
              "an integer >= 0")
        check(isinstance(self.downsample, int) and self.downsample >= 1, "downsample",
              "an integer >= 1")
        # NaN passes (NaN < 0 is False): the run then stops at the first non-finite
        # update, with the same message as any other divergence.
        for key in ("learning_rate", "reg_weight"):
            check(not getattr(self, key) < 0, key, "a number >= 0")
        check(self.design in DESIGNS, "design", f"one of {DESIGNS}")
        check(self.design == "instance" or self.downsample == 1, "downsample",
              "1 with ofg.design='network'")
        check(isinstance(self.network_width, int) and self.network_width >= 1,
              "network_width", "an integer >= 1")


def make_refiner(settings: RefineSettings, img_size: Sequence[int], *, seed: int = 0,
                 conv_impl: str = "auto") -> Refiner:
    """The inner optimiser of ``settings`` as ``refiner(moving, fixed, disp, lr)``.

    Unbatched (``jax.vmap`` it with ``in_axes=(0, 0, 0, None)``); ``lr`` may be
    traced. The "network" design's VoxelMorph is built and initialised here,
    once (parameters from ``PRNGKey(seed + 1)``, the same for every pair), so
    the refiner's constants exist before any tracing.

    Args:
      settings: the inner optimiser's settings.
      img_size: ``(D, H, W)`` of the images it will refine.
      seed: the run's seed.
      conv_impl: convolution implementation of the "network" design's VoxelMorph.
    """
    options = dict(steps=settings.steps, reg_weight=settings.reg_weight,
                   similarity=settings.similarity, optimizer=settings.optimizer)
    if settings.design == "instance":
        return lambda moving, fixed, disp, lr: refine(
            moving, fixed, disp, learning_rate=lr, downsample=settings.downsample,
            **options)
    if settings.design != "network":
        raise ValueError(f"ofg.design must be one of {DESIGNS}, got {settings.design!r}")
    network, params = cascade_network(settings.network_width, img_size, seed,
                                       conv_impl)
    return lambda moving, fixed, disp, lr: refine_with_network(
        moving, fixed, disp, network, params, learning_rate=lr, **options)


def cascade_network(width: int, img_size: Sequence[int], seed: int, conv_impl: str):
    """The residual VoxelMorph of the "network" design and its initial params.

    Channels ``w/2, w, w, w`` (encoder), ``w`` x4 (decoder), ``w, w/2, w/2`` (full
    resolution) for ``w = width`` (32: the reference VoxelMorph).
    """
    half = max(width // 2, 1)
    network = models.create("voxelmorph", img_size, enc_features=(half,) + (width,) * 3,
                            dec_features=(width,) * 4, final_features=(width, half, half),
                            conv_impl=conv_impl)
    with jax.threefry_partitionable(False):
        variables = jax.jit(network.init)(jax.random.PRNGKey(seed + 1),
                                          jnp.zeros((1, *img_size, 2), jnp.float32))
    return network, variables["params"]
