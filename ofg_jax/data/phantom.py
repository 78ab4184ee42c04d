"""A procedural brain-like phantom: an atlas and smooth deformations of it.

The anatomy is defined analytically in normalised coordinates ``p`` in ``[-1, 1]^3``
(array axis 0 runs left -> right, axis 1 posterior -> anterior, axis 2 inferior ->
superior), so it can be rendered on any grid. Structures are ellipsoids (some bent),
and the cerebral and cerebellar cortices are folded: the zero set of a band-limited
random field on the surface traces a network of sulci, lined by a cortical ribbon of
constant thickness over the white matter.

A subject is the atlas seen through a smooth transformation
``T(x) = scale * x + shift + u(x)``: its labels and intensities at ``x`` are the
atlas's at ``T(x)``. ``u`` is a Gaussian radial-basis field on a coarse control grid,
small enough that ``T`` stays invertible, so the subject can be registered to the
atlas by a smooth displacement. Images get per-tissue contrast jitter, a texture
that moves with the anatomy, partial-volume blur, a smooth multiplicative bias field
and Gaussian noise; they are skull-stripped (zero outside the head) and in [0, 1].
"""

import dataclasses

import numpy as np
from scipy import ndimage

# label: (name, T1-like mean intensity)
STRUCTURES = {
    1: ("Left-Cerebral-White-Matter", 0.80),
    2: ("Left-Cerebral-Cortex", 0.50),
    3: ("Left-Lateral-Ventricle", 0.12),
    4: ("Left-Thalamus", 0.68),
    5: ("Left-Caudate", 0.58),
    6: ("Left-Putamen", 0.62),
    7: ("Left-Pallidum", 0.72),
    8: ("Left-Hippocampus", 0.46),
    9: ("Left-Amygdala", 0.52),
    10: ("Left-Cerebellum-White-Matter", 0.76),
    11: ("Left-Cerebellum-Cortex", 0.52),
    12: ("Right-Cerebral-White-Matter", 0.80),
    13: ("Right-Cerebral-Cortex", 0.50),
    14: ("Right-Lateral-Ventricle", 0.12),
    15: ("Right-Thalamus", 0.68),
    16: ("Right-Caudate", 0.58),
    17: ("Right-Putamen", 0.62),
    18: ("Right-Pallidum", 0.72),
    19: ("Right-Hippocampus", 0.46),
    20: ("Right-Amygdala", 0.52),
    21: ("Right-Cerebellum-White-Matter", 0.76),
    22: ("Right-Cerebellum-Cortex", 0.52),
    23: ("Brain-Stem", 0.70),
    24: ("3rd-Ventricle", 0.12),
    25: ("4th-Ventricle", 0.12),
    26: ("CSF", 0.18),
}
LABELS = tuple(sorted(STRUCTURES))
RIGHT = 11  # right-hemisphere label = left label + RIGHT

# Paired deep structures, drawn in this order (later ones win):
# left label, centre (right side; the left one is mirrored), radii, bend.
# ``bend`` curves the ellipsoid along axis 1: its axis-2 centre moves by
# ``bend * (p1 - c1)**2``.
_DEEP = (
    (4, (0.10, -0.08, 0.06), (0.085, 0.14, 0.09), 0.0),     # thalamus
    (5, (0.19, 0.18, 0.20), (0.05, 0.13, 0.09), -1.0),      # caudate
    (6, (0.30, 0.07, 0.07), (0.055, 0.17, 0.10), 0.0),      # putamen
    (7, (0.235, 0.03, 0.05), (0.035, 0.09, 0.06), 0.0),     # pallidum
    (8, (0.30, -0.22, -0.15), (0.06, 0.18, 0.06), 1.5),     # hippocampus
    (9, (0.29, 0.05, -0.21), (0.065, 0.07, 0.065), 0.0),    # amygdala
    (3, (0.12, 0.0, 0.24), (0.07, 0.38, 0.09), -0.8),       # lateral ventricle
)
_CEREBRUM = ((0.0, 0.02, 0.12), (0.78, 0.88, 0.72))
_CORE = ((0.0, 0.0, 0.10), (0.30, 0.50, 0.24))  # where the hemispheres join
_CEREBELLUM = ((0.24, -0.55, -0.52), (0.30, 0.28, 0.22))
_BRAINSTEM = ((0.0, -0.12, -0.45), (0.13, 0.14, 0.45))
_THIRD_VENTRICLE = ((0.0, -0.05, 0.06), (0.025, 0.15, 0.11))
_FOURTH_VENTRICLE = ((0.0, -0.33, -0.45), (0.05, 0.06, 0.08))
# Cortical folding, in units of the normalised cerebral radius.
_SULCUS_DEPTH = 0.25
_SULCUS_WIDTH = 0.30   # of the unit-std folding field
_CORTEX_THICKNESS = 0.12


