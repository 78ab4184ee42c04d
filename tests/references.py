"""Independent float64 NumPy references of the primitives, written from their
definitions (``../shared/REFERENCE.md``) with explicit loops where that is clearer.

Shared by the tests so that each definition is written once.
"""

import itertools

import numpy as np


def np_warp(image, disp, order=1):
    """``image`` sampled at ``grid + disp`` (linear or nearest); 0 for neighbours
    outside the volume, as ``grid_sample(align_corners=True, padding="zeros")``."""
    spatial = disp.shape[:-1]
    img = np.asarray(image).reshape(spatial + (-1,)).astype(np.float64)
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in spatial], indexing="ij"),
                      -1) + np.asarray(disp, np.float64)
    out = np.zeros(spatial + (img.shape[-1],))
    for x in itertools.product(*[range(n) for n in spatial]):
        c = coords[x]
        if order == 0:
            i = tuple(np.round(c).astype(int))
            if all(0 <= a < n for a, n in zip(i, spatial)):
                out[x] = img[i]
            continue
        base = np.floor(c).astype(int)
        for corner in itertools.product((0, 1), repeat=len(spatial)):
            i = tuple(base + corner)
            w = np.prod([f if u else 1 - f for f, u in zip(c - base, corner)])
            if all(0 <= a < n for a, n in zip(i, spatial)):
                out[x] += w * img[i]
    return out.reshape(np.shape(image))


def np_window_sums(x, window):
    """Box sums over a centred ``window``-wide box, zero padding (explicit loop)."""
    r = window // 2
    padded = np.pad(np.asarray(x, np.float64), r)
    out = np.zeros(np.shape(x))
    for offset in np.ndindex(*(window,) * np.ndim(x)):
        out += padded[tuple(slice(o, o + n) for o, n in zip(offset, np.shape(x)))]
    return out


def np_ncc(i, j, window=9, eps=1e-5, weights=None):
    """VoxelMorph's local NCC: the mean of ``cross^2 / (var_i var_j + eps)``; with
    ``weights``, their weighted mean ``sum(w * cc) / sum(w)`` (a cost-function mask)."""
    n = window ** np.ndim(i)
    i, j = np.asarray(i, np.float64), np.asarray(j, np.float64)
    si, sj = np_window_sums(i, window), np_window_sums(j, window)
    sii, sjj = np_window_sums(i * i, window), np_window_sums(j * j, window)
    sij = np_window_sums(i * j, window)
    ui, uj = si / n, sj / n
    cross = sij - uj * si - ui * sj + ui * uj * n
    var_i = sii - 2 * ui * si + ui * ui * n
    var_j = sjj - 2 * uj * sj + uj * uj * n
    cc = cross * cross / (var_i * var_j + eps)
    if weights is None:
        return np.mean(cc)
    weights = np.asarray(weights, np.float64)
    return np.sum(weights * cc) / np.sum(weights)


def np_grad_loss(disp, penalty="l2"):
    """Mean squared (or absolute) forward difference per spatial axis, averaged."""
    disp = np.asarray(disp, np.float64)
    diffs = [np.diff(disp, axis=k) for k in range(disp.ndim - 1)]
    return np.mean([np.mean(d * d if penalty == "l2" else np.abs(d)) for d in diffs])


def np_jacobian_determinant(disp):
    """``det(grad(x + disp(x)))`` with ``np.gradient`` (the reference's evaluation)."""
    disp = np.asarray(disp, np.float64)
    ndim = disp.shape[-1]
    jac = np.empty(disp.shape[:-1] + (ndim, ndim))
    for i in range(ndim):
        for j in range(ndim):
            jac[..., i, j] = np.gradient(disp[..., i], axis=j) + (i == j)
    return np.linalg.det(jac)


def np_dice(a, b, labels):
    """Dice ``2|A∩B| / (|A| + |B| + 1e-5)`` of each label."""
    return np.array([2.0 * np.sum((a == l) & (b == l))
                     / (np.sum(a == l) + np.sum(b == l) + 1e-5) for l in labels])


def np_sdlogj(disp):
    """Learn2Reg's SDlogJ, as its evaluation code computes it: the Jacobian by
    ``scipy.ndimage.correlate`` with ``[-0.5, 0, 0.5]`` (zero padding), cropped by
    2 voxels, then ``std(log(clip(det + 3, 1e-9, 1e9)))``."""
    from scipy import ndimage
    disp = np.moveaxis(np.asarray(disp, np.float64), -1, 0)  # (3, H, W, D)
    kernels = [np.array([-0.5, 0.0, 0.5]).reshape(shape)
               for shape in ((3, 1, 1), (1, 3, 1), (1, 1, 3))]
    grad = np.stack([np.stack([ndimage.correlate(disp[c], k, mode="constant", cval=0.0)
                               for c in range(3)]) for k in kernels])  # [axis][comp]
    jac = grad.transpose(1, 0, 2, 3, 4) + np.eye(3).reshape(3, 3, 1, 1, 1)
    jac = jac[:, :, 2:-2, 2:-2, 2:-2]
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))
    return np.log(np.clip(det + 3, 1e-9, 1e9)).std()
