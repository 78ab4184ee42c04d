"""The 3D convolution shared by all networks, with a fast exact CPU formulation.

XLA:CPU runs ``lax.conv_general_dilated`` in 3D several times slower than PyTorch
(oneDNN), while its 2D convolution and its matrix products are fast. On CPU,
``conv3d`` therefore rewrites the convolution in terms of those:

* forward and input gradient: one 2D convolution over ``(H, W)`` of every depth
  slice with all ``k`` depth taps stacked on the output channels, then a sum of
  ``k`` depth-shifted slices;
* kernel gradient: ``k * k`` matrix products over the flattened, zero-padded
  volume (one per in-plane tap, the ``k`` depth taps stacked on the columns),
  operands channels-last so that no transposes are needed;
* stride ``s``: the stride-1 result at every ``s``-th voxel;
* kernel equal to stride, no padding (patch embeddings): a reshape and one matrix
  product.
* a skip concatenation (``conv3d_of_parts``): the parts concatenated one chunk
  of depth slices at a time inside the convolution's loop, never at full size.

Everything else, and every other backend (cuDNN on GPU), uses
``lax.conv_general_dilated``. All formulations compute the same sums in float32;
they agree with ``lax.conv_general_dilated`` to float32 rounding.
"""

from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IntOr3 = Union[int, Sequence[int]]
IMPLS = ("auto", "xla", "cpu")

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def triple(value: IntOr3, name: str) -> tuple[int, int, int]:
    """``value`` as 3 ints (an int is repeated), or a ``ValueError`` naming ``name``."""
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or any(int(v) != v for v in values):
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    return tuple(int(v) for v in values)


def conv3d(x: jax.Array, kernel: jax.Array, stride: IntOr3 = 1, padding: IntOr3 = 0,
           impl: str = "auto") -> jax.Array:
    """3D cross-correlation, the operation of PyTorch ``Conv3d`` without its bias.

    Args:
      x: ``(B, D, H, W, C_in)`` channels-last input.
      kernel: ``(k_d, k_h, k_w, C_in, C_out)``.
      stride: int or 3 ints.
      padding: zero padding in voxels on both sides of each spatial axis, int or 3
        ints.
      impl: ``"xla"`` for ``lax.conv_general_dilated``; ``"cpu"`` for the
        formulation in this module's docstring (any backend; it only pays off on
        CPU); ``"auto"`` picks ``"cpu"`` on the CPU backend for float32 and
        ``"xla"`` otherwise.

    Returns:
      ``(B, D', H', W', C_out)`` with ``D' = (D + 2 p - k) // s + 1`` per axis, in the
      result dtype of ``x`` and ``kernel``.
    """
    return conv3d_of_parts((x,), kernel, stride, padding, impl)


