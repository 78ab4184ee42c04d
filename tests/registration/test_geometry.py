"""ofg_jax.registration.geometry and warp.sample against SciPy and SimpleITK (the independent
references): resampling between grids of random orientations and voxel sizes,
the ITK displacement-field and affine files, the network's field of view."""

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from ofg_jax.registration import geometry
from ofg_jax import sample
from ofg_jax import warp
from tests import registration_fixtures as fixtures

sitk = pytest.importorskip("SimpleITK")

SHAPE_A, SHAPE_B = (34, 40, 30), (30, 36, 38)
# Jitted once: eager calls would compile every operation on its own.
sample_jit = jax.jit(sample, static_argnames="order")


def to_sitk(array, affine):
    """A SimpleITK image of ``array`` on the grid of a NIfTI ``affine`` (RAS -> LPS)."""
    image = sitk.GetImageFromArray(np.asarray(array, np.float32).transpose(2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((lps / spacing).ravel()))
    image.SetOrigin(tuple(affine[:3, 3] * geometry.RAS_TO_LPS))
    return image


def from_sitk(image):
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def random_grids(seed):
    """Two grids of different shapes, voxel sizes and orientations (RAS, LPS,
    permuted, oblique: drawn at random) over the same world region."""
    rng = np.random.default_rng(seed)
    return (geometry.Grid(SHAPE_A, fixtures.random_affine(rng, SHAPE_A,
                                                          oblique=seed % 2 == 0)),
            geometry.Grid(SHAPE_B, fixtures.random_affine(rng, SHAPE_B)))


def test_sample_matches_scipy_map_coordinates_and_warp():
    rng = np.random.default_rng(0)
    image = rng.random((7, 9, 8, 2)).astype(np.float32)
    coords = rng.uniform(-1.5, 9.5, (5, 4, 3)).astype(np.float32)  # Outside too.
    expected = np.stack([ndimage.map_coordinates(
        image[..., c].astype(np.float64), np.moveaxis(coords, -1, 0), order=1,
        mode="grid-constant", cval=0.0) for c in range(2)], -1)
    np.testing.assert_allclose(sample_jit(image, coords), expected, atol=2e-6)
    labels = rng.integers(0, 5, (7, 9, 8)).astype(np.int32)
    near = (np.round(coords) + rng.uniform(-0.4, 0.4, coords.shape)).astype(np.float32)
    inside = np.all((np.round(near) >= 0) & (np.round(near) < [7, 9, 8]), -1)
    got = np.asarray(sample_jit(labels, near, order=0))
    assert got.dtype == np.int32 and inside.sum() > 5 and (~inside).sum() > 0
    index = np.round(near[inside]).astype(int)
    np.testing.assert_array_equal(got[inside], labels[tuple(index.T)])
    np.testing.assert_array_equal(got[~inside], 0)
    # warp is sample at grid + disp, derivatives included.
    disp = rng.normal(0, 1.5, (7, 9, 8, 3)).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (7, 9, 8)], indexing="ij"), -1)
    np.testing.assert_array_equal(jax.jit(warp)(image, disp),
                                  sample_jit(image, grid + disp))
    loss = jax.jit(lambda c: jnp.sum(sample(image[..., 0], c) ** 2))
    step = np.zeros_like(coords)
    step[1, 2, 0] = 1e-2
    numeric = (loss(coords + step) - loss(coords - step)) / 2e-2
    assert float(jax.grad(loss)(coords)[1, 2, 0]) == pytest.approx(float(numeric),
                                                                   rel=1e-2, abs=1e-3)
    with pytest.raises(ValueError, match=r"coords must have shape \(\*T, N\)"):
        sample(image, coords[..., :1])
    with pytest.raises(ValueError, match="does not match coords with 2 components"):
        sample(image, coords[..., :2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resample_between_random_grids_matches_simpleitk(seed):
    grid_a, grid_b = random_grids(seed)
    image, _ = fixtures.render_phantom(grid_a.shape, grid_a.affine)
    assert image.max() > 0.5 and np.abs(image[[0, -1]]).max() == 0  # Zero border.
    ours = np.asarray(geometry.resample(image, grid_a.affine, grid_b))
    reference = from_sitk(sitk.Resample(to_sitk(image, grid_a.affine),
                                        to_sitk(np.zeros(grid_b.shape), grid_b.affine),
                                        sitk.Transform(), sitk.sitkLinear, 0.0))
    assert np.count_nonzero(reference > 0.1) > 1000  # The object lies in both grids.
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # The same anatomy rendered on grid b: equal up to interpolation.
    direct, _ = fixtures.render_phantom(grid_b.shape, grid_b.affine)
    assert np.mean(np.abs(ours - direct)) < 0.03


def test_itk_files_are_what_simpleitk_reads(tmp_path):
    grid_a, grid_b = random_grids(3)
    rng = np.random.default_rng(3)
    field = (rng.normal(0, 1, (4, 4, 4, 3)) * 4).astype(np.float32)
    field_lps = np.asarray(jax.image.resize(field, grid_b.shape + (3,), "cubic"))
    matrix = fixtures.random_affine(rng, (1, 1, 1))  # Any invertible map.
    matrix[:3, :3] /= np.linalg.norm(matrix[:3, :3], axis=0).mean()
    matrix[:3, 3] = rng.uniform(-5, 5, 3)
    reference = nib.Nifti1Image(np.zeros(grid_b.shape, np.int16), grid_b.affine)
    field_path, affine_path = str(tmp_path / "field.nii.gz"), str(tmp_path / "a.mat")
    geometry.write_itk_displacement(field_path, field_lps, reference)
    geometry.write_itk_affine(affine_path, matrix)

    read_field, image = geometry.read_itk_displacement(field_path)
    np.testing.assert_array_equal(read_field, field_lps)
    assert image.shape == grid_b.shape + (1, 3)
    assert image.header.get_intent()[0] == "vector"
    np.testing.assert_array_equal(geometry.read_itk_affine(affine_path), matrix)

    # SimpleITK maps the fixed point p (LPS) to M(p + u(p)).
    itk_field = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(field_path), sitk.sitkVectorFloat64))
    itk_affine = sitk.ReadTransform(affine_path)
    voxels = rng.integers(0, grid_b.shape, (20, 3))
    points = geometry.apply_affine(grid_b.affine, voxels)
    expected = geometry.apply_affine(matrix, points + field_lps[tuple(voxels.T)]
                                     * geometry.RAS_TO_LPS)
    composite = sitk.CompositeTransform([itk_affine, itk_field])
    for point, moved in zip(points, expected):
        got = np.array(composite.TransformPoint(tuple(point * geometry.RAS_TO_LPS)))
        np.testing.assert_allclose(got * geometry.RAS_TO_LPS, moved, atol=1e-4)

    # And resampling through both: SimpleITK and sample_through agree.
    image_a, _ = fixtures.render_phantom(grid_a.shape, grid_a.affine)
    ours = np.asarray(geometry.sample_through(image_a, grid_a.affine, field_lps,
                                              grid_b.affine, matrix=matrix))
    theirs = from_sitk(sitk.Resample(to_sitk(image_a, grid_a.affine),
                                     sitk.ReadImage(field_path), composite,
                                     sitk.sitkLinear, 0.0))
    assert np.count_nonzero(theirs > 0.1) > 1000
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a NIfTI file")
    with pytest.raises(ValueError, match=f"could not read displacement field {bad}"):
        geometry.read_itk_displacement(str(bad))
    scalar = tmp_path / "scalar.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.eye(4)), scalar)
    with pytest.raises(ValueError, match=r"\(3, 4, 5\); an ITK displacement field"):
        geometry.read_itk_displacement(str(scalar))
    with pytest.raises(FileNotFoundError, match="affine transform .* not found"):
        geometry.read_itk_affine(str(tmp_path / "none.mat"))
    with pytest.raises(ValueError, match="could not read affine transform"):
        geometry.read_itk_affine(str(bad))


