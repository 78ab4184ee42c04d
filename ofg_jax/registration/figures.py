"""Figures of a registration and of a training run: arrays to PNG (matplotlib, Agg).

Slices are the central ones of the three array axes; in every panel the first
remaining array axis runs to the right and the second one up. The files that
``python -m ofg_jax.plot`` and a finished training write:

- ``curves.png``: training loss, validation Dice and % of det <= 0 against the
  step;
- ``slices.png``: fixed, moving and warped moving image;
- ``grid.png``: the deformed grid over the warped image, lines where
  ``x + disp(x)`` crosses a regular grid of the moving image;
- ``jacobian.png``: the Jacobian determinant (blue <= 0 < white = 1 < red);
- ``labels.png``: outlines of the fixed labels (green) and of the warped moving
  labels (magenta) over the fixed image.
"""

import csv
import os
from typing import Any, Optional, Sequence

import numpy as np

# matplotlib is imported by the first figure (_canvas, plot_jacobian): a
# registration that draws none does not import it.

PLANE_NAMES = ("axis 0", "axis 1", "axis 2")
FIXED_COLOR = (0.0, 0.9, 0.2, 1.0)
WARPED_COLOR = (1.0, 0.0, 0.9, 1.0)


def central_slice(volume: np.ndarray, axis: int) -> np.ndarray:
    """The slice of ``volume`` ``(D, H, W, ...)`` at the centre of spatial ``axis``.

    Returns ``(A, B, ...)``: the two other spatial axes in order, then any
    trailing (component) axes.
    """
    volume = np.asarray(volume)
    return np.take(volume, volume.shape[axis] // 2, axis=axis)


def _canvas(figsize: tuple[float, float]):
    """An empty Agg figure of ``figsize`` inches, its layout constrained."""
    # pylint: disable=g-import-not-at-top
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _figure(rows: int, cols: int, title: str):
    """An Agg figure with a ``(rows, cols)`` array of axes."""
    fig = _canvas((3.2 * cols, 3.2 * rows))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    if title:
        fig.suptitle(title)
    return fig, axes


def _show(ax, image: np.ndarray, **kwargs):
    """Draws an ``(A, B)`` or ``(A, B, 4)`` RGBA slice, ``A`` to the right, ``B`` up."""
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(np.swapaxes(image, 0, 1), origin="lower", interpolation="nearest",
                     **kwargs)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=100)
    return path


def _gray_range(*volumes: np.ndarray) -> dict[str, float]:
    """Common ``vmin, vmax`` (0.5 and 99.5 percentiles) of some images."""
    values = np.concatenate([np.ravel(v) for v in volumes])
    low, high = np.percentile(values, [0.5, 99.5])
    return {"vmin": float(low), "vmax": float(max(high, low + 1e-6))}


def plot_slices(path: str, fixed: np.ndarray, moving: np.ndarray,
                warped: np.ndarray, title: str = "") -> str:
    """Central slices (rows: the three planes) of fixed, moving and warped images."""
    fig, axes = _figure(3, 3, title)
    gray = dict(cmap="gray", **_gray_range(fixed, moving))
    for row in range(3):
        for col, (name, image) in enumerate(
                [("fixed", fixed), ("moving", moving), ("warped", warped)]):
            _show(axes[row, col], central_slice(image, row), **gray)
            axes[row, col].set_title(f"{name}, {PLANE_NAMES[row]}")
    return _save(fig, path)


