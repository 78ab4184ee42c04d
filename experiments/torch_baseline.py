"""The reference's OFG semantics in eager PyTorch, channels-first.

A from-scratch PyTorch baseline written from ``REFERENCE.md``: the spatial
transformer (``grid_sample``), the dense-convolution local NCC, the Grad
regulariser and the per-pair ``Adam(amsgrad=True)`` inner loop. It is the speed
baseline of ``experiments/benchmark.py`` and the independent reference of the
parity tests. Also the two training steps of any registration network
(``network``: VoxelMorph, ViT-V-Net and TransMorph from
``experiments.torch_networks``): unsupervised (``-NCC + 1.0 * Grad``) and OFG
(``MSE`` to the refined field ``+ 0.02 * Grad``), each followed by an
``Adam(amsgrad=True)`` update. The inner loop and the losses do not depend on
the network; they use its flow, not the image it warps.

Shapes: images ``(B, 1, *S)``, displacements ``(B, N, *S)`` in voxels, channel
``k`` moving along spatial axis ``k``.
"""

from typing import Any, Sequence

import torch
import torch.nn.functional as F

NETWORKS = ("voxelmorph", "vitvnet", "transmorph")


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


def registration_energy(moving: torch.Tensor, fixed: torch.Tensor, field: torch.Tensor,
                        reg_weight: float = 1.0, similarity: str = "ncc") -> torch.Tensor:
    """The inner energy ``-NCC(fixed, moving∘field) + reg_weight * Grad(field)``.

    With ``similarity="mse"`` the data term is ``mean((fixed - moving∘field)**2)``.
    """
    warped = spatial_transform(moving, field)
    if similarity == "ncc":
        data = ncc_loss(fixed, warped)
    else:
        data = torch.mean((fixed - warped) ** 2)
    return data + reg_weight * grad_loss(field)


def refine(moving: torch.Tensor, fixed: torch.Tensor, disp: torch.Tensor,
           steps: int = 10, lr: float = 0.1, reg_weight: float = 1.0,
           similarity: str = "ncc", amsgrad: bool = True,
           energy=registration_energy) -> torch.Tensor:
    """The reference's inner loop: a fresh Adam on a detached copy of ``disp``.

    ``energy(moving, fixed, field, reg_weight, similarity)`` is the minimised
    scalar; pass a ``torch.compile``-d :func:`registration_energy` to compile it.
    """
    field = disp.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([field], lr=lr, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0, amsgrad=amsgrad)
    for _ in range(steps):
        opt.zero_grad()
        energy(moving, fixed, field, reg_weight, similarity).backward()
        opt.step()
    return field.detach()


# ---------------------------------------------------------------------------
# The networks and the two training steps.


def network(name: str, img_size: Sequence[int], **options: Any) -> torch.nn.Module:
    """The PyTorch network ``name`` (one of :data:`NETWORKS`) for ``img_size``.

    The network of ``experiments.torch_networks`` (the authors' module names;
    ``forward`` returns ``(warped, flow)``). ``options`` are the architecture
    options of the ``ofg_jax.models`` network of the same name (``window_size``,
    ``embed_dim``, ``enc_features``, ``diffeomorphic``, ...); the JAX-only
    ``dtype``, ``conv_impl`` and ``remat`` are ignored.
    """
    from experiments import torch_networks

    options = {k: v for k, v in options.items() if k not in ("dtype", "conv_impl", "remat")}
    if name not in torch_networks.NETWORKS:
        raise ValueError(f"no PyTorch baseline of {name!r}; valid: {', '.join(NETWORKS)}")
    return torch_networks.NETWORKS[name](tuple(img_size), **options)


def make_optimizer(model: torch.nn.Module, lr: float = 1e-4,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The reference's outer optimiser: ``Adam(lr, amsgrad=True)``."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=weight_decay, amsgrad=True)


def unsupervised_loss(pred: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                      grad_weight: float = 1.0) -> torch.Tensor:
    """``-NCC(fixed, moving∘pred) + grad_weight * Grad(pred)``; images ``(B, 1, *S)``."""
    return ncc_loss(fixed, spatial_transform(moving, pred)) + grad_weight * grad_loss(pred)


def ofg_training_loss(pred: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor,
                      grad_weight: float = 0.02, **refine_kwargs) -> torch.Tensor:
    """``MSE(pred, refine(pred)) + grad_weight * Grad(pred)``, the target detached.

    ``refine_kwargs`` (``steps``, ``lr``, ``reg_weight`` of the inner energy, ...)
    go to :func:`refine`.
    """
    target = refine(moving, fixed, pred, **refine_kwargs)
    return torch.mean((pred - target) ** 2) + grad_weight * grad_loss(pred)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               moving: torch.Tensor, fixed: torch.Tensor, mode: str = "ofg",
               **refine_kwargs) -> torch.Tensor:
    """One update of ``model`` on a batch ``(B, 1, *S)``; returns the loss.

    ``mode="ofg"``: :func:`ofg_training_loss` (Grad weight 0.02) with
    ``refine_kwargs`` forwarded to :func:`refine`; ``mode="unsupervised"``:
    :func:`unsupervised_loss` (Grad weight 1.0). ``model`` is put in training
    mode (dropout, drop path and BatchNorm batch statistics, as ``train=True`` in
    ``ofg_jax``).
    """
    model.train()
    optimizer.zero_grad()
    pred = model.predict(torch.cat([moving, fixed], dim=1))
    if mode == "ofg":
        loss = ofg_training_loss(pred, moving, fixed, **refine_kwargs)
    elif mode == "unsupervised":
        loss = unsupervised_loss(pred, moving, fixed)
    else:
        raise ValueError(f"mode must be 'ofg' or 'unsupervised', got {mode!r}")
    loss.backward()
    optimizer.step()
    return loss.detach()
