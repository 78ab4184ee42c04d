"""A tiny trained workdir and NIfTI files of a pair, for the register and plot tests."""

import os

import numpy as np

SIZE = (16, 16, 32)  # Non-cubic: catches swapped axes.
TRAIN_STEPS = 2


def tiny_config():
    """The demo config at toy size: a two-level VoxelMorph (set through the
    ``model.*`` keys), two training steps at a high learning rate (a visible
    displacement), one validation pair."""
    from ofg_jax.configs import demo
    config = demo.get_config()
    config.model.enc_features = (4, 8)
    config.model.dec_features = (8, 8)
    config.model.final_features = (4,)
    config.data.img_size = SIZE
    config.data.num_train = 2
    config.data.num_val = 1
    config.data.val_subjects = 1
    config.train.epochs = 2
    config.train.max_steps = TRAIN_STEPS
    config.train.log_every = 1
    config.train.learning_rate = 0.01
    config.ofg.steps = 2
    config.checkpoint.keep_best = 1
    return config


def oblique_affine(zooms=(1.2, 0.9, 2.0), angle=0.5, offset=(-10.0, 20.0, 5.5)):
    """A rotated, anisotropic voxel-to-world affine."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(zooms)
    affine[:3, 3] = offset
    return affine


def write_nifti(path, array, affine, dtype):
    """Writes ``array`` with qform (code 1) and sform (code 2) set to ``affine``."""
    import nibabel as nib
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=2)
    image.header["descrip"] = b"ofg_jax test"
    image.set_data_dtype(dtype)
    nib.save(image, path)
    return path


def write_pair(folder, affine=None) -> dict:
    """The synthetic validation pair as NIfTI files in ``folder``.

    The fixed image is stored as int16 with scaling (as scanners write them), the
    moving one as float32, the label maps as uint8.
    """
    from ofg_jax import data as data_lib
    config = tiny_config()
    pair = data_lib.create(config.data, config.seed).val_pairs()[0]
    affine = oblique_affine() if affine is None else affine
    os.makedirs(folder, exist_ok=True)
    join = lambda name: os.path.join(str(folder), name)
    return {
        "moving": write_nifti(join("moving.nii.gz"), pair.moving, affine, np.float32),
        "fixed": write_nifti(join("fixed.nii.gz"), pair.fixed, affine, np.int16),
        "moving_seg": write_nifti(join("moving_seg.nii.gz"), pair.moving_seg, affine,
                                  np.uint8),
        "fixed_seg": write_nifti(join("fixed_seg.nii.gz"), pair.fixed_seg, affine,
                                 np.uint8),
    }


# Scans of any geometry, and a stand-in network with a known smooth field.

PHANTOM_HALF_MM = 50.0  # mm per normalised phantom unit: a 100 mm box.


def random_affine(rng, shape, *, oblique=True):
    """A random voxel-to-world (RAS mm) affine over ``shape``: a random axis
    permutation and flips (RAS, LPS, LIA, ...), anisotropic voxels of 3.5-5 mm, an
    optional oblique rotation of up to 30 degrees, and a shifted origin, such
    that the grid's centre lies within 5 mm of the world origin."""
    from scipy.spatial.transform import Rotation
    permutation = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1, 1], 3)
    linear = permutation @ np.diag(rng.uniform(3.5, 5.0, 3))
    if oblique:
        axis = rng.normal(size=3)
        linear = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(
            rng.uniform(5, 30))).as_matrix() @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    center = rng.uniform(-5, 5, 3)
    affine[:3, 3] = center - linear @ ((np.asarray(shape) - 1) / 2)
    return affine


