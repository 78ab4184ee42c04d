"""The reference's OFG semantics in eager PyTorch, channels-first.

A from-scratch PyTorch baseline written from ``REFERENCE.md``: the spatial
transformer (``grid_sample``), the dense-convolution local NCC, the Grad
regulariser and the per-pair ``Adam(amsgrad=True)`` inner loop. It is the speed
baseline of ``experiments/benchmark.py`` and the independent reference of the
parity tests.

Shapes: images ``(B, 1, *S)``, displacements ``(B, N, *S)`` in voxels, channel
``k`` moving along spatial axis ``k``.
"""

import torch
import torch.nn.functional as F


def spatial_transform(image: torch.Tensor, disp: torch.Tensor,
                      mode: str = "bilinear") -> torch.Tensor:
    """Warps ``image`` (B, C, *S) by ``disp`` (B, N, *S) like VoxelMorph's layer."""
    spatial = disp.shape[2:]
    grid = torch.stack(torch.meshgrid(
        *[torch.arange(n, dtype=disp.dtype, device=disp.device) for n in spatial],
        indexing="ij"))
    locs = grid[None] + disp
    locs = torch.stack([2 * (locs[:, k] / (n - 1) - 0.5)
                        for k, n in enumerate(spatial)], dim=-1)
    # grid_sample wants (x, y[, z]) = the reversed axis order.
    locs = locs.flip(-1)
    return F.grid_sample(image, locs, mode=mode, padding_mode="zeros",
                         align_corners=True)


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9,
             eps: float = 1e-5) -> torch.Tensor:
    """``-mean(cc)`` with window sums by a dense all-ones convolution."""
    ndim = fixed.dim() - 2
    conv = getattr(F, f"conv{ndim}d")
    kernel = torch.ones((1, 1) + (window,) * ndim, dtype=fixed.dtype,
                        device=fixed.device)
    pad = window // 2
    n = float(window ** ndim)
    i, j = fixed, warped
    si, sj = conv(i, kernel, padding=pad), conv(j, kernel, padding=pad)
    sii, sjj = conv(i * i, kernel, padding=pad), conv(j * j, kernel, padding=pad)
    sij = conv(i * j, kernel, padding=pad)
    ui, uj = si / n, sj / n
    cross = sij - uj * si - ui * sj + ui * uj * n
    var_i = sii - 2 * ui * si + ui * ui * n
    var_j = sjj - 2 * uj * sj + uj * uj * n
    return -torch.mean(cross * cross / (var_i * var_j + eps))


def grad_loss(disp: torch.Tensor, penalty: str = "l2") -> torch.Tensor:
    """VoxelMorph's Grad: mean forward-difference penalty, averaged over axes."""
    ndim = disp.dim() - 2
    total = 0.0
    for axis in range(2, 2 + ndim):
        d = torch.diff(disp, dim=axis)
        total = total + torch.mean(d * d if penalty == "l2" else d.abs())
    return total / ndim


def refine(moving: torch.Tensor, fixed: torch.Tensor, disp: torch.Tensor,
           steps: int = 10, lr: float = 0.1, reg_weight: float = 1.0,
           similarity: str = "ncc", amsgrad: bool = True) -> torch.Tensor:
    """The reference's inner loop: a fresh Adam on a detached copy of ``disp``."""
    field = disp.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([field], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0, amsgrad=amsgrad)
    for _ in range(steps):
        opt.zero_grad()
        warped = spatial_transform(moving, field)
        if similarity == "ncc":
            data = ncc_loss(fixed, warped)
        else:
            data = torch.mean((fixed - warped) ** 2)
        (data + reg_weight * grad_loss(field)).backward()
        opt.step()
    return field.detach()