def test_field_of_view_is_cropped_or_padded_never_rescaled():
    fixed = geometry.centred_grid((40, 20, 30), (2.0, 3.0, 1.0), "LPS", (10, -20, 5))
    grid, message = geometry.fit_field_of_view(fixed, (16, 32, 30), (4.0, 2.0, 1.0),
                                               "RAS")
    assert grid.shape == (16, 32, 30) and grid.axcodes == "RAS"
    np.testing.assert_allclose(grid.spacing, (4.0, 2.0, 1.0))
    np.testing.assert_allclose(grid.center, fixed.center, atol=1e-9)
    # Fixed: 80 x 60 x 30 mm; network: 64 x 64 x 30 mm.
    assert "R: cropped by 16.0 mm" in message and "A: padded by 4.0 mm" in message
    assert "S: fits" in message and "(the fixed image centre)" in message
    moved, message = geometry.fit_field_of_view(fixed, (16, 32, 30), (4.0, 2.0, 1.0),
                                                "RAS", center=(1.0, 2.0, 3.0))
    np.testing.assert_allclose(moved.center, (1.0, 2.0, 3.0), atol=1e-9)
    assert "(1.0, 2.0, 3.0) mm RAS (as given)" in message
    for codes in ("LIA", "PSR"):
        assert geometry.centred_grid((3, 4, 5), (1, 2, 3), codes, (0, 0, 0)
                                     ).axcodes == codes
    with pytest.raises(ValueError, match="'RAX'"):
        geometry.orientation_matrix("RAX")