def render_phantom(shape, affine, world_to_phantom=None, *, blur_mm=3.0):
    """The smooth brain phantom (no noise, bias or contrast jitter) seen on a grid.

    The phantom's normalised coordinate 1 is :data:`PHANTOM_HALF_MM`; the voxel of
    world point ``p`` shows the phantom at ``world_to_phantom @ p`` (identity by
    default). Returns ``(image float32, labels int32)``; zero outside the head.
    """
    from ofg_jax.registration import geometry
    from ofg_jax.data import phantom
    anatomy = phantom.Anatomy.draw(np.random.default_rng(0))
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    matrix = np.asarray(affine) if world_to_phantom is None else (
        np.asarray(world_to_phantom) @ affine)
    points = geometry.apply_affine(matrix, voxels) / PHANTOM_HALF_MM
    spacing = float(np.mean(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    appearance = phantom.Appearance(contrast_jitter=0.0, bias=0.0, noise=0.0,
                                    partial_volume=blur_mm / spacing)
    return phantom.render(tuple(points[..., k].astype(np.float32) for k in range(3)),
                          anatomy, np.random.default_rng(1), appearance)


def smooth_field(shape, amplitude):
    """A smooth ``(*shape, 3)`` float32 field (voxels), zero on the grid's border."""
    axes = [np.linspace(0.0, np.pi, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    bump = amplitude * np.sin(x) * np.sin(y) * np.sin(z)
    return np.stack([bump * np.cos(2 * y), bump * np.cos(2 * z), bump * np.cos(2 * x)],
                    -1).astype(np.float32)


def smooth_network(img_size, *, amplitude=1.0, diffeomorphic=False):
    """A parameter-free stand-in for a trained network: whatever the pair, it
    predicts :func:`smooth_field` (diffeomorphic: the field is the velocity and the
    displacement its exponential, as the real networks' flow head does)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from ofg_jax.models.base import VELOCITY, RegistrationNetwork
    from ofg_jax.models.integrate import integrate_velocity

    class SmoothField(RegistrationNetwork):
        amplitude: float = 1.0

        def check_size(self):
            pass

        @nn.compact
        def __call__(self, x, train=False):
            self.check_input(x)
            field = jnp.broadcast_to(
                jnp.asarray(smooth_field(tuple(self.img_size), self.amplitude)),
                (x.shape[0],) + tuple(self.img_size) + (3,))
            if not self.diffeomorphic:
                return field
            self.sow("intermediates", VELOCITY, field)
            return integrate_velocity(field, self.int_steps)

    return SmoothField(img_size=tuple(img_size), amplitude=amplitude,
                       diffeomorphic=diffeomorphic)


def smooth_trained(img_size=(16, 16, 32), *, spacing=(6.0, 6.0, 6.0),
                   orientation="RAS", **network_options):
    """An ``inference.Trained`` around :func:`smooth_network`, with the tiny
    config's ``ofg.*`` settings and the given grid geometry."""
    from ofg_jax.registration.network import Trained
    config = tiny_config()
    config.data.img_size = tuple(img_size)
    config.data.spacing = tuple(spacing)
    config.data.orientation = orientation
    return Trained(config=config, model=smooth_network(img_size, **network_options),
                   variables={}, step=0, selection="test", img_size=tuple(img_size))


def write_scans(folder, seed):
    """Two brain scans of different shapes, voxel sizes and orientations.

    The smooth phantom and its labels on three random grids (oblique, 3.5-5 mm
    voxels): ``moving``, ``fixed`` (stored as int16, as scanners write) and
    ``second``, another contrast of the moving subject; each with ``*_seg``.
    Returns ``{name: path}``.
    """
    from ofg_jax.registration import geometry
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = {name: geometry.Grid(shape, random_affine(rng, shape))
             for name, shape in (("moving", (34, 40, 36)), ("fixed", (36, 38, 34)),
                                 ("second", (30, 34, 32)))}
    paths = {}
    for name, grid in grids.items():
        image, labels = render_phantom(grid.shape, grid.affine)
        if name == "second":  # Another contrast of the moving subject.
            image = np.where(labels > 0, 1.0 - image, 0.0)
        paths[name] = write_nifti(os.path.join(folder, f"{name}.nii.gz"), image,
                                  grid.affine,
                                  np.int16 if name == "fixed" else np.float32)
        paths[f"{name}_seg"] = write_nifti(
            os.path.join(folder, f"{name}_seg.nii.gz"), labels, grid.affine, np.uint8)
    return paths
