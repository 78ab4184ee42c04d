"""``ofg_jax.apply`` and the inverse transform: a saved registration carried over to
other images of the moving subject, checked against SimpleITK.

The registrations here come from a stand-in network with a known smooth field
(``registration_fixtures.smooth_trained``), so no training is needed."""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ofg_jax import apply
from ofg_jax import cli
from ofg_jax.registration import geometry
from ofg_jax.registration import pairs
from ofg_jax.registration import scans as scans_lib
from ofg_jax.registration import transforms
from tests import registration_fixtures as fixtures

sitk = pytest.importorskip("SimpleITK")

# The trained fixture's grid and geometry (16x16x32 at 6 mm, RAS), so that the
# compiled functions are shared with test_register.
NETWORK = fixtures.SIZE


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    return fixtures.write_scans(str(tmp_path_factory.mktemp("scans")), seed=5)


@pytest.fixture(scope="module")
def registered(scans, tmp_path_factory):
    """A diffeomorphic registration with affine pre-alignment and the inverse."""
    out = str(tmp_path_factory.mktemp("registration"))
    trained = fixtures.smooth_trained(NETWORK, amplitude=1.5, diffeomorphic=True)
    files = pairs.PairFiles("pair", scans["moving"], scans["fixed"],
                                   scans["moving_seg"], scans["fixed_seg"])
    result = pairs.register_files(trained, files, out, affine=True,
                                         inverse=True)
    return out, result


def run_apply(capsys, *args):
    status = apply.main(["apply", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def read(path):
    return np.asarray(nib.load(path).dataobj)


def test_outputs_and_simpleitk_agree(registered, scans):
    out, result = registered
    assert sorted(os.listdir(out)) == sorted(
        ["warped.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz", "transform.nii.gz",
         "affine.mat", "inverse.nii.gz"])  # No disp.nii.gz off the training grid.
    fixed = nib.load(scans["fixed"])
    for name in ("warped", "warped_seg", "jacobian"):
        image = nib.load(os.path.join(out, f"{name}.nii.gz"))
        assert image.shape == fixed.shape
        np.testing.assert_array_equal(image.affine, fixed.affine)
    assert np.abs(result["disp"]).max() > 1.0  # A real deformation (voxels).
    transform = sitk.CompositeTransform([
        sitk.ReadTransform(os.path.join(out, "affine.mat")),
        sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(
            os.path.join(out, "transform.nii.gz")), sitk.sitkVectorFloat64))])
    theirs = sitk.GetArrayFromImage(sitk.Resample(
        sitk.ReadImage(scans["moving"], sitk.sitkFloat32), sitk.ReadImage(scans["fixed"]),
        transform, sitk.sitkLinear, 0.0)).transpose(2, 1, 0)
    warped = read(os.path.join(out, "warped.nii.gz"))
    print(f"SimpleITK vs warped.nii.gz: max abs difference "
          f"{np.abs(theirs - warped).max():.2e} (image max {warped.max():.2f})")
    assert np.count_nonzero(warped > 0.1) > 2000
    np.testing.assert_allclose(warped, theirs, atol=1e-5)


