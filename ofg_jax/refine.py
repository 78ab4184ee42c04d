"""The OFG optimiser: refines a displacement by minimising the registration energy.

The paper's Eq. 4 is :func:`registration_energy`; its Eq. 2, a few optimiser
steps on that energy from the network's prediction, is :func:`refine` (the
per-voxel "instance" optimiser, OFG's proposal) and :func:`refine_with_network`
(the network-based design of the ablation).
"""

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from ofg_jax._shapes import check_disp, check_optional_shapes, check_same_spatial
from ofg_jax.ncc import masked_mean, ncc_gradient_to, ncc_to
from ofg_jax.adam import torch_adam
from ofg_jax.options import OPTIMIZERS, SIMILARITIES
from ofg_jax.regularizers import grad_loss, grad_loss_gradient
from ofg_jax.resolution import block_mean
from ofg_jax.warp import warp, warp_and_slopes


Optimizer = Union[str, optax.GradientTransformation]


def registration_energy(moving: jax.Array, fixed: jax.Array, disp: jax.Array, *,
                        reg_weight: float = 1.0, similarity: str = "ncc",
                        window: int = 9, penalty: str = "l2",
                        fixed_mask: Optional[jax.Array] = None,
                        moving_mask: Optional[jax.Array] = None) -> jax.Array:
    """The energy OFG minimises (Eq. 4): ``-NCC(fixed, moving∘disp) + reg_weight * Grad(disp)``.

    With ``similarity="mse"`` the data term is ``mean((fixed - moving∘disp)**2)``.

    Cost-function masks (as ANTs' ``-x [fixedMask,movingMask]``) weight the data
    term only: with weights ``w`` it is the weighted mean ``sum(w * c) / sum(w)``
    of the per-voxel term ``c`` (the local NCC map ``cc``, or the squared
    error), so voxels of weight 0 do not count; Grad stays over the whole field.
    ``w`` is ``fixed_mask``, times ``moving_mask∘disp`` (the moving mask warped
    by the field, linear, 0 outside) when there is a moving mask. The warped
    moving mask is not differentiated (``stop_gradient``: it selects the voxels
    that count, as ITK's masks select sample points, and pulls on nothing).

    Args:
      moving, fixed: ``(*S)`` images.
      disp: ``(*S, N)`` displacement in voxels.
      reg_weight: weight of :func:`grad_loss`.
      similarity: ``"ncc"`` or ``"mse"``.
      window: NCC window width, in voxels.
      penalty: ``"l2"`` or ``"l1"`` for :func:`grad_loss`.
      fixed_mask: None, or ``(*S)`` weights in ``[0, 1]`` on the fixed grid
        (binary or soft).
      moving_mask: None, or ``(*S)`` weights in ``[0, 1]`` on the moving image's
        grid.

    Returns:
      Scalar energy.
    """
    check_optional_shapes(fixed.shape, fixed_mask=fixed_mask,
                          moving_mask=moving_mask)
    return _energy_fn(moving, fixed, reg_weight, similarity, window, penalty,
                      fixed_mask, moving_mask)(disp)


def _data_term(fixed, similarity, window):
    """``(warped, weights=None) -> -NCC(fixed, warped)`` or the MSE (weighted means
    with ``weights``), with what depends only on ``fixed`` hoisted."""
    if similarity == "ncc":
        similarity_to_fixed = ncc_to(fixed, window=window)
        return lambda warped, weights=None: -similarity_to_fixed(warped, weights)
    if similarity == "mse":
        return lambda warped, weights=None: masked_mean((fixed - warped) ** 2, weights)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def _mask_weights(fixed_mask, moving_mask) -> Callable[[jax.Array], Optional[jax.Array]]:
    """``disp -> `` the data term's weights on the fixed grid: ``fixed_mask``, times
    the moving mask warped by ``disp`` (not differentiated); None without masks."""
    if moving_mask is None:
        return lambda disp: fixed_mask

    def weights(disp):
        on_fixed = warp(moving_mask, jax.lax.stop_gradient(disp))
        return on_fixed if fixed_mask is None else fixed_mask * on_fixed

    return weights


def _energy_fn(moving, fixed, reg_weight, similarity, window, penalty,
               fixed_mask=None, moving_mask=None):
    """``disp -> energy``, with everything that depends only on ``fixed`` hoisted."""
    data = _data_term(fixed, similarity, window)
    weights = _mask_weights(fixed_mask, moving_mask)
    if reg_weight is None:  # the data term alone
        return lambda disp: data(warp(moving, disp), weights(disp))
    return lambda disp: (data(warp(moving, disp), weights(disp))
                         + reg_weight * grad_loss(disp, penalty=penalty))


