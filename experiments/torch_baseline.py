"""The reference's OFG semantics in eager PyTorch, channels-first.

A from-scratch PyTorch baseline written from ``REFERENCE.md``: the spatial
transformer (``grid_sample``), the dense-convolution local NCC, the Grad
regulariser and the per-pair ``Adam(amsgrad=True)`` inner loop. It is the speed
baseline of ``experiments/benchmark.py`` and the independent reference of the
parity tests. Also the reference's VoxelMorph network and the two training
steps of any registration network (``network``: VoxelMorph here, ViT-V-Net and
TransMorph from ``experiments.torch_networks``): unsupervised (``-NCC + 1.0 *
Grad``) and OFG (``MSE`` to the refined field ``+ 0.02 * Grad``), each followed
by an ``Adam(amsgrad=True)`` update. The inner loop and the losses do not depend
on the network.

Shapes: images ``(B, 1, *S)``, displacements ``(B, N, *S)`` in voxels, channel
``k`` moving along spatial axis ``k``.
"""

from typing import Any, Sequence

import numpy as np
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
# VoxelMorph and the two training steps.

ENCODER_FEATURES = (8, 32, 32, 32)
DECODER_FEATURES = (32, 32, 32, 32)
FULL_RES_FEATURES = (32, 8, 8)


class VoxelMorph(torch.nn.Module):
    """The reference's VoxelMorph U-Net, channels-first: ``(B, 2, *S) -> (B, 3, *S)``.

    Encoder: 3x3x3 stride-2 convolutions with ``ENCODER_FEATURES``. Decoder: a conv
    at the coarsest level, then for each finer encoder level nearest x2 upsampling,
    concatenation of that level's features and a conv (``DECODER_FEATURES``).
    At full resolution: upsampling, concatenation of the input pair and the
    ``FULL_RES_FEATURES`` convs; every conv above is followed by LeakyReLU(0.2).
    The flow head is a 3x3x3 conv to 3 channels with weights ~ N(0, 1e-5) and zero
    bias. 274,387 parameters with 2 input channels.
    """

    def __init__(self, in_channels: int = 2, ndim: int = 3):
        super().__init__()
        conv = getattr(torch.nn, f"Conv{ndim}d")
        self.encoder = torch.nn.ModuleList()
        prev = in_channels
        for features in ENCODER_FEATURES:
            self.encoder.append(conv(prev, features, 3, stride=2, padding=1))
            prev = features
        # Features concatenated after each upsampling: the encoder levels from
        # the second-coarsest to the finest.
        skips = list(ENCODER_FEATURES[-2::-1])
        self.decoder = torch.nn.ModuleList()
        for i, features in enumerate(DECODER_FEATURES):
            self.decoder.append(conv(prev, features, 3, padding=1))
            prev = features + (skips[i] if i < len(skips) else 0)
        prev = DECODER_FEATURES[-1] + in_channels
        self.full_res = torch.nn.ModuleList()
        for features in FULL_RES_FEATURES:
            self.full_res.append(conv(prev, features, 3, padding=1))
            prev = features
        self.flow = conv(prev, ndim, 3, padding=1)
        torch.nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        torch.nn.init.zeros_(self.flow.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        act = lambda x: F.leaky_relu(x, 0.2)
        levels = [pair]
        for layer in self.encoder:
            levels.append(act(layer(levels[-1])))
        x = levels.pop()
        for layer in self.decoder:
            x = act(layer(x))
            skip = levels.pop()
            x = torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip],
                          dim=1)
        for layer in self.full_res:
            x = act(layer(x))
        return self.flow(x)


def conv_layers(model: VoxelMorph) -> list:
    """The convolutions of ``model`` in forward order."""
    return [*model.encoder, *model.decoder, *model.full_res, model.flow]


def load_flax_convs(model: VoxelMorph, convs) -> None:
    """Copies channels-last Flax conv parameters into ``model``, in forward order.

    Args:
      model: the module to overwrite.
      convs: one ``(kernel, bias)`` pair per layer of :func:`conv_layers`, kernel
        ``(kd, kh, kw, cin, cout)`` (Flax layout), bias ``(cout,)``.
    """
    layers = conv_layers(model)
    if len(convs) != len(layers):
        raise ValueError(f"expected {len(layers)} (kernel, bias) pairs, got {len(convs)}")
    ndim = layers[0].weight.dim() - 2
    with torch.no_grad():
        for i, (layer, (kernel, bias)) in enumerate(zip(layers, convs)):
            weight = torch.as_tensor(np.array(kernel)).permute(
                ndim + 1, ndim, *range(ndim))
            if weight.shape != layer.weight.shape or tuple(np.shape(bias)) != tuple(
                    layer.bias.shape):
                raise ValueError(
                    f"layer {i}: Flax kernel {tuple(np.shape(kernel))} / bias "
                    f"{tuple(np.shape(bias))} do not fit torch weight "
                    f"{tuple(layer.weight.shape)} / bias {tuple(layer.bias.shape)}")
            layer.weight.copy_(weight)
            layer.bias.copy_(torch.as_tensor(np.array(bias)))


def network(name: str, img_size: Sequence[int], **options: Any) -> torch.nn.Module:
    """The PyTorch network ``name`` (one of :data:`NETWORKS`) for ``img_size``.

    ``options`` are the architecture options of the ``ofg_jax.models`` network of
    the same name (``window_size``, ``embed_dim``, ...; the JAX-only ``dtype``,
    ``conv_impl`` and ``remat`` are ignored). VoxelMorph has the reference's fixed
    widths: options that differ from them raise ``ValueError``.
    """
    options = {k: v for k, v in options.items() if k not in ("dtype", "conv_impl", "remat")}
    if name == "voxelmorph":
        reference = {"enc_features": ENCODER_FEATURES, "dec_features": DECODER_FEATURES,
                     "final_features": FULL_RES_FEATURES}
        differ = sorted(k for k, v in options.items()
                        if (k in reference and tuple(v) != reference[k])
                        or (k == "diffeomorphic" and v))
        if differ:
            raise ValueError(f"the PyTorch VoxelMorph has the reference architecture only; "
                             f"cannot set {differ}")
        return VoxelMorph()
    from experiments import torch_networks
    classes = {"vitvnet": torch_networks.ViTVNet, "transmorph": torch_networks.TransMorph}
    if name not in classes:
        raise ValueError(f"no PyTorch baseline of {name!r}; valid: {', '.join(NETWORKS)}")
    return classes[name](tuple(img_size), **options)


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
    pred = model(torch.cat([moving, fixed], dim=1))
    if mode == "ofg":
        loss = ofg_training_loss(pred, moving, fixed, **refine_kwargs)
    elif mode == "unsupervised":
        loss = unsupervised_loss(pred, moving, fixed)
    else:
        raise ValueError(f"mode must be 'ofg' or 'unsupervised', got {mode!r}")
    loss.backward()
    optimizer.step()
    return loss.detach()