def grid_spacing(shape: Sequence[int]) -> int:
    """Voxels between the lines of the deformation grid: about 24 lines across."""
    return max(2, max(shape) // 24)


def plot_grid(path: str, warped: np.ndarray, disp: np.ndarray,
              title: str = "") -> str:
    """The deformed grid over the warped image, in the three central planes.

    Each line is a level set of one in-plane component of ``x + disp(x)`` (in
    voxels of the moving image) at a multiple of :func:`grid_spacing`: a regular
    grid of the moving image carried to the fixed grid by the deformation.
    """
    fig, axes = _figure(1, 3, title)
    spatial = np.asarray(warped).shape
    spacing = grid_spacing(spatial)
    for axis, ax in enumerate(axes[0]):
        _show(ax, central_slice(warped, axis), cmap="gray",
              **_gray_range(warped))
        in_plane = [k for k in range(3) if k != axis]
        field = central_slice(disp, axis)
        coords = np.meshgrid(*[np.arange(spatial[k]) for k in in_plane],
                             indexing="ij")
        for k, coord in zip(in_plane, coords):
            position = coord + field[..., k]
            ax.contour(position.T, levels=np.arange(0, spatial[k], spacing),
                       colors="yellow", linewidths=0.6, origin="lower")
        ax.set_title(f"deformed grid, {PLANE_NAMES[axis]}")
    return _save(fig, path)


def plot_jacobian(path: str, jacobian: np.ndarray, title: str = "") -> str:
    """The Jacobian determinant in the three central planes, centred at 1."""
    from matplotlib import colors  # pylint: disable=g-import-not-at-top
    jacobian = np.asarray(jacobian)
    norm = colors.TwoSlopeNorm(vmin=min(float(jacobian.min()), 0.0), vcenter=1.0,
                               vmax=max(float(jacobian.max()), 2.0))
    pct = 100.0 * float(np.mean(jacobian <= 0))
    fig, axes = _figure(1, 3, f"{title}  ({pct:.3f}% of voxels with det <= 0)"
                        if title else f"{pct:.3f}% of voxels with det <= 0")
    for axis, ax in enumerate(axes[0]):
        image = _show(ax, central_slice(jacobian, axis), cmap="RdBu_r", norm=norm)
        ax.set_title(f"det J, {PLANE_NAMES[axis]}")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    return _save(fig, path)


def label_outlines(labels: np.ndarray) -> np.ndarray:
    """``(A, B)`` bool: pixels of a 2D label map whose right or upper neighbour
    holds another label (the outlines of every structure, background included)."""
    labels = np.asarray(labels)
    edges = np.zeros(labels.shape, bool)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edges


def plot_labels(path: str, fixed: np.ndarray, fixed_seg: np.ndarray,
                warped_seg: np.ndarray, title: str = "") -> str:
    """Outlines of the fixed (green) and warped moving (magenta) labels over the
    fixed image, in the three central planes."""
    fig, axes = _figure(1, 3, title)
    for axis, ax in enumerate(axes[0]):
        _show(ax, central_slice(fixed, axis), cmap="gray", **_gray_range(fixed))
        for seg, color in ((fixed_seg, FIXED_COLOR), (warped_seg, WARPED_COLOR)):
            outline = label_outlines(central_slice(seg, axis))
            overlay = np.zeros(outline.shape + (4,))
            overlay[outline] = color
            _show(ax, overlay)
        ax.set_title(f"fixed (green), warped (magenta), {PLANE_NAMES[axis]}",
                     fontsize=8)
    return _save(fig, path)


def write_pair_figures(out_dir: str, fixed: np.ndarray, moving: np.ndarray,
                       result: dict[str, Any], fixed_seg: Optional[np.ndarray] = None,
                       title: str = "") -> list[str]:
    """The figures of one registered pair; returns the paths written.

    Args:
      out_dir: folder of the PNG files (created).
      fixed, moving: ``(D, H, W)`` images.
      result: from ``ofg_jax.registration.arrays.register_arrays``: ``warped``, ``disp``
        ``(D, H, W, 3)`` in voxels, ``jacobian``; ``warped_seg`` and ``dice`` when
        it had segmentations.
      fixed_seg: ``(D, H, W)`` labels; with ``result["warped_seg"]`` it adds
        ``labels.png``.
      title: shown above every figure (e.g. the pair's name).
    """
    os.makedirs(out_dir, exist_ok=True)
    if "dice" in result:
        title = f"{title}  Dice {result['dice']:.4f}".strip()
    join = lambda name: os.path.join(out_dir, name)
    paths = [plot_slices(join("slices.png"), fixed, moving, result["warped"], title),
             plot_grid(join("grid.png"), result["warped"], result["disp"], title),
             plot_jacobian(join("jacobian.png"), result["jacobian"], title)]
    if fixed_seg is not None and "warped_seg" in result:
        paths.append(plot_labels(join("labels.png"), fixed, fixed_seg,
                                 result["warped_seg"], title))
    return paths


def read_metrics(path: str) -> dict[str, dict[str, np.ndarray]]:
    """The columns of ``metrics.csv``, per split: ``{"train": {"step": ..., "loss":
    ...}, "val": {"step": ..., "dice": ..., "non_pos_jacobian_pct": ...}}``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a training workdir?")
    columns = {"train": ("step", "loss"),
               "val": ("step", "dice", "non_pos_jacobian_pct")}
    rows = {split: [] for split in columns}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("split") in columns:
                rows[row["split"]].append(
                    [float(row[key]) for key in columns[row["split"]]])
    return {split: {key: np.asarray([r[i] for r in rows[split]], np.float64)
                    for i, key in enumerate(keys)}
            for split, keys in columns.items()}


def plot_training_curves(path: str, metrics_csv: str, title: str = "") -> str:
    """Training loss, validation Dice and validation % det <= 0 against the step."""
    metrics = read_metrics(metrics_csv)
    fig, axes = _figure(1, 3, title)
    panels = [("train", "loss", "training loss"), ("val", "dice", "validation Dice"),
              ("val", "non_pos_jacobian_pct", "validation % det <= 0")]
    for ax, (split, key, name) in zip(axes[0], panels):
        steps, values = metrics[split]["step"], metrics[split][key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if not len(steps):
            ax.text(0.5, 0.5, "no rows yet", ha="center", transform=ax.transAxes)
    return _save(fig, path)



def plot_dice_per_structure(path: str, dice: dict[Any, Sequence[float]],
                            title: str = "") -> str:
    """A box plot of the Dice of each label over pairs (the paper's figure).

    Args:
      path: the PNG to write.
      dice: ``{label: [Dice of each pair]}``, in the order to draw.
      title: above the plot.
    """
    fig = _canvas((max(6.0, 0.3 * len(dice) + 2.0), 4.0))
    ax = fig.subplots()
    ax.boxplot([np.asarray(values, np.float64) for values in dice.values()],
               showfliers=True)
    ax.set_xticks(np.arange(1, len(dice) + 1))
    ax.set_xticklabels([str(label) for label in dice], rotation=90, fontsize=7)
    ax.set_xlabel("label")
    ax.set_ylabel("Dice per pair")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title)
    return _save(fig, path)