def _data_gradient_fn(moving, fixed, similarity, window, fixed_mask=None,
                      moving_mask=None) -> Callable[..., jax.Array]:
    """``(disp, add=None) ->`` the data term's gradient in ``disp``, written out
    (``warp_and_slopes``, ``ncc_gradient_to``), plus ``add`` (``(*S, N)``) when
    given. With masks the per-voxel coefficients are weighted
    (``ncc_gradient_to``'s ``weights``; the moving mask warped once more)."""
    mask_weights = _mask_weights(fixed_mask, moving_mask)
    if similarity == "ncc":
        ncc_gradient = ncc_gradient_to(fixed, window=window)
        data_gradient = lambda warped, weights: -ncc_gradient(warped, weights)
    else:
        data_gradient = jax.grad(
            lambda warped, weights: masked_mean((fixed - warped) ** 2, weights))

    def gradient(disp, add=None):
        warped, slopes = warp_and_slopes(moving, disp)
        g_warped = data_gradient(warped, mask_weights(disp))
        # Each component in one expression: XLA then computes the whole gradient
        # in one pass, where a sum of two stacked arrays has each optimiser
        # update recompute one of them.
        return jnp.stack([g_warped * slope if add is None else g_warped * slope + add[..., k]
                          for k, slope in enumerate(slopes)], axis=-1)

    return gradient


def _inner_energy_fn(moving, fixed, reg_weight, similarity, window, penalty,
                     fixed_mask=None, moving_mask=None):
    """:func:`_energy_fn` with its gradient in ``disp`` written out, for the inner loop.

    The same value; the gradient is ``jax.grad`` of it up to float32 rounding, in
    fewer passes over memory (:func:`_data_gradient_fn`, ``grad_loss_gradient``).
    Reverse mode only. Without masks nothing is added for them.
    ``reg_weight=None``: the data term alone.
    """
    energy = _energy_fn(moving, fixed, reg_weight, similarity, window, penalty,
                        fixed_mask, moving_mask)
    data_gradient = _data_gradient_fn(moving, fixed, similarity, window, fixed_mask,
                                      moving_mask)

    def gradient(disp):
        if reg_weight is None:
            return data_gradient(disp)
        return data_gradient(disp, reg_weight * grad_loss_gradient(disp, penalty=penalty))

    inner = jax.custom_vjp(energy)
    inner.defvjp(lambda disp: (energy(disp), disp), lambda disp, g: (g * gradient(disp),))
    return inner


def _optimizer(optimizer: Optimizer, learning_rate, default_lr: float
               ) -> optax.GradientTransformation:
    """The transformation named by ``optimizer`` at ``learning_rate``, or ``optimizer``."""
    if isinstance(optimizer, optax.GradientTransformation):
        if learning_rate is not None:
            raise ValueError(
                "learning_rate is part of an optax.GradientTransformation passed as "
                "optimizer; pass one or the other")
        return optimizer
    lr = default_lr if learning_rate is None else learning_rate
    if optimizer == "amsgrad":
        return torch_adam(lr, amsgrad=True)
    if optimizer == "adam":
        return torch_adam(lr, amsgrad=False)
    if optimizer == "sgd":
        return optax.sgd(lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS} or an "
                     f"optax.GradientTransformation, got {optimizer!r}")