def test_apply_reproduces_the_registration_outputs(registered, scans, tmp_path,
                                                   capsys):
    out, _ = registered
    status, stdout, stderr = run_apply(
        capsys, f"--registration={out}", f"--image={scans['moving_seg']}",
        f"--out={tmp_path / 'seg.nii.gz'}", "--interpolation=nearest")
    assert status == 0, stderr
    assert f"wrote {tmp_path / 'seg.nii.gz'}" in stdout
    applied = nib.load(tmp_path / "seg.nii.gz")
    np.testing.assert_array_equal(applied.affine, nib.load(scans["fixed"]).affine)
    assert np.issubdtype(applied.get_data_dtype(), np.integer)
    assert applied.header.get_intent()[0] == "none" and applied.ndim == 3
    warped_seg = read(os.path.join(out, "warped_seg.nii.gz"))
    assert len(np.unique(warped_seg)) > 10
    np.testing.assert_array_equal(np.asarray(applied.dataobj), warped_seg)

    status, _, stderr = run_apply(capsys, f"--registration={out}",
                                  f"--image={scans['moving']}",
                                  f"--out={tmp_path / 'sub' / 'warped.nii.gz'}")
    assert status == 0, stderr
    np.testing.assert_array_equal(read(tmp_path / "sub" / "warped.nii.gz"),
                                  read(os.path.join(out, "warped.nii.gz")))

    # Another contrast of the moving subject, on its own grid: the same anatomy.
    status, _, stderr = run_apply(capsys, f"--registration={out}",
                                  f"--image={scans['second']}",
                                  f"--out={tmp_path / 'second.nii.gz'}")
    assert status == 0, stderr
    second = read(tmp_path / "second.nii.gz")
    expected = np.where(warped_seg > 0, 1.0 - read(os.path.join(out, "warped.nii.gz")),
                        0.0)
    inside = ndimage.binary_erosion(warped_seg > 0, iterations=2)  # Off the edges.
    assert inside.sum() > 1000
    difference = float(np.mean(np.abs(second - expected)[inside]))
    print(f"second contrast vs 1 - warped inside the head: {difference:.4f} mean")
    assert difference < 0.03


def test_inverse_composed_with_the_forward_transform_is_identity(registered, scans,
                                                                 tmp_path, capsys):
    out, result = registered
    inverse = nib.load(os.path.join(out, "inverse.nii.gz"))
    moving = nib.load(scans["moving"])
    assert inverse.shape == moving.shape + (1, 3)
    np.testing.assert_array_equal(inverse.affine, moving.affine)
    assert "exact" in result["inverse_method"]
    forward = sitk.CompositeTransform([
        sitk.ReadTransform(os.path.join(out, "affine.mat")),
        sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(
            os.path.join(out, "transform.nii.gz")), sitk.sitkVectorFloat64))])
    backward = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(
        os.path.join(out, "inverse.nii.gz")), sitk.sitkVectorFloat64))
    labels = read(scans["moving_seg"])
    voxels = np.argwhere(labels > 0)[::7]
    points = geometry.apply_affine(moving.affine, voxels) * geometry.RAS_TO_LPS
    errors = np.array([np.linalg.norm(np.array(forward.TransformPoint(
        backward.TransformPoint(tuple(p)))) - p) for p in points])
    moved = np.linalg.norm(result["inverse_lps"][tuple(voxels.T)], axis=-1)
    assert moved.mean() > 2.0
    assert errors.mean() < 0.1 and errors.max() < 0.5
    assert result["inverse_error_mm"][0] < 0.1

    # The fixed subject's labels onto the moving grid, through the inverse.
    status, _, stderr = run_apply(capsys, f"--registration={out}", "--inverse",
                                  f"--image={scans['fixed_seg']}",
                                  "--interpolation=nearest",
                                  f"--out={tmp_path / 'back.nii.gz'}")
    assert status == 0, stderr
    back = nib.load(tmp_path / "back.nii.gz")
    assert back.shape == moving.shape
    np.testing.assert_array_equal(back.affine, moving.affine)
    print(f"inverse o forward: {errors.mean():.4f} mm mean, {errors.max():.4f} mm max "
          f"(SimpleITK); logged {result['inverse_error_mm']}; mean motion "
          f"{moved.mean():.2f} mm")


def test_fixed_point_inverse_of_a_non_diffeomorphic_field(scans):
    trained = fixtures.smooth_trained(NETWORK, amplitude=1.5)
    volume = lambda key, labels=False: transforms.read_volume(scans[key], key,
                                                                labels=labels)
    result = scans_lib.register_volumes(
        trained, volume("moving"), volume("fixed"), volume("moving_seg", True),
        inverse=True)
    assert "fixed-point" in result["inverse_method"]
    mean, largest = result["inverse_error_mm"]
    print(f"fixed-point inverse: {mean:.2e} mm mean, {largest:.2e} mm max")
    assert mean < 0.05 and largest < 0.5
    assert any(line.startswith("inverse (fixed-point") for line in result["log"])


