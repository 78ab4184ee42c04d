"""The OFG optimiser: refines a predicted displacement into a pseudo label."""

import jax
import jax.numpy as jnp
import optax

from ofg_jax._shapes import check_disp, check_same_spatial
from ofg_jax.ncc import ncc_to
from ofg_jax.optim import torch_adam
from ofg_jax.regularizers import grad_loss
from ofg_jax.warp import warp

SIMILARITIES = ("ncc", "mse")
OPTIMIZERS = ("amsgrad", "adam", "sgd")


def registration_energy(moving: jax.Array, fixed: jax.Array, disp: jax.Array, *,
                        reg_weight: float = 1.0, similarity: str = "ncc",
                        window: int = 9, penalty: str = "l2") -> jax.Array:
    """The energy OFG minimises: ``-NCC(fixed, moving∘disp) + reg_weight * Grad(disp)``.

    With ``similarity="mse"`` the data term is ``mean((fixed - moving∘disp)**2)``.

    Args:
      moving, fixed: ``(*S)`` images.
      disp: ``(*S, N)`` displacement in voxels.
      reg_weight: weight of :func:`grad_loss`.
      similarity: ``"ncc"`` or ``"mse"``.
      window: NCC window width, in voxels.
      penalty: ``"l2"`` or ``"l1"`` for :func:`grad_loss`.

    Returns:
      Scalar energy.
    """
    return _energy_fn(moving, fixed, reg_weight, similarity, window, penalty)(disp)


def _energy_fn(moving, fixed, reg_weight, similarity, window, penalty):
    """``disp -> energy``, with everything that depends only on ``fixed`` hoisted."""
    if similarity == "ncc":
        similarity_to_fixed = ncc_to(fixed, window)
        data = lambda warped: -similarity_to_fixed(warped)
    elif similarity == "mse":
        data = lambda warped: jnp.mean((fixed - warped) ** 2)
    else:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    return lambda disp: data(warp(moving, disp)) + reg_weight * grad_loss(disp, penalty)