def refine(moving: jax.Array, fixed: jax.Array, disp: jax.Array, *, steps: int = 10,
           learning_rate=None, reg_weight: float = 1.0, similarity: str = "ncc",
           optimizer: Optimizer = "amsgrad", downsample: int = 1, window: int = 9,
           penalty: str = "l2", fixed_mask: Optional[jax.Array] = None,
           moving_mask: Optional[jax.Array] = None) -> jax.Array:
    """Runs OFG's instance optimisation (Eq. 2) from ``stop_gradient(disp)``.

    ``steps`` updates of ``optimizer`` on :func:`registration_energy`, inside one
    ``jax.lax.fori_loop``. The default optimiser is PyTorch's
    ``Adam(amsgrad=True, betas=(0.9, 0.999), eps=1e-8)`` at learning rate 0.1,
    created fresh for each call, as the reference does for each training pair.
    Unbatched: ``jax.vmap`` over a batch gives every pair its own optimiser state.

    With ``downsample=f > 1`` the optimised variable is a field at ``1/f``
    resolution (``f``-block averages of ``disp``), upsampled linearly
    (``jax.image.resize``) to the full grid before warping; the returned field is
    that upsampled field. Values stay in full-resolution voxels.

    Args:
      moving, fixed: ``(*S)`` images, 2D or 3D.
      disp: ``(*S, N)`` starting displacement in voxels (no gradient flows back).
      steps: number of optimiser updates (static).
      learning_rate: step size of a named ``optimizer``, a float or a traced
        scalar; None = 0.1.
      reg_weight: weight of the smoothness term.
      similarity: ``"ncc"`` or ``"mse"``.
      optimizer: ``"amsgrad"`` (default), ``"adam"``, ``"sgd"``, or any
        ``optax.GradientTransformation`` (which carries its own learning rate).
      downsample: resolution factor of the optimised field (1 = per voxel).
      window: NCC window width, in voxels.
      penalty: ``"l2"`` or ``"l1"`` smoothness penalty.
      fixed_mask, moving_mask: optional ``(*S)`` cost-function masks, weights in
        ``[0, 1]`` on the fixed and the moving grid: as in
        :func:`registration_energy`.

    Returns:
      ``(*S, N)`` refined displacement, in voxels.
    """
    _check_inputs(moving, fixed, disp, similarity)
    check_optional_shapes(fixed.shape, fixed_mask=fixed_mask,
                          moving_mask=moving_mask)
    if not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")

    start = jax.lax.stop_gradient(disp)
    if downsample == 1:
        to_field = lambda params: params
        params = start
    else:
        to_field = lambda params: jax.image.resize(params, disp.shape, "linear")
        params = block_mean(start, downsample, spatial_dims=start.ndim - 1)
    opt = _optimizer(optimizer, learning_rate, default_lr=0.1)
    energy = _inner_energy_fn(moving, fixed, reg_weight, similarity, window, penalty,
                              fixed_mask, moving_mask)
    return _minimise(lambda p: energy(to_field(p)), to_field, params, opt, steps)


def _check_inputs(moving, fixed, disp, similarity) -> None:
    spatial = check_same_spatial(moving.shape, fixed.shape, "moving, fixed")
    if check_disp(disp.shape) != spatial:
        raise ValueError(f"disp of shape {disp.shape} does not match images of shape "
                         f"{spatial}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def _minimise(energy: Callable[[Any], jax.Array], to_field: Callable[[Any], jax.Array],
              params: Any, opt: optax.GradientTransformation, steps: int) -> jax.Array:
    """``to_field(params)`` after ``steps`` updates of ``params`` on ``energy``."""

    def step(_, carry):
        params, opt_state = carry
        updates, opt_state = opt.update(jax.grad(energy)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
    return to_field(params)


def refine_with_network(moving: jax.Array, fixed: jax.Array, disp: jax.Array,
                        network, params, *, steps: int = 10,
                        learning_rate=None, reg_weight: float = 1.0,
                        similarity: str = "ncc", optimizer: Optimizer = "amsgrad",
                        window: int = 9, penalty: str = "l2") -> jax.Array:
    """The network-based OFG optimiser (the paper's "cascaded VoxelMorph" design).

    A second registration network ``network`` (any flax module mapping
    ``(1, *S, 2)`` to a ``(1, *S, N)`` displacement, called with ``train=False``)
    looks at ``(moving∘disp, fixed)`` and predicts a residual field that is added
    to ``stop_gradient(disp)``. Starting from ``params`` (for each call: a fresh
    copy, like :func:`refine`'s fresh optimiser state), its *weights* take
    ``steps`` updates of ``optimizer`` on :func:`registration_energy` of the
    resulting field. With a flow head initialised near zero (VoxelMorph's), the
    search starts at ``disp``. Unbatched; ``jax.vmap`` over pairs with
    ``params`` shared (``in_axes=None``).

    Args:
      moving, fixed: ``(*S)`` images.
      disp: ``(*S, N)`` starting displacement (no gradient flows back).
      network: the flax module of the residual network.
      params: its initial ``params`` collection.
      steps, reg_weight, similarity, optimizer, window, penalty: as in
        :func:`refine`.
      learning_rate: as in :func:`refine`, for the weights; None = 1e-3 (it must
        be far smaller than the per-voxel 0.1: 1e-3 to 1e-2).

    Returns:
      ``(*S, N)`` refined displacement, ``disp + residual``, in voxels.
    """
    _check_inputs(moving, fixed, disp, similarity)
    start = jax.lax.stop_gradient(disp)
    pair = jnp.stack([warp(moving, start), fixed], axis=-1)[None]

    def to_field(p):
        return start + network.apply({"params": p}, pair, train=False)[0]

    opt = _optimizer(optimizer, learning_rate, default_lr=1e-3)
    energy = _inner_energy_fn(moving, fixed, reg_weight, similarity, window, penalty)
    return _minimise(lambda p: energy(to_field(p)), to_field, params, opt, steps)
