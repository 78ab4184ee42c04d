"""Registering two images of one grid: with a trained network, or by optimisation alone.

:func:`register_arrays` registers a pair of arrays on a trained network's grid
(optionally refined by test-time OFG with the run's inner optimiser);
:func:`optimize_arrays` registers a pair of arrays of any one grid with no
network, by coarse-to-fine optimisation (``ofg_jax.optimize``), compiled ahead
of time so that compilation and optimisation are timed apart. Both return the
displacement, the warped images, the Jacobian determinant, the energy and, with
segmentations, Dice. Volumes of any geometry: ``ofg_jax.registration.scans``.
"""

import functools
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ofg_jax.registration.compile_time import compile_ahead
from ofg_jax.metrics import dice_per_label
from ofg_jax.metrics import jacobian_determinant
from ofg_jax.models.integrate import VELOCITY
from ofg_jax.models.integrate import integrate_velocity
from ofg_jax.optimize import OptimizeSettings
from ofg_jax.optimize import check_options
from ofg_jax.optimize import optimize_displacement
from ofg_jax.optimize import optimize_velocity
from ofg_jax.refine import registration_energy
from ofg_jax.settings.inner_optimizer import RefineSettings
from ofg_jax.settings.inner_optimizer import make_refiner
from ofg_jax.volumes import check_mask
from ofg_jax.warp import warp

# The trained network's side (inference: orbax) is imported by register_arrays:
# optimisation alone does not import it.
if TYPE_CHECKING:
    from ofg_jax.registration.network import Trained


@functools.partial(jax.jit, static_argnames=("similarity", "window"))
def _field_outputs(moving, fixed, disp, reg_weight, similarity, window=9,
                   fixed_mask=None, moving_mask=None):
    return {"warped": warp(moving, disp), "jacobian": jacobian_determinant(disp),
            "energy": registration_energy(moving, fixed, disp, reg_weight=reg_weight,
                                          similarity=similarity, window=window,
                                          fixed_mask=fixed_mask,
                                          moving_mask=moving_mask)}


_warp_labels = jax.jit(functools.partial(warp, order=0))


@functools.lru_cache(maxsize=8)
def _jitted_refiner(settings: RefineSettings, img_size: tuple[int, ...]):
    return jax.jit(make_refiner(settings, img_size))


@functools.partial(jax.jit, static_argnums=0)
def _predict_velocity(model, variables, moving, fixed):
    """The displacement and the velocity of a diffeomorphic network, unbatched."""
    disp, state = model.apply(variables, jnp.stack([moving, fixed], -1)[None],
                              train=False, mutable=["intermediates"])
    return disp[0], state["intermediates"][VELOCITY][0][0]


