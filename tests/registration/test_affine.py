"""ofg_jax.registration.affine: recovering known affines of a smooth phantom, in world mm."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from experiments import affine_timing
from ofg_jax.registration import affine
from ofg_jax.registration import geometry
from ofg_jax import register_affine
from tests import registration_fixtures as fixtures

FIXED = geometry.centred_grid((40, 44, 40), (3.0, 3.0, 3.0), "RAS", (0.0, 0.0, 0.0))


def known_affine(rng):
    """Rotation 10-15 deg about a random axis, scaling 0.9-1.1 per axis, and a
    translation of 15-20 mm: the fixed -> moving world map."""
    axis = rng.normal(size=3)
    rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(
        rng.uniform(10, 15))).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(rng.uniform(0.9, 1.1, 3))
    direction = rng.normal(size=3)
    matrix[:3, 3] = direction / np.linalg.norm(direction) * rng.uniform(15, 20)
    return matrix


@pytest.fixture(scope="module")
def fixed():
    return fixtures.render_phantom(FIXED.shape, FIXED.affine)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_a_known_affine_to_a_millimetre(fixed, seed, record_property):
    rng = np.random.default_rng(seed)
    matrix = known_affine(rng)
    # The moving scan: another grid (voxel size, orientation, field of view)
    # showing the phantom moved by the inverse map, so that moving(M p) = fixed(p).
    moving_grid = geometry.centred_grid((48, 44, 52), (3.3, 3.6, 3.1), "LPI",
                                        (4.0, -3.0, 2.0))
    moving, _ = fixtures.render_phantom(moving_grid.shape, moving_grid.affine,
                                        np.linalg.inv(matrix))
    assert np.abs(moving[[0, -1]]).max() == 0  # The object lies inside.
    found = register_affine(moving, fixed[0], moving_affine=moving_grid.affine,
                            fixed_affine=FIXED.affine)
    points = geometry.apply_affine(FIXED.affine, np.argwhere(fixed[1] > 0))
    error = np.linalg.norm(geometry.apply_affine(found, points)
                           - geometry.apply_affine(matrix, points), axis=-1)
    initial = np.linalg.norm(geometry.apply_affine(matrix, points) - points, axis=-1)
    record_property("error_mm", (float(error.mean()), float(error.max())))
    print(f"seed {seed}: {affine.describe(matrix)}; displacement {initial.mean():.1f} "
          f"mm -> error {error.mean():.3f} mm mean, {error.max():.3f} max")
    assert initial.mean() > 10
    assert error.mean() < 1.0


def test_mse_and_an_initial_matrix(fixed):
    # A pure shift of the same image: MSE applies; starting at the answer stays there.
    matrix = np.eye(4)
    matrix[:3, 3] = (6.0, -4.0, 3.0)
    moving, _ = fixtures.render_phantom(FIXED.shape, FIXED.affine, np.linalg.inv(matrix))
    options = dict(moving_affine=FIXED.affine, fixed_affine=FIXED.affine,
                   similarity="mse", levels=(6.0,), steps=(100,))
    found = register_affine(moving, fixed[0], **options)
    np.testing.assert_allclose(found[:3, 3], matrix[:3, 3], atol=0.5)
    np.testing.assert_allclose(found[:3, :3], np.eye(3), atol=0.02)
    again = register_affine(moving, fixed[0], initial=found, learning_rate=0.05,
                            **options)
    np.testing.assert_allclose(again, found, atol=0.2)


def test_pyramid_pooling_keeps_the_world_position():
    image = np.zeros((12, 10, 9), np.float32)
    image[4:8, 2:6, 2:6] = 1.0  # Whole blocks: the same centre of mass.
    affine_ = geometry.centred_grid(image.shape, (1.0, 2.0, 3.0), "PSR", (5, 6, 7)).affine
    coarse, coarse_affine = affine.pool(image, affine_, 2)
    assert coarse.shape == (6, 5, 4)
    np.testing.assert_allclose(affine.center_of_mass(coarse, coarse_affine)[0],
                               affine.center_of_mass(image, affine_)[0], atol=1e-9)


def test_bad_inputs_are_named():
    image = np.ones((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="image is constant"):
        register_affine(image, image)
    with pytest.raises(ValueError, match="similarity must be one of"):
        register_affine(image, image, similarity="mi")
    with pytest.raises(ValueError, match=r"moving must be a 3D volume, got shape"):
        register_affine(image[0], image)
    image[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="fixed has non-finite"):
        register_affine(np.ones((8, 8, 8)), image)


def test_the_timing_experiment_reports_each_seed():
    rows = affine_timing.main(["--shape", "48,56,64", "--spacing", "3", "--seeds", "1",
                               "--repeats", "1"])
    assert [row["seed"] for row in rows] == [0]
    assert rows[0]["motion_mm"] > 10
    assert rows[0]["error_mm"] < 1.0  # Recovered: far below the motion.
    assert rows[0]["first_s"] > 0 and rows[0]["median_s"] > 0