def conv3d_of_parts(parts: Sequence[jax.Array], kernel: jax.Array, stride: IntOr3 = 1,
                    padding: IntOr3 = 0, impl: str = "auto") -> jax.Array:
    """``conv3d`` of the concatenation of ``parts`` along the channels (a skip
    connection), without building it at full size.

    The ``"cpu"`` formulation of 'same' convolutions concatenates the parts one
    chunk of depth slices at a time, and gives each part its own slice of the
    input gradient. Elsewhere, above ``_CHUNK_BYTES``, the result is the sum of
    each part's convolution with its slice of the kernel. Neither the
    concatenated input nor its gradient exists at full size.

    Args:
      parts: ``(B, D, H, W, C_i)`` arrays, ``sum(C_i) = C_in``.
      kernel: ``(k_d, k_h, k_w, C_in, C_out)``.
      stride, padding, impl: as ``conv3d``.

    Returns:
      As ``conv3d`` of the concatenated input.
    """
    parts = tuple(parts)
    stride, padding = triple(stride, "stride"), triple(padding, "padding")
    c_in = _channels(parts)
    if (kernel.ndim != 5 or kernel.shape[3] != c_in or not parts
            or any(part.ndim != 5 or part.shape[:4] != parts[0].shape[:4] for part in parts)):
        raise ValueError(
            f"conv3d expects x (B, D, H, W, C_in) (or parts that differ only in C) and "
            f"kernel (kd, kh, kw, C_in, C_out); got x {[p.shape for p in parts]} and "
            f"kernel {kernel.shape}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    size = kernel.shape[:3]
    for n, k, p, s in zip(parts[0].shape[1:4], size, padding, stride):
        if n + 2 * p < k or s < 1 or p < 0:
            raise ValueError(
                f"conv3d: spatial size {parts[0].shape[1:4]} with padding {padding} is "
                f"smaller than kernel {size}, or stride {stride} / padding is invalid")
    if impl == "auto":
        dtype = jnp.result_type(*parts, kernel)
        impl = "cpu" if jax.default_backend() == "cpu" and dtype == jnp.float32 else "xla"
    k, s = size[0], stride[0]
    if impl == "cpu" and size == stride and padding == (0, 0, 0):
        return _patch_conv(_concat(parts), kernel)
    if (impl == "cpu" and size == (k,) * 3 and k % 2 == 1 and padding == (k // 2,) * 3
            and stride == (s,) * 3):
        y = _conv_same(parts, kernel)
        return y if s == 1 else y[:, ::s, ::s, ::s]
    if len(parts) == 1 or _nbytes(parts) <= _CHUNK_BYTES:
        return _xla_conv(_concat(parts), kernel, stride, padding)
    kernels = _split(kernel, [part.shape[-1] for part in parts], axis=3)
    return sum(_xla_conv(part, k, stride, padding) for part, k in zip(parts, kernels))


def _xla_conv(x, kernel, stride, padding):
    return lax.conv_general_dilated(
        x, kernel, stride, [(p, p) for p in padding], dimension_numbers=_DN3)


def _concat(chunks):
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=-1)


def _channels(parts):
    return sum(part.shape[-1] for part in parts)


def _nbytes(parts):
    return sum(part.size * part.dtype.itemsize for part in parts)


def _split(y, sizes, axis=-1):
    """``y`` along ``axis`` (its channels) as consecutive pieces of ``sizes``."""
    starts = np.cumsum([0] + list(sizes))
    return tuple(lax.slice_in_dim(y, a, b, axis=axis) for a, b in zip(starts[:-1], starts[1:]))


def _patch_conv(x, kernel):
    """Non-overlapping patches (kernel == stride, no padding): reshape + matmul."""
    b, c = x.shape[0], x.shape[4]
    kd, kh, kw, _, o = kernel.shape
    d, h, w = x.shape[1] // kd, x.shape[2] // kh, x.shape[3] // kw
    x = x[:, :d * kd, :h * kh, :w * kw]
    patches = x.reshape(b, d, kd, h, kh, w, kw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    patches = patches.reshape(b, d, h, w, kd * kh * kw * c)
    return jnp.dot(patches, kernel.reshape(-1, o))


# Intermediates above this size are processed in a loop over chunks of depth
# slices, so that a full-resolution layer needs its input, its output and
# O(_CHUNK_BYTES) besides: nothing of the volume's size is padded or copied.
_CHUNK_BYTES = 128 * 2 ** 20
_MIN_CHUNK_ROWS = 4096


def _chunk_plan(d, chunk, before, after):
    """Splits the depth slices ``[0, d)`` into chunks of ``chunk`` (the last shorter).

    A chunk ``[s, s + n)`` reads a halo ``[s - before, s + n + after)``. Returns
    ``(edge, start, count)``: the chunks ``(s, n)`` whose halo leaves the volume
    (done one by one, with zeros outside), and the run of ``count`` full chunks
    from slice ``start`` whose halo stays inside (done in a loop).
    """
    chunks = [(s, min(chunk, d - s)) for s in range(0, d, chunk)]
    inside = [s for s, n in chunks if s >= before and s + n + after <= d and n == chunk]
    if len(inside) < 2:  # a loop of one is not worth its overhead
        inside = []
    edge = [(s, n) for s, n in chunks if s not in inside]
    return edge, (inside[0] if inside else 0), len(inside)


def _depth_window(v, sample, start, size):
    """``v[sample, start:start + size]`` with zeros outside the depth range.

    ``start`` is static (edge chunks, any range) or traced (loop chunks, which
    stay inside the volume).
    """
    d, rest = v.shape[1], v.shape[2:]
    if not isinstance(start, int):
        return lax.dynamic_slice(v, (sample, start) + (0,) * len(rest),
                                 (1, size) + rest)[0]
    lo, hi = max(start, 0), min(start + size, d)
    if hi <= lo:
        return jnp.zeros((size,) + rest, v.dtype)
    part = lax.slice_in_dim(v[sample], lo, hi, axis=0)
    return jnp.pad(part, [(lo - start, start + size - hi)] + [(0, 0)] * len(rest))


def _chunked(d, chunk, before, after, init, body):
    """Folds ``body(acc, s, n)`` over the chunks of :func:`_chunk_plan`, in depth order.

    Edge chunks get static ``s``; the inside run is a ``fori_loop`` with a traced
    ``s`` (every chunk once, in increasing order, as a Python loop would).
    """
    edge, start, count = _chunk_plan(d, chunk, before, after)
    acc = init
    for s, n in [c for c in edge if c[0] < start or not count]:
        acc = body(acc, s, n)
    if count:
        acc = lax.fori_loop(0, count, lambda i, a: body(a, start + i * chunk, chunk), acc)
        for s, n in [c for c in edge if c[0] > start]:
            acc = body(acc, s, n)
    return acc


def _depth_stacked_conv(parts, kernel, out_sizes):
    """The stride-1 'same' correlation of ``parts`` (concatenated along the
    channels), its output channels split in pieces of ``out_sizes``; odd cubic kernel.

    By 2D convs over (H, W), ``y[d] = sum_a conv2d(x[d + a - p], kernel[a])``: one
    2D convolution of the depth slices with the ``k`` depth taps stacked on its
    output channels, then each tap's output added ``a - p`` slices away. Large
    volumes go through a loop over chunks of input slices (the parts concatenated
    only there), each adding its taps to the output slices it reaches.
    """
    b, d, h, w = parts[0].shape[:4]
    c = _channels(parts)
    k, o = kernel.shape[0], kernel.shape[4]
    p = k // 2
    stacked = kernel.transpose(1, 2, 3, 0, 4).reshape(k, k, c, k * o)

    def taps(xs):  # (b, n, h, w, c) -> (b, n + 2p, h, w, o): every tap, shifted
        n = xs.shape[1]
        y = lax.conv_general_dilated(xs.reshape(b * n, h, w, c), stacked, (1, 1),
                                     [(p, p), (p, p)], dimension_numbers=_DN2)
        y = y.reshape(b, n, h, w, k, o)
        return sum(jnp.pad(y[:, :, :, :, a], ((0, 0), (2 * p - a, a), (0, 0), (0, 0), (0, 0)))
                   for a in range(k))

    chunk = max(1, _CHUNK_BYTES // (b * h * w * k * o * parts[0].dtype.itemsize))
    n = min(chunk, d - 2 * p)
    if chunk >= d or n < 1:
        return _split(taps(_concat(parts))[:, p:p + d], out_sizes)

    # Chunk i adds the taps of the input slices [s, s + n) (s = i n) to the output
    # slices [s - p, s + n + p). Every chunk reads and writes windows that lie
    # inside the volume, so that the outputs are updated in place: the last chunk
    # reads the last n slices and zeroes those that the one before it read, and
    # the windows of the first and last chunks' output are shifted inside, their
    # taps rolled along and masked where they fall off the volume.
    def add_chunk(i, outs):
        s = i * n
        sx = jnp.minimum(s, d - n)
        xs = _concat([lax.dynamic_slice_in_dim(part, sx, n, axis=1) for part in parts])
        xs = jnp.where((sx + jnp.arange(n) >= s)[None, :, None, None, None], xs, 0)
        at = jnp.clip(sx - p, 0, d - n - 2 * p)
        y = jnp.roll(taps(xs), sx - p - at, axis=1)   # y[j] lands on slab row j + shift
        src = at + jnp.arange(n + 2 * p) - (sx - p)
        y = jnp.where(((src >= 0) & (src < n + 2 * p))[None, :, None, None, None], y, 0)
        return tuple(
            lax.dynamic_update_slice_in_dim(
                out, lax.dynamic_slice_in_dim(out, at, n + 2 * p, axis=1) + piece, at, axis=1)
            for out, piece in zip(outs, _split(y, out_sizes)))

    outs = tuple(_zeros_after(parts[0], (b, d, h, w, size)) for size in out_sizes)
    return lax.fori_loop(0, -(-d // n), add_chunk, outs)


def _zeros_after(x, shape):
    """Zeros of ``shape`` computed from an element of ``x`` (exactly 0 for any value).

    Plain zeros of the same shape are merged by XLA into one array that lives
    from the first loop that starts from it to the last, and each loop gets a
    copy of it that the scheduler may make long before the loop; at full
    resolution that is several feature maps kept for nothing. These zeros
    cannot be merged and exist only once ``x`` does.
    """
    v = lax.stop_gradient(x.reshape(-1)[0])
    zero = jnp.where(jnp.isfinite(v), v, 0) * 0
    return jnp.broadcast_to(zero, shape)


def _tap_layout(h, w, k):
    """``(p, S, offsets)`` of a volume padded by ``p = k // 2`` in H and W and
    flattened: ``S`` rows per depth slice, and the row offset of each in-plane tap."""
    p = k // 2
    wp = w + 2 * p
    return p, (h + 2 * p) * wp, [i * wp + j for i in range(k) for j in range(k)]


def _kernel_grad(parts, g, k):
    """Gradient of the stride-1 'same' correlation with respect to its kernel.

    With the volume zero-padded by ``p = k // 2`` and flattened channels-last to
    ``(L, C)``, the tap ``(a, b, c)`` is the row offset ``a * S + b * W' + c``
    (``W' = W + 2p``, ``S = (H + 2p) W'``). The output gradient ``g`` is laid out on
    the same padded grid (zeros off the volume) with its ``k`` depth shifts stacked
    on the columns, so each in-plane tap is one product ``x_shifted^T @ g_stacked``
    of channels-last operands, which needs no transpose. Large volumes go through a
    loop over chunks of depth slices of ``x`` that pads and lays out only the chunk
    (with one slice of ``x`` and ``p`` slices of ``g`` either side); ``x`` is the
    concatenation of ``parts``, built only a chunk at a time there.
    """
    bsz, d, h, w = parts[0].shape[:4]
    c = _channels(parts)
    dtype = parts[0].dtype
    o = g.shape[4]
    p, plane, offsets = _tap_layout(h, w, k)
    halo = offsets[-1]
    contract = (((0,), (0,)), ((), ()))
    itemsize = dtype.itemsize
    rows = bsz * (d + 2 * p) * plane - halo
    chunk = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // ((k * k * c + k * o) * itemsize))
    if rows > chunk:
        grad = _kernel_grad_chunked(parts, g, k)
    else:
        # Small volumes: the whole padded volume at once.
        xf = jnp.pad(_concat(parts), ((0, 0), (p, p), (p, p), (p, p), (0, 0))).reshape(-1, c)
        gf = jnp.pad(g, ((0, 0), (0, 2 * p), (0, 2 * p), (0, 2 * p), (0, 0))).reshape(-1, o)
        # Row r of the stacked gradient holds g[r - a * plane] for each depth tap a.
        gf = jnp.pad(gf[:rows], (((k - 1) * plane, 0), (0, 0)))
        g_stacked = jnp.concatenate(
            [gf[(k - 1 - a) * plane:(k - 1 - a) * plane + rows] for a in range(k)], axis=1)
        grad = jnp.stack([lax.dot_general(xf[t:t + rows], g_stacked, contract)
                          for t in offsets])                            # (k*k, C, k*O)
    grad = grad.reshape(k, k, c, k, o)                                  # (b, c, C, a, O)
    return grad.transpose(3, 0, 1, 2, 4).astype(dtype)


def _kernel_grad_chunked(parts, g, k):
    """``_kernel_grad``'s ``(k*k, C, k*O)`` sums, by chunks of depth slices.

    The rows of the padded volume that lie on the zero depth padding contribute
    nothing and are skipped: for the slices ``[s, s + n)`` of ``x`` (padded in H
    and W, flattened), row ``r`` of the product reads ``x`` rows ``r + t`` (``t <
    S``: into the next slice) and the stacked gradient the ``g`` slices ``s - p
    .. s + n + p - 1``.
    """
    # Nothing of the chunks' layout of x may be computed before g exists:
    # XLA's scheduler would otherwise prepare the edge chunks of every layer at
    # the start of the backward pass and keep them all.
    parts, g = lax.optimization_barrier((parts, g))
    bsz, d, h, w = parts[0].shape[:4]
    c = _channels(parts)
    dtype = parts[0].dtype
    o = g.shape[4]
    p, plane, offsets = _tap_layout(h, w, k)
    halo = offsets[-1]
    after = 1 if halo else 0
    contract = (((0,), (0,)), ((), ()))
    per_slice = plane * (k * k * c + k * o + c + o) * dtype.itemsize
    chunk = max(1, _CHUNK_BYTES // per_slice)

    def one_sample(sample):
        def add_chunk(acc, s, n):
            xs = _concat([_depth_window(part, sample, s, n + after) for part in parts])
            xs = jnp.pad(xs, ((0, 0), (p, p), (p, p), (0, 0))).reshape(-1, c)
            gs = _depth_window(g, sample, s - p, n + 2 * p)
            gs = jnp.pad(gs, ((0, 0), (0, 2 * p), (0, 2 * p), (0, 0)))
            # Row r (slice s + j) holds g[s + j + p - a] for each depth tap a.
            g_stacked = jnp.concatenate(
                [gs[2 * p - a:2 * p - a + n].reshape(-1, o) for a in range(k)], axis=1)
            rows = n * plane
            return acc + jnp.stack([lax.dot_general(xs[t:t + rows], g_stacked, contract)
                                    for t in offsets])
        return _chunked(d, chunk, p, max(p, after),
                        jnp.zeros((k * k, c, k * o), dtype), add_chunk)

    return sum(one_sample(i) for i in range(bsz))


@jax.custom_vjp
def _conv_same(parts, kernel):
    return _depth_stacked_conv(parts, kernel, (kernel.shape[4],))[0]


def _conv_same_fwd(parts, kernel):
    return _conv_same(parts, kernel), (parts, kernel)


def _conv_same_bwd(res, g):
    parts, kernel = res
    g = g.astype(parts[0].dtype)
    dk = _kernel_grad(parts, g, kernel.shape[0]).astype(kernel.dtype)
    if _nbytes(parts) > _CHUNK_BYTES:
        # The input gradient after the kernel gradient: the input, often kept
        # only for this, can then be freed before the input gradient is
        # allocated. (Small volumes skip this, which keeps their rounding: the
        # barrier changes how XLA fuses the sums over g.)
        dk, g = lax.optimization_barrier((dk, g))
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    dparts = _depth_stacked_conv((g,), flipped, [part.shape[-1] for part in parts])
    return dparts, dk


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


__all__ = ["IMPLS", "IntOr3", "conv3d", "conv3d_of_parts", "triple"]