def register_arrays(trained: "Trained", moving: np.ndarray, fixed: np.ndarray,
                    moving_seg: Optional[np.ndarray] = None,
                    fixed_seg: Optional[np.ndarray] = None, *,
                    refine_steps: int = 0,
                    labels: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Registers ``moving`` to ``fixed`` with the trained network.

    With ``refine_steps > 0`` the prediction is refined by test-time OFG: the
    run's inner optimiser (``ofg_jax.settings.inner_optimizer``, settings of ``config.ofg`` with
    the learning rate of epoch 0) for that many steps.

    Args:
      trained: from ``ofg_jax.registration.network.load_trained``.
      moving, fixed: images on the network's grid (``trained.full_size``),
        preprocessed like the training data.
      moving_seg, fixed_seg: optional integer label maps on that grid.
      refine_steps: test-time refinement steps (0 = the network's prediction).
      labels: labels whose Dice is averaged; None = those present in
        ``fixed_seg``, 0 excluded.

    Returns:
      ``disp`` ``(*S, 3)`` float32 displacement in voxels; ``warped`` ``(*S)``
      float32; ``jacobian`` ``(*S)`` float32 determinant;
      ``non_pos_jacobian_pct`` (% of voxels with det <= 0); ``network_energy`` and
      ``energy``: the OFG energy (``-NCC + ofg.reg_weight * Grad``, or MSE) of the
      prediction and of the returned field. For a diffeomorphic network at full
      resolution without refinement, ``velocity`` ``(*S, 3)``: the field is its
      exponential. With
      ``moving_seg``: ``warped_seg`` ``(*S)`` int32 (nearest neighbour). With
      both segmentations: ``labels``, ``dice_per_label`` and their mean ``dice``.

    Raises:
      ValueError: an array not on the network's grid, no label to score, or
        refinement of a run trained with ``ofg.design`` other than "instance".
    """
    from ofg_jax.registration.network import predict_jit  # pylint: disable=g-import-not-at-top
    grid = trained.full_size
    _check_shapes(grid, "the network's grid", moving=moving, fixed=fixed,
                  moving_seg=moving_seg, fixed_seg=fixed_seg)
    settings = RefineSettings.from_config(trained.config.ofg).at_test_time(refine_steps)
    moving = jnp.asarray(moving, jnp.float32)
    fixed = jnp.asarray(fixed, jnp.float32)
    velocity = None
    if trained.model.diffeomorphic and not refine_steps and trained.downsample == 1:
        disp, velocity = _predict_velocity(trained.model, trained.variables, moving,
                                           fixed)
    else:
        disp = predict_jit(trained.model, trained.variables, moving, fixed,
                           trained.downsample)
    outputs = _field_outputs(moving, fixed, disp, settings.reg_weight,
                             settings.similarity)
    network_energy = outputs["energy"]
    if refine_steps:
        refiner = _jitted_refiner(settings, grid)
        disp = refiner(moving, fixed, disp, settings.learning_rate)
        outputs = _field_outputs(moving, fixed, disp, settings.reg_weight,
                                 settings.similarity)
    result = jax.device_get({"disp": disp, **outputs,
                             "network_energy": network_energy})
    if velocity is not None:
        result["velocity"] = np.asarray(velocity)
    return _scores(result, moving_seg, fixed_seg, labels)


def _scores(result, moving_seg, fixed_seg, labels) -> dict[str, Any]:
    """``result`` (``disp``, ``jacobian``, energies) with floats, the folding and,
    with the segmentations, the warped labels and Dice."""
    for key in ("energy", "network_energy", "initial_energy"):
        if key in result:
            result[key] = float(result[key])
    result["non_pos_jacobian_pct"] = 100.0 * float(np.mean(result["jacobian"] <= 0))
    if moving_seg is None:
        return result
    warped_seg = _warp_labels(jnp.asarray(moving_seg, jnp.int32),
                              jnp.asarray(result["disp"]))
    result["warped_seg"] = np.asarray(warped_seg)
    if fixed_seg is None:
        return result
    result.update(dice_scores(result["warped_seg"], fixed_seg, labels))
    return result


def _check_shapes(grid, description, **arrays) -> None:
    for what, array in arrays.items():
        if array is not None and tuple(np.shape(array)) != tuple(grid):
            raise ValueError(f"{what} has shape {tuple(np.shape(array))}, "
                             f"{description} is {tuple(grid)}")


def dice_scores(warped_seg: np.ndarray, fixed_seg: np.ndarray,
                labels: Optional[Sequence[int]]) -> dict[str, Any]:
    """Dice of two label maps of one grid: ``labels`` (default: those of
    ``fixed_seg`` but 0), ``dice_per_label`` and their mean ``dice``.

    Raises:
      ValueError: ``fixed_seg`` holds no label but 0.
    """
    if labels is None:
        labels = [int(v) for v in np.unique(fixed_seg) if v != 0]
        if not labels:
            raise ValueError("the fixed segmentation holds no label other than 0")
    dice = np.asarray(dice_per_label(jnp.asarray(warped_seg, jnp.int32),
                                     jnp.asarray(fixed_seg, jnp.int32), labels))
    return dict(labels=tuple(int(l) for l in labels), dice_per_label=dice,
                dice=float(np.mean(dice)))


# Optimisation alone.

@functools.partial(jax.jit, static_argnames=("settings",))
def _optimize(moving, fixed, fixed_mask, moving_mask, settings):
    """The field of ``settings`` and its outputs (the energy with its weight,
    window and masks), and the energy of the identity."""
    options = settings.options()
    options.update(fixed_mask=fixed_mask, moving_mask=moving_mask)
    outputs = {}
    if options.pop("diffeomorphic"):
        outputs["velocity"] = optimize_velocity(moving, fixed, **options)
        disp = integrate_velocity(outputs["velocity"][None], settings.int_steps)[0]
    else:
        disp = optimize_displacement(moving, fixed, diffeomorphic=False, **options)
    energy = functools.partial(_field_outputs, moving, fixed,
                               reg_weight=settings.reg_weight,
                               similarity=settings.similarity, window=settings.window,
                               fixed_mask=fixed_mask, moving_mask=moving_mask)
    return {"disp": disp, **outputs, **energy(disp),
            "initial_energy": energy(jnp.zeros_like(disp))["energy"]}


def optimize_arrays(settings: OptimizeSettings, moving: np.ndarray, fixed: np.ndarray,
                    moving_seg: Optional[np.ndarray] = None,
                    fixed_seg: Optional[np.ndarray] = None, *,
                    labels: Optional[Sequence[int]] = None,
                    fixed_mask: Optional[np.ndarray] = None,
                    moving_mask: Optional[np.ndarray] = None) -> dict[str, Any]:
    """Registers ``moving`` to ``fixed`` (one grid) by optimisation alone.

    ``ofg_jax.optimize.optimize_displacement`` with ``settings``, compiled ahead
    of time (through the persistent compilation cache when it is on), so that
    compilation and optimisation are timed apart.

    Args:
      settings: the optimiser's settings.
      moving, fixed: ``(*S)`` images of one grid.
      moving_seg, fixed_seg: optional integer label maps on that grid.
      labels: labels whose Dice is averaged; None = those present in
        ``fixed_seg``, 0 excluded.
      fixed_mask, moving_mask: optional ``(*S)`` cost-function masks on that
        grid, weights in ``[0, 1]`` (binary or soft), each somewhere > 0: the
        data term counts where ``fixed_mask * moving_mask∘disp > 0``
        (``optimize_displacement``); the energies reported are the masked ones.

    Returns:
      The keys of :func:`register_arrays`, with ``initial_energy`` (of the zero
      field) in place of ``network_energy``; ``velocity`` in the diffeomorphic
      mode; ``compile_seconds`` and ``compilation`` (how the program was
      obtained), ``optimize_seconds`` (the compiled program's run).

    Raises:
      ValueError: arrays of different shapes, invalid settings (named), or a
        mask with values outside ``[0, 1]`` or all 0.
    """
    check_options(**settings.options())
    _check_shapes(np.shape(fixed), "the fixed image's", moving=moving,
                  moving_seg=moving_seg, fixed_seg=fixed_seg, fixed_mask=fixed_mask,
                  moving_mask=moving_mask)
    masks = [None if mask is None else jnp.asarray(check_mask(mask, name))
             for name, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask))]
    moving = jnp.asarray(moving, jnp.float32)
    fixed = jnp.asarray(fixed, jnp.float32)
    program, clock = compile_ahead(_optimize, moving, fixed, *masks, settings=settings)
    start = time.perf_counter()
    result = jax.device_get(jax.block_until_ready(program(moving, fixed, *masks)))
    result.update(compile_seconds=clock.wall_seconds, compilation=clock.how_compiled(),
                  optimize_seconds=time.perf_counter() - start)
    return _scores(result, moving_seg, fixed_seg, labels)