def test_errors_are_one_line_and_write_nothing(registered, scans, tmp_path, capsys):
    out, _ = registered
    unreadable = tmp_path / "bad.nii.gz"
    unreadable.write_text("not a NIfTI file")
    series = fixtures.write_nifti(tmp_path / "4d.nii.gz", np.zeros((5, 6, 7, 2)),
                                  np.eye(4), np.float32)
    nan = np.ones((5, 6, 7), np.float32)
    nan[1, 2, 3] = np.nan
    non_finite = fixtures.write_nifti(tmp_path / "nan.nii.gz", nan, np.eye(4),
                                      np.float32)
    target = tmp_path / "result.nii.gz"
    cases = [
        ([f"--registration={tmp_path / 'none'}", f"--image={scans['moving']}"],
         ["registration folder", "not found"]),
        ([f"--registration={tmp_path}", f"--image={scans['moving']}"],
         [str(tmp_path / "transform.nii.gz"), "not found"]),
        ([f"--registration={out}", f"--image={unreadable}"],
         ["could not read image", str(unreadable)]),
        ([f"--registration={out}", f"--image={series}"],
         [str(series), "2 volumes"]),
        ([f"--registration={out}", f"--image={non_finite}"],
         [str(non_finite), "1 non-finite"]),
    ]
    for args, pieces in cases:
        status, _, stderr = run_apply(capsys, *args, f"--out={target}")
        assert status == cli.EXIT_FAILURE, stderr
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        for piece in pieces:
            assert piece in stderr, (piece, stderr)
    status, _, stderr = run_apply(capsys, f"--registration={out}",
                                  f"--image={scans['moving']}", f"--out={tmp_path}")
    assert status == cli.EXIT_FAILURE and "is a folder" in stderr
    status, _, stderr = run_apply(capsys, f"--registration={out}",
                                  f"--out={target}")
    assert status == cli.EXIT_USAGE and "are required" in stderr
    assert not target.exists()


def test_a_diffeomorphic_network_exposes_its_velocity():
    import jax
    from ofg_jax import models
    from ofg_jax.registration.network import Trained
    from ofg_jax.models.integrate import integrate_velocity
    size = (16, 16, 16)
    model = models.create("voxelmorph", size, diffeomorphic=True, enc_features=(4, 8),
                          dec_features=(8, 8), final_features=(4,))
    # Random weights of the right shapes (model.init compiles slowly on CPU), and a
    # visible velocity: the flow head's bias set to a shift of up to 0.7 voxels.
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            np.zeros((1, *size, 2), np.float32))
    variables = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(s.dtype),
                             shapes)
    variables["params"]["flow"]["bias"] = np.array([0.7, -0.4, 0.2], np.float32)
    trained = Trained(config=fixtures.tiny_config(), model=model, variables=variables,
                      step=0, selection="test", img_size=size)
    moving, fixed = (rng.random(size).astype(np.float32) for _ in range(2))
    result = scans_lib.register_arrays(trained, moving, fixed)
    assert np.abs(result["velocity"]).max() > 0.1
    np.testing.assert_allclose(
        integrate_velocity(result["velocity"][None], model.int_steps)[0],
        result["disp"], atol=1e-6)


def test_mgz_inputs_and_outputs_on_their_grid(scans, tmp_path):
    fixed = nib.load(scans["fixed"])
    mgz = str(tmp_path / "fixed.mgz")
    nib.save(nib.MGHImage(fixed.get_fdata(dtype=np.float32), fixed.affine), mgz)
    files = pairs.PairFiles("mgz", scans["moving"], mgz)
    result = pairs.register_files(fixtures.smooth_trained(NETWORK), files,
                                         str(tmp_path / "out"))
    warped = nib.load(tmp_path / "out" / "warped.nii.gz")
    np.testing.assert_allclose(warped.affine, nib.load(mgz).affine, atol=1e-4)
    loaded = transforms.load_transform(str(tmp_path / "out"))
    np.testing.assert_array_equal(loaded.field_lps, result["transform"].field_lps)
    assert loaded.matrix is None
