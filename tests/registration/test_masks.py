"""Cost-function masks (``fixed_mask``, ``moving_mask``; ``register --fixed-mask``):
the data term counts only where the masks are > 0, for the deformable stage, the
affine stage, volumes of any geometry and the command line."""

import functools
import os
import re

import jax
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ofg_jax import cli
from ofg_jax.registration import geometry
from ofg_jax import jacobian_determinant
from ofg_jax import optimize_displacement
from ofg_jax import optimize_velocity
from ofg_jax.registration import pairs as pairs_lib
from ofg_jax import register
from ofg_jax import register_affine
from ofg_jax.registration import scans as scans_lib
from ofg_jax import registration_energy
from ofg_jax.registration import transforms
from ofg_jax import warp
from ofg_jax.optimize import OptimizeSettings
from ofg_jax.volumes import check_mask
from tests import registration_fixtures as fixtures
from tests.references import np_dice, np_grad_loss, np_ncc, np_warp

# The library's defaults at the time of writing, spelled out so that tuning the
# defaults does not change what these tests measure.
OPTIONS = dict(levels=(4, 2, 1), steps=(100, 50, 20), learning_rate=0.2,
               reg_weight=2.0, window=5, optimizer="adam")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """The persistent compilation cache of in-process runs in a fresh folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache_home"))


def smooth_image(shape, seed, sigma=2.0):
    image = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return ((image - image.min()) / np.ptp(image)).astype(np.float32)


# The semantics, on small arrays.

def test_no_mask_is_a_mask_of_ones_to_float_rounding():
    shape = (14, 12, 10)
    moving, fixed = smooth_image(shape, 0), smooth_image(shape, 1)
    disp = np.random.default_rng(2).normal(size=shape + (3,)).astype(np.float32)
    zero = np.zeros_like(disp)
    ones = np.ones(shape, np.float32)
    moving_mask = (smooth_image(shape, 3) > 0.4).astype(np.float32)
    for similarity in ("ncc", "mse"):
        energy = functools.partial(registration_energy, moving, fixed,
                                   similarity=similarity, window=5)
        np.testing.assert_allclose(energy(disp, fixed_mask=ones), energy(disp),
                                   rtol=1e-6)
        # A moving mask of ones warped by the zero field is ones again; by another
        # field, it is the fixed mask of its warped values (ANTs' semantics).
        np.testing.assert_allclose(energy(zero, fixed_mask=ones, moving_mask=ones),
                                   energy(zero), rtol=1e-6)
        np.testing.assert_allclose(
            energy(disp, moving_mask=moving_mask),
            energy(disp, fixed_mask=np.asarray(warp(moving_mask, disp))), rtol=1e-6)
    gradient = jax.jit(jax.grad(functools.partial(registration_energy, moving, fixed,
                                                  window=5)))
    np.testing.assert_allclose(gradient(disp, fixed_mask=ones), gradient(disp),
                               rtol=1e-5, atol=1e-8)
    # The optimisations (refine's written-out gradient inside), 2D: quick.
    moving2, fixed2 = moving[..., 0], fixed[..., 0]
    ones2 = np.ones(moving2.shape, np.float32)
    for optimize, levels in ((optimize_displacement, (2, 1)), (optimize_velocity, (1,))):
        run = jax.jit(functools.partial(optimize, levels=levels, steps=(6, 3)[
            :len(levels)], window=3, int_steps=2))
        np.testing.assert_allclose(run(moving2, fixed2, fixed_mask=ones2),
                                   run(moving2, fixed2), atol=1e-5)


def test_masked_energy_is_the_weighted_mean_of_the_voxels_that_count():
    """Against float64 NumPy; and a voxel of weight 0 does not count, whatever the
    images hold there."""
    shape = (9, 10, 8)
    moving, fixed = smooth_image(shape, 3), smooth_image(shape, 4)
    disp = np.random.default_rng(5).normal(size=shape + (3,)).astype(np.float32)
    rng = np.random.default_rng(6)
    fixed_mask = (rng.random(shape) * (rng.random(shape) > 0.5)).astype(np.float32)
    moving_mask = (rng.random(shape) > 0.3).astype(np.float32)
    weights = fixed_mask * np_warp(moving_mask, disp)
    got = registration_energy(moving, fixed, disp, window=3, reg_weight=0.5,
                              fixed_mask=fixed_mask, moving_mask=moving_mask)
    want = (-np_ncc(fixed, np_warp(moving, disp), 3, weights=weights)
            + 0.5 * np_grad_loss(disp))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got = registration_energy(moving, fixed, disp, similarity="mse",
                              fixed_mask=fixed_mask)
    warped = np_warp(moving, disp)
    want = (np.sum(fixed_mask * (fixed - warped) ** 2) / np.sum(fixed_mask)
            + np_grad_loss(disp))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # MSE is per voxel: changing the fixed image where the weight is 0 changes nothing.
    changed = np.where(fixed_mask == 0, 5.0, fixed).astype(np.float32)
    np.testing.assert_allclose(
        registration_energy(moving, changed, disp, similarity="mse",
                            fixed_mask=fixed_mask),
        registration_energy(moving, fixed, disp, similarity="mse",
                            fixed_mask=fixed_mask), rtol=1e-6)
    with pytest.raises(ValueError, match=r"fixed_mask of shape \(9, 10\) does not"):
        registration_energy(moving, fixed, disp, fixed_mask=fixed_mask[..., 0])
    with pytest.raises(ValueError, match="moving_mask of shape"):
        optimize_displacement(moving, fixed, moving_mask=moving_mask[1:])


@pytest.mark.parametrize("mask, message", [
    (np.full((4, 4, 4), np.nan), "64 non-finite"),
    (np.full((4, 4, 4), 2.0), "values from 2 to 2"),
    (-np.ones((4, 4, 4)), "values from -1 to -1"),
    (np.zeros((4, 4, 4)), "is 0 everywhere"),
])
def test_bad_mask_arrays_are_named(mask, message):
    with pytest.raises(ValueError, match=re.escape(f"the mask has {message}"
                                                   if "is 0" not in message else
                                                   f"the mask {message}")):
        check_mask(mask, "the mask")
    moving = smooth_image((4, 4, 4), 0)
    with pytest.raises(ValueError, match=f"fixed_mask .*{re.escape(message)}"):
        register_affine(moving, moving, fixed_mask=mask)


# A lesion in one image and not in the other.

SHAPE = (32, 32, 32)
CENTER = np.array([16, 12, 18])  # In the phantom's brain, where the field is large.
RADIUS = 6.5  # Voxels of 3.5 mm: a resection cavity of about 45 mm.


@pytest.fixture(scope="module")
def lesion_pair():
    """A brain phantom (moving), the same deformed by a known smooth field (fixed),
    and a dark round lesion at ``CENTER``, not in the other image."""
    grid = geometry.centred_grid(SHAPE, (3.5,) * 3, "RAS", (0.0, 0.0, 0.0))
    moving, labels = fixtures.render_phantom(SHAPE, grid.affine)
    truth = fixtures.smooth_field(SHAPE, 3.0)
    fixed = np.asarray(warp(moving, truth))
    fixed_seg = np.asarray(warp(labels, truth, order=0))
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    return dict(moving=moving, labels=labels, truth=truth, fixed=fixed,
                fixed_seg=fixed_seg, voxels=voxels,
                radius=np.linalg.norm(voxels - CENTER, axis=-1))


def with_lesion(image, distance):
    """``image`` darkened to 0 where ``distance`` (voxels from the lesion's centre)
    is within ``RADIUS``, with a one-voxel soft edge."""
    return (np.clip(distance - RADIUS, 0, 1) * image).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("diffeomorphic",))
def register_masked(moving, fixed, fixed_mask, moving_mask, diffeomorphic=False):
    return optimize_displacement(moving, fixed, fixed_mask=fixed_mask,
                                 moving_mask=moving_mask, diffeomorphic=diffeomorphic,
                                 **OPTIONS)


def scores(pair, disp, region):
    """The field's error against the known one (voxels, mean over ``region``), the
    mean Dice of the labels within ``region``, and the voxels with det <= 0."""
    disp = np.asarray(disp)
    warped_seg = np.asarray(warp(pair["labels"], disp, order=0))
    labels = [l for l in np.unique(pair["fixed_seg"][region]) if l]
    dice = np_dice(np.where(region, warped_seg, 0),
                   np.where(region, pair["fixed_seg"], 0), labels)
    return dict(error=float(np.linalg.norm(disp - pair["truth"], axis=-1)[region].mean()),
                dice=float(np.mean(dice)),
                folds=int(np.sum(np.asarray(jacobian_determinant(disp)) <= 0)))


def test_a_fixed_mask_over_a_lesion_keeps_it_from_pulling_the_field(lesion_pair,
                                                                     record_property):
    """Without a mask the lesion of the fixed image drags the field (its error
    outside the lesion doubles, it folds); with the mask 0 on the lesion (dilated
    by half an NCC window, as the docs advise) the field outside it is closer to
    the known one, Dice there is higher and nothing folds."""
    pair, r = lesion_pair, lesion_pair["radius"]
    fixed = with_lesion(pair["fixed"], r)
    mask = (r > RADIUS + 1 + OPTIONS["window"] // 2).astype(np.float32)
    outside = (r > RADIUS + 1) & (pair["fixed_seg"] > 0)
    runs = {"clean": register_masked(pair["moving"], pair["fixed"], None, None),
            "unmasked": register_masked(pair["moving"], fixed, None, None),
            "masked": register_masked(pair["moving"], fixed, mask, None)}
    result = {name: scores(pair, disp, outside) for name, disp in runs.items()}
    record_property("lesion_outside", result)
    print(result)
    clean, unmasked, masked = result["clean"], result["unmasked"], result["masked"]
    # Not vacuous: the lesion really hurt the unmasked run.
    assert unmasked["error"] > 1.5 * clean["error"], result
    assert unmasked["dice"] < clean["dice"] - 0.1 and unmasked["folds"] > 0, result
    # The mask: the field outside the lesion is better, and nothing folds.
    assert masked["error"] < 0.7 * unmasked["error"], result
    assert masked["dice"] > unmasked["dice"] + 0.08, result
    assert masked["folds"] == 0, result


def test_a_moving_mask_over_a_lesion_of_the_moving_image(lesion_pair, record_property):
    """The lesion in the moving image (where the fixed lesion's point maps to): the
    moving mask, warped with the field, keeps the voxels it covers out; the field
    outside the lesion is closer to the known one and does not fold. (A moving
    lesion still sits in its neighbours' NCC windows, and the field can shrink
    it: the gain is smaller than the fixed mask's.)"""
    pair = lesion_pair
    center = CENTER + pair["truth"][tuple(CENTER)]
    r_moving = np.linalg.norm(pair["voxels"] - center, axis=-1)
    moving = with_lesion(pair["moving"], r_moving)
    mask = (r_moving > RADIUS + 1 + 3).astype(np.float32)
    outside = (pair["radius"] > RADIUS + 1) & (pair["fixed_seg"] > 0)
    runs = {"unmasked": register_masked(moving, pair["fixed"], None, None),
            "masked": register_masked(moving, pair["fixed"], None, mask)}
    result = {name: scores(pair, disp, outside) for name, disp in runs.items()}
    record_property("moving_lesion_outside", result)
    print(result)
    assert result["unmasked"]["folds"] > 0, result
    assert result["masked"]["error"] < result["unmasked"]["error"] - 0.05, result
    assert result["masked"]["folds"] == 0, result


# The affine stage.

AFFINE_FIXED = geometry.centred_grid((40, 44, 40), (3.0, 3.0, 3.0), "RAS", (0.0, 0.0, 0.0))


def test_affine_masks_ignore_a_cut_field_of_view(record_property):
    """A scan whose field of view cuts the head (the top set to 0): without a mask
    the cut edge pulls the affine off; the mask that leaves the cut out recovers
    it, for the fixed and the moving image alike."""
    from scipy.spatial.transform import Rotation
    fixed, fixed_seg = fixtures.render_phantom(AFFINE_FIXED.shape, AFFINE_FIXED.affine)
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_rotvec(np.radians(8) * np.array([0.6, 0.8, 0])
                                          ).as_matrix()
    matrix[:3, 3] = (6.0, -5.0, 4.0)
    moving_grid = geometry.centred_grid((40, 44, 40), (3.3, 3.1, 3.2), "LPI",
                                        (4.0, -3.0, 2.0))
    moving, _ = fixtures.render_phantom(moving_grid.shape, moving_grid.affine,
                                        np.linalg.inv(matrix))
    points = geometry.apply_affine(AFFINE_FIXED.affine, np.argwhere(fixed_seg > 0))

    def error(found):
        return float(np.linalg.norm(geometry.apply_affine(found, points)
                                    - geometry.apply_affine(matrix, points), axis=-1).mean())

    cut_fixed, fixed_mask = fixed.copy(), np.ones_like(fixed)
    cut_fixed[:, :, 24:], fixed_mask[:, :, 23:] = 0, 0
    # The moving grid is LPI: its first slices are the top of the head.
    cut_moving, moving_mask = moving.copy(), np.ones_like(moving)
    cut_moving[:, :, :12], moving_mask[:, :, :13] = 0, 0
    register = functools.partial(register_affine, moving_affine=moving_grid.affine,
                                 fixed_affine=AFFINE_FIXED.affine)
    errors = {
        "fixed cut": error(register(moving, cut_fixed)),
        "fixed cut, fixed mask": error(register(moving, cut_fixed,
                                                fixed_mask=fixed_mask)),
        "moving cut": error(register(cut_moving, fixed)),
        "moving cut, moving mask": error(register(cut_moving, fixed,
                                                  moving_mask=moving_mask)),
    }
    record_property("affine_error_mm", errors)
    print(errors)
    assert errors["fixed cut"] > 1.5 and errors["moving cut"] > 2.0, errors
    assert errors["fixed cut, fixed mask"] < 0.7, errors
    assert errors["moving cut, moving mask"] < 0.5 * errors["moving cut"], errors


# Volumes of any geometry, files and the command line.

def test_masks_of_another_geometry_are_resampled_onto_each_grid():
    """A mask of another voxel size and orientation comes onto the fixed grid as the
    same world region (linear, clipped to [0, 1], 0 outside its field of view);
    one that misses the grid, or a network, is refused."""
    fixed = geometry.Grid((20, 22, 18), fixtures.oblique_affine((3.0, 2.5, 3.5)))
    other = geometry.centred_grid((40, 40, 40), (2.0, 2.0, 2.0), "LPS",
                                  geometry.apply_affine(fixed.affine, [9.5, 10.5, 8.5]))
    ball = lambda grid: (np.linalg.norm(geometry.apply_affine(
        grid.affine, np.argwhere(np.ones(grid.shape, bool))) - geometry.apply_affine(
            fixed.affine, [9.5, 10.5, 8.5]), axis=-1) < 20).reshape(grid.shape)
    mask = transforms.Volume(ball(other).astype(np.float32), other.affine)
    on_fixed = scans_lib._mask_on(mask, fixed, "fixed mask", "fixed grid")
    assert on_fixed.shape == fixed.shape and 0 <= on_fixed.min() and on_fixed.max() <= 1
    want = ball(fixed)
    assert np.mean((on_fixed > 0.5) == want) > 0.97, np.mean((on_fixed > 0.5) == want)
    # As it is when it shares the grid.
    same = transforms.Volume(want.astype(np.float32), fixed.affine)
    np.testing.assert_array_equal(scans_lib._mask_on(same, fixed, "m", "g"), want)
    far = transforms.Volume(np.ones((4, 4, 4), np.float32),
                            geometry.centred_grid((4, 4, 4), (1.0,) * 3, "RAS",
                                                  (500.0, 0.0, 0.0)).affine)
    with pytest.raises(ValueError, match="the moving mask is 0 everywhere on the "
                                         "working grid"):
        scans_lib._mask_on(far, fixed, "moving mask", "working grid")
    image = transforms.Volume(np.ones(fixed.shape, np.float32), fixed.affine)
    with pytest.raises(ValueError, match="apply to optimisation alone"):
        scans_lib.register_volumes(fixtures.smooth_trained(), image, image,
                                      fixed_mask=same)
    with pytest.raises(ValueError, match="values from 0 to 2"):
        scans_lib.register_volumes(OptimizeSettings(), image, image,
                                      fixed_mask=transforms.Volume(2 * same.array,
                                                                   fixed.affine))


def write_lesion_scans(folder):
    """``write_scans``' moving and fixed brain scans (oblique, different grids, the
    phantom in one world place: the true deformable field is 0), a dark lesion in
    the fixed scan around a world point, and masks of that lesion on grids of
    their own (2.5 mm LPS and 4 mm ASL voxels, other fields of view)."""
    scans = fixtures.write_scans(folder, seed=3)
    fixed = nib.load(scans["fixed"])
    center = geometry.apply_affine(fixed.affine, (np.asarray(fixed.shape) - 1) / 2
                                   ) + np.array([0.0, -20.0, 5.0])
    world = lambda grid: geometry.apply_affine(grid.affine, np.stack(np.meshgrid(
        *[np.arange(n) for n in grid.shape], indexing="ij"), -1))
    distance = lambda grid: np.linalg.norm(world(grid) - center, axis=-1)
    fixed_grid = geometry.Grid(fixed.shape, fixed.affine)
    image = fixed.get_fdata(dtype=np.float32) * np.clip(
        distance(fixed_grid) / 4.5 - 4, 0, 1)  # 0 within 18 mm, soft to 22.5 mm
    paths = dict(scans, lesion=fixtures.write_nifti(
        os.path.join(folder, "lesion.nii.gz"), image, fixed.affine, np.float32))
    for name, grid in (("fixed_mask", geometry.centred_grid((48, 44, 40), (2.5,) * 3,
                                                            "LPS", (0.0, 0.0, 0.0))),
                       ("moving_mask", geometry.centred_grid((30, 32, 28), (4.0,) * 3,
                                                             "ASL", (3.0, 0.0, 0.0)))):
        paths[name] = fixtures.write_nifti(
            os.path.join(folder, f"{name}.nii.gz"),
            (distance(grid) > 30).astype(np.uint8), grid.affine, np.uint8)
    return paths, center


def run_main(capsys, *args):
    status = register.main(["register", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_command_line_masks_of_other_geometries_keep_a_lesion_out(tmp_path, capsys):
    """``--fixed-mask`` (and the ``fixed_mask`` / ``moving_mask`` columns of
    ``--pairs``), masks on grids of their own: the field near the lesion, whose
    true value is 0, is smaller with the masks than without."""
    paths, center = write_lesion_scans(str(tmp_path / "scans"))
    common = ["--levels=2,1", "--steps=40,20", "--learning-rate=0.2", "--affine"]
    status, out, err = run_main(capsys, f"--moving={paths['moving']}",
                                f"--fixed={paths['lesion']}",
                                f"--out={tmp_path / 'unmasked'}", *common)
    assert status == 0, err
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("moving,fixed,fixed_mask,moving_mask,name\n"
                     f"{paths['moving']},{paths['lesion']},{paths['fixed_mask']},"
                     f"{paths['moving_mask']},masked\n")
    status, out, err = run_main(capsys, f"--pairs={pairs}", f"--out={tmp_path}",
                                *common)
    assert status == 0, err
    for line in (r"fixed mask: \d+\.\d % of the working grid counts \(weight > 0\)",
                 r"moving mask: \d+\.\d % of the working grid counts"):
        assert re.search(line, out), (line, out)
    fixed = nib.load(paths["lesion"])
    grid = geometry.Grid(fixed.shape, fixed.affine)
    distance = np.linalg.norm(geometry.apply_affine(grid.affine, np.stack(np.meshgrid(
        *[np.arange(n) for n in grid.shape], indexing="ij"), -1)) - center, axis=-1)
    # Outside the lesion (18-22.5 mm), within reach of its pull, in the head.
    near = (distance > 23) & (distance < 40) & (fixed.get_fdata() > 0.05)
    assert near.sum() > 300
    size = {}
    for name in ("unmasked", "masked"):
        field = nib.load(tmp_path / name / "transform.nii.gz").get_fdata()
        size[name] = float(np.linalg.norm(field.reshape(fixed.shape + (3,)),
                                          axis=-1)[near].mean())
    assert size["unmasked"] > 2.0, size  # The lesion pulled (mm; the truth is 0).
    assert size["masked"] < 0.7 * size["unmasked"], size
    folds = {name: int(np.sum(nib.load(tmp_path / name / "jacobian.nii.gz").get_fdata()
                              <= 0)) for name in ("unmasked", "masked")}
    print(size, folds)
    assert folds["masked"] <= folds["unmasked"], folds


def test_bad_masks_give_one_error_line_before_anything_is_written(tmp_path, capsys):
    affine = fixtures.oblique_affine()
    image = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    scan = fixtures.write_nifti(tmp_path / "scan.nii.gz", image, affine, np.float32)
    nan = image.copy()
    nan[1, 2, 3] = np.nan
    write = lambda name, array, dtype: fixtures.write_nifti(tmp_path / name, array,
                                                            affine, dtype)
    bad = {
        "missing": tmp_path / "missing.nii.gz",
        "unreadable": tmp_path / "unreadable.nii.gz",
        "nan": write("nan.nii.gz", nan, np.float32),
        "byte": write("byte.nii.gz", (image > 0.5).astype(np.uint8) * 255,
                      np.uint8),
        "negative": write("negative.nii.gz", image - 0.5, np.float32),
        "zeros": write("zeros.nii.gz", np.zeros_like(image), np.uint8),
        "4d": write("4d.nii.gz", np.ones((8, 9, 10, 2)), np.uint8),
        "far": fixtures.write_nifti(tmp_path / "far.nii.gz", np.ones((4, 4, 4)),
                                    fixtures.oblique_affine(offset=(900, 0, 0)),
                                    np.uint8),
    }
    bad["unreadable"].write_text("not a NIfTI file")
    out = tmp_path / "out"
    cases = [
        ("fixed", "missing", [f"fixed mask {bad['missing']} not found"]),
        ("moving", "unreadable", ["could not read moving mask", str(bad["unreadable"])]),
        ("fixed", "nan", [f"fixed mask in {bad['nan']} has 1 non-finite"]),
        ("fixed", "byte", [f"fixed mask {bad['byte']} has values from 0 to 255",
                           "[0, 1]"]),
        ("moving", "negative", [f"moving mask {bad['negative']} has values from -0.",
                                "[0, 1]"]),
        ("fixed", "zeros", [f"fixed mask {bad['zeros']} is 0 everywhere"]),
        ("moving", "4d", [str(bad["4d"]), "2 volumes"]),
        ("fixed", "far", ["the fixed mask is 0 everywhere on the working grid"]),
    ]
    for side, name, pieces in cases:
        status, _, err = run_main(capsys, f"--moving={scan}", f"--fixed={scan}",
                                  f"--{side}-mask={bad[name]}", f"--out={out}",
                                  "--levels=1", "--steps=0")
        assert status == cli.EXIT_FAILURE, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        for piece in pieces:
            assert piece in err, (piece, err)
        assert not out.exists(), name
    # In a batch, a bad mask of the second pair is found before the first pair runs.
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"moving,fixed,fixed_mask,name\n{scan},{scan},,first\n{scan},"
                     f"{scan},{bad['byte']},second\n")
    status, _, err = run_main(capsys, f"--pairs={pairs}", f"--out={out}")
    assert status == cli.EXIT_FAILURE and "has values from 0 to 255" in err, err
    assert not out.exists()
    # Masks are for the optimisation: refused with a trained network, before it is
    # read.
    status, _, err = run_main(capsys, "--workdir=W", f"--moving={scan}",
                              f"--fixed={scan}", f"--fixed-mask={scan}",
                              f"--moving-mask={scan}", f"--out={out}")
    assert status == cli.EXIT_USAGE, err
    assert ("--fixed-mask, --moving-mask: only for the optimisation without a "
            "network") in err
    mask_pairs = tmp_path / "mask_pairs.csv"
    mask_pairs.write_text(f"moving,fixed,moving_mask\n{scan},{scan},{scan}\n")
    status, _, err = run_main(capsys, "--workdir=W", f"--pairs={mask_pairs}",
                              f"--out={out}")
    assert status == cli.EXIT_USAGE, err
    assert f"the moving_mask and fixed_mask columns of {mask_pairs}: only for" in err
    status, _, err = run_main(capsys, f"--pairs={mask_pairs}", f"--fixed-mask={scan}",
                              f"--out={out}")
    assert status == cli.EXIT_USAGE and "either --pairs or --moving/--fixed" in err
    assert not out.exists()


def test_the_pairs_file_takes_mask_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("moving,fixed,fixed_mask,name\na.nii,b.nii,m.nii,one\n"
                    "c.nii,d.nii,,two\n")
    first, second = pairs_lib.read_pairs_csv(str(path))
    assert first.fixed_mask == str(tmp_path / "m.nii") and first.moving_mask is None
    assert second.fixed_mask is None
    assert first.roles()["fixed mask"] == str(tmp_path / "m.nii")
    path.write_text("moving,fixed,mask\na.nii,b.nii,m.nii\n")
    with pytest.raises(ValueError, match="moving_mask, fixed_mask"):
        pairs_lib.read_pairs_csv(str(path))