@dataclasses.dataclass(frozen=True)
class Waves:
    """A band-limited random field ``sum_j amp_j cos(k_j . p + phase_j)`` of unit std."""

    k: np.ndarray       # (J, 3) wave vectors, radians per normalised unit
    phase: np.ndarray   # (J,)
    amp: np.ndarray     # (J,)

    @classmethod
    def draw(cls, rng: np.random.Generator, num: int, k_min: float, k_max: float):
        direction = rng.normal(size=(num, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        k = direction * rng.uniform(k_min, k_max, size=(num, 1))
        amp = np.full(num, np.sqrt(2.0 / num))  # unit variance for random phases
        return cls(k.astype(np.float32), rng.uniform(0, 2 * np.pi, num).astype(np.float32),
                   amp.astype(np.float32))

    def __call__(self, p: tuple[np.ndarray, ...], where: np.ndarray | None = None
                 ) -> np.ndarray:
        """The field at points ``p``; only evaluated ``where`` true (0 elsewhere)."""
        if where is not None:
            out = np.zeros(p[0].shape, np.float32)
            out[where] = self(tuple(np.asarray(q)[where] for q in p))
            return out
        out = np.zeros(p[0].shape, np.float32)
        arg = np.empty(p[0].shape, np.float32)
        for k, phase, amp in zip(self.k, self.phase, self.amp):
            np.multiply(p[0], k[0], out=arg)
            arg += k[1] * p[1]
            arg += k[2] * p[2] + phase
            np.cos(arg, out=arg)
            arg *= amp
            out += arg
        return out


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """The random parts of the atlas: cortical folding patterns and tissue texture."""

    cortex_folds: Waves
    cerebellum_folds: Waves
    texture: Waves

    @classmethod
    def draw(cls, rng: np.random.Generator):
        return cls(cortex_folds=Waves.draw(rng, 24, 5.0, 8.0),
                   cerebellum_folds=Waves.draw(rng, 16, 14.0, 20.0),
                   texture=Waves.draw(rng, 24, 12.0, 30.0))


@dataclasses.dataclass(frozen=True)
class Appearance:
    """How an image is rendered (intensities in [0, 1]; the blur in voxels)."""

    contrast_jitter: float = 0.04   # std of the per-tissue relative mean shift
    texture: float = 0.04           # relative amplitude of the anatomical texture
    partial_volume: float = 0.6     # std of the blur, in voxels
    bias: float = 0.1               # std of the log bias field
    noise: float = 0.02             # std of the additive noise


@dataclasses.dataclass(frozen=True)
class Deformation:
    """Size of the random subject transformation (normalised units: 1 = half the box)."""

    warp: float = 0.05     # rms length of the smooth displacement u inside the brain
    scale: float = 0.04    # std of the per-axis scale around 1
    shift: float = 0.02    # std of the per-axis shift
    control_points: int = 5


def _ellipsoid(p, centre, radii, bend=0.0):
    """Squared ellipsoidal radius of points ``p`` (< 1 inside)."""
    c0, c1, c2 = centre
    y = p[1] - c1
    z = p[2] - c2
    if bend:
        z -= bend * y * y
    out = np.square((p[0] - c0) * (1.0 / radii[0]))
    out += np.square(y * (1.0 / radii[1]))
    out += np.square(z * (1.0 / radii[2]))
    return out


def segment(p: tuple[np.ndarray, ...], anatomy: Anatomy) -> np.ndarray:
    """Atlas labels ``int32`` at points ``p = (p0, p1, p2)`` (arrays of one shape)."""
    shape = np.broadcast_shapes(*(q.shape for q in p))
    p = tuple(np.broadcast_to(q, shape).ravel() for q in p)
    mirrored = (np.abs(p[0]), p[1], p[2])
    side = np.where(p[0] < 0, 0, RIGHT).astype(np.int32)
    labels = np.zeros(p[0].shape, np.int32)

    r_cerebrum = np.sqrt(_ellipsoid(p, *_CEREBRUM))
    # The folding fields only matter near the cortices; evaluating them there only
    # saves most of the time.
    folds = anatomy.cortex_folds(
        p, where=(r_cerebrum > 1.0 - _CORTEX_THICKNESS - _SULCUS_DEPTH) & (r_cerebrum < 1.0))
    r_cerebellum = np.sqrt(_ellipsoid(mirrored, *_CEREBELLUM))
    cerebellum_folds = anatomy.cerebellum_folds(p, where=r_cerebellum < 1.0)
    brainstem = _ellipsoid(p, *_BRAINSTEM)

    head = (r_cerebrum < 1.06) | (r_cerebellum < 1.12) | (brainstem < 1.3)
    labels[head] = 26
    # Sulci follow the zero set of the folding field, a network of curves on the
    # surface; the cortex is a ribbon of constant thickness lining them.
    depth = _SULCUS_DEPTH * np.maximum(1.0 - np.abs(folds) / _SULCUS_WIDTH, 0.0)
    cerebrum = r_cerebrum < 1.0 - depth
    white = cerebrum & (r_cerebrum < 1.0 - _CORTEX_THICKNESS - depth)
    labels[cerebrum] = 2 + side[cerebrum]
    labels[white] = 1 + side[white]
    midline = np.flatnonzero(cerebrum & (np.abs(p[0]) < 0.025))
    fissure = _ellipsoid(tuple(q[midline] for q in p), *_CORE) > 1.0
    labels[midline[fissure]] = 26

    folia = 0.12 * np.maximum(1.0 - np.abs(cerebellum_folds) / _SULCUS_WIDTH, 0.0)
    cerebellum = r_cerebellum < 1.0 - folia
    cerebellum_white = cerebellum & (r_cerebellum < 0.6 - 0.15 * cerebellum_folds)
    labels[cerebellum] = 11 + side[cerebellum]
    labels[cerebellum_white] = 10 + side[cerebellum_white]
    labels[brainstem < 1.0] = 23

    # The small central structures are tested on the central points only.
    centre = np.flatnonzero((mirrored[0] < 0.45) & (np.abs(p[1]) < 0.6)
                            & (np.abs(p[2]) < 0.6))
    centre_p = tuple(q[centre] for q in p)
    centre_mirrored = (np.abs(centre_p[0]), centre_p[1], centre_p[2])
    for label, centre_xyz, radii, bend in _DEEP:
        inside = centre[_ellipsoid(centre_mirrored, centre_xyz, radii, bend) < 1.0]
        labels[inside] = label + side[inside]
    labels[centre[_ellipsoid(centre_p, *_THIRD_VENTRICLE) < 1.0]] = 24
    labels[centre[_ellipsoid(centre_p, *_FOURTH_VENTRICLE) < 1.0]] = 25
    return labels.reshape(shape)


def _axes(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Normalised coordinates in [-1, 1] along each axis (corners aligned)."""
    return [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]


def _rbf_field(rng: np.random.Generator, shape: tuple[int, ...], num: int) -> np.ndarray:
    """A smooth random scalar field on the grid: Gaussian bumps on a ``num^3`` lattice.

    Separable, so it costs a few tensor contractions rather than one sum per bump.
    The scale is arbitrary; callers normalise it.
    """
    centres = np.linspace(-1.2, 1.2, num)
    width = centres[1] - centres[0]
    bases = [np.exp(-0.5 * ((a[:, None] - centres[None, :]) / width) ** 2).astype(np.float32)
             for a in _axes(shape)]
    weights = rng.normal(size=(num,) * 3).astype(np.float32)
    return np.einsum("ijk,ai,bj,ck->abc", weights, *bases, optimize=True)


def _rms_in_brain(fields: list[np.ndarray]) -> float:
    """Root mean square vector norm of ``fields`` over the central ball of radius 0.8."""
    p = identity(fields[0].shape)
    ball = p[0] ** 2 + p[1] ** 2 + p[2] ** 2 < 0.64
    return float(np.sqrt(sum(np.mean(f[ball] ** 2) for f in fields)))


def transform(rng: np.random.Generator, shape: tuple[int, ...], deformation: Deformation
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random subject transformation ``T``: the atlas point ``T(x)`` of each grid voxel.

    The smooth part ``u`` is scaled so its rms length inside the brain is
    ``deformation.warp``, which keeps the difficulty of the subjects even.
    """
    scale = 1.0 + deformation.scale * rng.normal(size=3)
    shift = deformation.shift * rng.normal(size=3)
    u = [_rbf_field(rng, shape, deformation.control_points) for _ in range(3)]
    gain = deformation.warp / max(_rms_in_brain(u), 1e-12)
    points = []
    for k, a in enumerate(_axes(shape)):
        along = (scale[k] * a + shift[k]).astype(np.float32)
        points.append(along.reshape([-1 if j == k else 1 for j in range(3)]) + gain * u[k])
    return tuple(points)


def identity(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grid's own normalised coordinates, broadcast to full arrays."""
    return tuple(np.broadcast_to(a.reshape([-1 if j == k else 1 for j in range(3)]),
                                 shape) for k, a in enumerate(_axes(shape)))


def render(points: tuple[np.ndarray, ...], anatomy: Anatomy, rng: np.random.Generator,
           appearance: Appearance = Appearance()) -> tuple[np.ndarray, np.ndarray]:
    """Image ``float32`` in [0, 1] and labels ``int32`` of the atlas at ``points``."""
    labels = segment(points, anatomy)
    means = np.zeros(max(LABELS) + 1, np.float32)
    for label, (_, mean) in STRUCTURES.items():
        means[label] = mean
    # One jitter per tissue, shared by its left and right instances.
    jitter = 1.0 + appearance.contrast_jitter * rng.normal(size=means.size)
    jitter[RIGHT + 1:2 * RIGHT + 1] = jitter[1:RIGHT + 1]
    image = (means * jitter.astype(np.float32))[labels]
    image *= 1.0 + appearance.texture * anatomy.texture(points, where=labels > 0)
    image = ndimage.gaussian_filter(image, appearance.partial_volume, mode="constant")
    shape = labels.shape
    bias = _rbf_field(rng, shape, 3)
    image *= np.exp(appearance.bias / max(float(np.std(bias)), 1e-12) * bias)
    image += appearance.noise * rng.standard_normal(shape, dtype=np.float32)
    image = np.where(labels > 0, np.clip(image, 0.0, 1.0), 0.0).astype(np.float32)
    return image, labels
