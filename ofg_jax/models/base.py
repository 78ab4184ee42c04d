"""What every registration network shares: its grid, output options and flow head.

A network subclasses :class:`RegistrationNetwork`, declares its architecture as
further attributes (each with the published value as default), implements
``check_size`` and ends its ``__call__`` with :meth:`RegistrationNetwork.flow`.
Registering it in ``ofg_jax.models.NETWORKS`` makes it available to the configs.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ofg_jax.models.integrate import VELOCITY
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.models.layers import Conv3D, flow_head_init
from ofg_jax.models.resample import upsample_linear2


def check_img_size(name: str, img_size: Sequence[int]) -> tuple[int, int, int]:
    """``img_size`` as 3 positive ints, or a ``ValueError``."""
    size = tuple(img_size)
    if len(size) != 3 or any(int(n) != n or n < 1 for n in size):
        raise ValueError(f"{name}: img_size must be 3 positive ints (D, H, W), got {img_size!r}")
    return tuple(int(n) for n in size)


def check_divisible(name: str, img_size: Sequence[int], factor: int, why: str) -> None:
    """Raises ``ValueError`` unless every axis of ``img_size`` is divisible by ``factor``."""
    size = check_img_size(name, img_size)
    if any(n % factor for n in size):
        raise ValueError(
            f"{name} needs every axis of img_size divisible by {factor} ({why}); got "
            f"{size}")


def remat_if(flag: bool, target: Any, static_argnums: tuple[int, ...] = ()) -> Any:
    """``nn.remat(target, static_argnums=...)`` if ``flag``, else ``target``."""
    return nn.remat(target, static_argnums=static_argnums) if flag else target


class RegistrationNetwork(nn.Module):
    """Base of the networks: ``(B, *img_size, 2) -> (B, *img_size, 3)`` in voxels.

    The input is channels-last, moving image first; the output displacement's
    component ``k`` moves along array axis ``k`` (as ``ofg_jax.warp``).

    Attributes:
      img_size: spatial size ``(D, H, W)``.
      diffeomorphic: treat the flow head's output as a stationary velocity field
        and integrate it (scaling and squaring, ``int_steps`` steps).
      int_steps: squarings when ``diffeomorphic``.
      dtype: compute dtype (e.g. ``jnp.bfloat16`` or ``"bfloat16"``); parameters
        stay float32 and the displacement is returned in float32.
      conv_impl: ``conv3d`` implementation (``"auto"``, ``"xla"``, ``"cpu"``).
      remat: rematerialise the network's stages (:meth:`stage`) in the backward
        pass: between the forward and the backward pass only each stage's inputs
        are kept, and the stage's forward pass runs again when its gradient is
        needed. The same values, gradients and parameters; less memory, most
        where a stage keeps much more than its inputs (TransMorph's Swin blocks;
        experiments/RESULTS.md). A training setting (``train.remat``, applied by
        ``ofg_jax.training.step.create_train_state``), not an architecture option:
        :func:`ofg_jax.models.options` does not list it.
    """

    img_size: Sequence[int]
    diffeomorphic: bool = False
    int_steps: int = 7
    dtype: Optional[Any] = None
    conv_impl: str = "auto"
    remat: bool = False

    def check_size(self) -> None:
        """Raises ``ValueError`` naming the constraint if ``img_size`` cannot work."""
        raise NotImplementedError

    def stage(self, target: Any, static_argnums: tuple[int, ...] = ()) -> Any:
        """``target`` as one rematerialised stage if ``remat``, else ``target``.

        ``target``: a module class, or a function whose first argument is a
        module (call it as ``self.stage(fn)(self, *arrays)``); submodules keep
        their names, so the parameters are the same either way.
        ``static_argnums``: as ``nn.remat`` (non-array arguments, ``self`` = 0).
        """
        return remat_if(self.remat, target, static_argnums)

    def variable_shapes(self) -> Any:
        """The shapes and dtypes of the variables of ``init`` (``jax.ShapeDtypeStruct``
        leaves; ``params``, and ``batch_stats`` where the network has BatchNorm),
        traced without computing anything."""
        x = jax.ShapeDtypeStruct((1, *self.img_size, 2), jnp.float32)
        return jax.eval_shape(lambda x: self.init(jax.random.PRNGKey(0), x), x)

    @property
    def compute_dtype(self) -> Any:
        return jnp.float32 if self.dtype is None else jnp.dtype(self.dtype)

    def check_input(self, x: jax.Array) -> None:
        """Raises ``ValueError`` unless ``x`` is ``(B, *img_size, C)``."""
        name, size = type(self).__name__, tuple(self.img_size)
        if x.ndim != 5 or tuple(x.shape[1:4]) != size:
            raise ValueError(
                f"{name} built for img_size {size} expects input (B, {size[0]}, "
                f"{size[1]}, {size[2]}, C); got shape {x.shape}")

    def flow(self, h: jax.Array, upsample: bool = False) -> jax.Array:
        """The flow head on features ``h``: a 3x3x3 conv initialised ``N(0, 1e-5)``
        with zero bias (an untrained network predicts a near-zero field), then
        float32, with ``upsample`` trilinearly upsampled x2 (its values unscaled)
        and, if ``diffeomorphic``, integrated. Call it from ``__call__``."""
        kernel_init, bias_init = flow_head_init()
        flow = Conv3D(3, 3, 1, 1, kernel_init=kernel_init, bias_init=bias_init,
                      dtype=self.compute_dtype, impl=self.conv_impl, name="flow")(h)
        flow = flow.astype(jnp.float32)
        if upsample:
            flow = upsample_linear2(flow)
        if not self.diffeomorphic:
            return flow
        # Kept for the exact inverse (integrate -v) when "intermediates" is mutable;
        # otherwise a no-op.
        self.sow("intermediates", VELOCITY, flow)
        return integrate_velocity(flow, self.int_steps)