def _optimizer(name: str, learning_rate) -> optax.GradientTransformation:
    if name == "amsgrad":
        return torch_adam(learning_rate, amsgrad=True)
    if name == "adam":
        return torch_adam(learning_rate, amsgrad=False)
    if name == "sgd":
        return optax.sgd(learning_rate)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def _downsample(disp: jax.Array, factor: int) -> jax.Array:
    """Averages ``factor**N`` blocks of a ``(*S, N)`` field."""
    spatial = disp.shape[:-1]
    if any(n % factor for n in spatial):
        raise ValueError(
            f"downsample={factor} needs every spatial size divisible by it, got "
            f"{spatial}")
    blocks = []
    for n in spatial:
        blocks += [n // factor, factor]
    blocked = disp.reshape(*blocks, disp.shape[-1])
    return blocked.mean(axis=tuple(range(1, 2 * len(spatial), 2)))


def refine(moving: jax.Array, fixed: jax.Array, disp: jax.Array, *, steps: int = 10,
           learning_rate=0.1, reg_weight: float = 1.0, similarity: str = "ncc",
           optimizer: str = "amsgrad", downsample: int = 1, window: int = 9,
           penalty: str = "l2") -> jax.Array:
    """Runs OFG's instance optimisation from ``stop_gradient(disp)``.

    ``steps`` updates of ``optimizer`` on :func:`registration_energy`, inside one
    ``jax.lax.fori_loop``. The default optimiser is PyTorch's
    ``Adam(amsgrad=True, betas=(0.9, 0.999), eps=1e-8)``, created fresh for each
    call, as the reference does for each training pair. Unbatched: ``jax.vmap``
    over a batch gives every pair its own optimiser state.

    With ``downsample=f > 1`` the optimised variable is a field at ``1/f``
    resolution (``f``-block averages of ``disp``), upsampled linearly
    (``jax.image.resize``) to the full grid before warping; the returned field is
    that upsampled field. Values stay in full-resolution voxels.

    Args:
      moving, fixed: ``(*S)`` images, 2D or 3D.
      disp: ``(*S, N)`` starting displacement in voxels (no gradient flows back).
      steps: number of optimiser updates (static).
      learning_rate: step size; a float or a traced scalar.
      reg_weight: weight of the smoothness term.
      similarity: ``"ncc"`` or ``"mse"``.
      optimizer: ``"amsgrad"`` (default), ``"adam"`` or ``"sgd"``.
      downsample: resolution factor of the optimised field (1 = per voxel).
      window: NCC window width, in voxels.
      penalty: ``"l2"`` or ``"l1"`` smoothness penalty.

    Returns:
      ``(*S, N)`` refined displacement, in voxels.
    """
    _check_inputs(moving, fixed, disp, similarity)
    if not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")

    start = jax.lax.stop_gradient(disp)
    if downsample == 1:
        to_field = lambda params: params
        params = start
    else:
        to_field = lambda params: jax.image.resize(params, disp.shape, "linear")
        params = _downsample(start, downsample)
    return _minimise(to_field, params, moving, fixed, steps, learning_rate, reg_weight,
                     similarity, optimizer, window, penalty)


def _check_inputs(moving, fixed, disp, similarity) -> None:
    spatial = check_same_spatial(moving.shape, fixed.shape, "moving, fixed")
    if check_disp(disp.shape) != spatial:
        raise ValueError(f"disp of shape {disp.shape} does not match images of shape "
                         f"{spatial}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def _minimise(to_field, params, moving, fixed, steps, learning_rate, reg_weight,
              similarity, optimizer, window, penalty) -> jax.Array:
    """``to_field(params)`` after ``steps`` updates of ``params`` on the energy."""
    energy_of_field = _energy_fn(moving, fixed, reg_weight, similarity, window, penalty)
    energy = lambda p: energy_of_field(to_field(p))
    opt = _optimizer(optimizer, learning_rate)

    def step(_, carry):
        params, opt_state = carry
        updates, opt_state = opt.update(jax.grad(energy)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
    return to_field(params)


def ofg_loss(pred_disp: jax.Array, moving: jax.Array, fixed: jax.Array,
             **refine_kwargs) -> jax.Array:
    """OFG's supervision loss ``mean((pred - stop_gradient(refine(pred)))**2)``.

    The refined field is a constant target, so the gradient with respect to
    ``pred_disp`` is ``2 * (pred - target) / pred.size``.

    Args:
      pred_disp: ``(*S, N)`` the network's predicted displacement, in voxels.
      moving, fixed: ``(*S)`` images.
      **refine_kwargs: forwarded to :func:`refine`.

    Returns:
      Scalar loss, in voxels squared.
    """
    target = jax.lax.stop_gradient(refine(moving, fixed, pred_disp, **refine_kwargs))
    return jnp.mean((pred_disp - target) ** 2)


def refine_with_network(moving: jax.Array, fixed: jax.Array, disp: jax.Array,
                        network, params, *, steps: int = 10, learning_rate=1e-3,
                        reg_weight: float = 1.0, similarity: str = "ncc",
                        optimizer: str = "amsgrad", window: int = 9,
                        penalty: str = "l2") -> jax.Array:
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
      steps, learning_rate, reg_weight, similarity, optimizer, window, penalty:
        as in :func:`refine`; the learning rate applies to the weights and must
        be far smaller than the per-voxel default 0.1 (1e-3 to 1e-2).

    Returns:
      ``(*S, N)`` refined displacement, ``disp + residual``, in voxels.
    """
    _check_inputs(moving, fixed, disp, similarity)
    start = jax.lax.stop_gradient(disp)
    pair = jnp.stack([warp(moving, start), fixed], axis=-1)[None]

    def to_field(p):
        return start + network.apply({"params": p}, pair, train=False)[0]

    return _minimise(to_field, params, moving, fixed, steps, learning_rate, reg_weight,
                     similarity, optimizer, window, penalty)
