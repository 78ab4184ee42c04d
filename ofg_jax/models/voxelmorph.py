"""VoxelMorph (Balakrishnan et al. 2019): the U-Net registration network."""

from typing import Sequence

import flax.linen as nn
import jax

from ofg_jax.models.base import RegistrationNetwork, check_divisible
from ofg_jax.models.activations import leaky_relu
from ofg_jax.models.layers import Conv3D
from ofg_jax.models.resample import upsample_nearest2


class VoxelMorph(RegistrationNetwork):
    """VoxelMorph U-Net: ``(B, *img_size, 2) -> (B, *img_size, 3)`` displacement.

    Encoder: stride-2 3x3x3 convs with ``enc_features``. Decoder: a 3x3x3 conv per
    ``dec_features`` entry, each followed by nearest x2 upsampling and
    concatenation of the encoder feature (or the input) of that resolution. Then
    3x3x3 convs ``final_features`` at full resolution and a 3x3x3 flow head
    initialised ``N(0, 1e-5)`` with zero bias. LeakyReLU(0.2) after every conv but
    the head. The defaults have 274,387 parameters (2 input channels).

    Attributes (besides those of ``RegistrationNetwork``):
      enc_features, dec_features, final_features: channels per conv;
        ``len(dec_features) == len(enc_features)``; ``img_size`` divisible by
        ``2 ** len(enc_features)``.
    """

    enc_features: Sequence[int] = (8, 32, 32, 32)
    dec_features: Sequence[int] = (32, 32, 32, 32)
    final_features: Sequence[int] = (32, 8, 8)

    def check_size(self) -> None:
        """Raises ``ValueError`` if ``img_size`` cannot go through the U-Net."""
        if len(self.dec_features) != len(self.enc_features):
            raise ValueError(
                f"VoxelMorph needs as many dec_features as enc_features, got "
                f"{tuple(self.dec_features)} and {tuple(self.enc_features)}")
        check_divisible("VoxelMorph", self.img_size, 2 ** len(self.enc_features),
                        f"{len(self.enc_features)} stride-2 levels")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x``: ``(B, D, H, W, 2)``, moving then fixed. ``train`` is unused."""
        del train
        self.check_size()
        self.check_input(x)
        dtype = self.compute_dtype
        conv = lambda features, stride, name: Conv3D(
            features, 3, stride, 1, dtype=dtype, impl=self.conv_impl, name=name)
        act = lambda h: leaky_relu(h, 0.2)

        def conv_act(name, features):
            """``h[, skip] -> act(conv([upsample(h), skip]))``: a stage of ``remat``.

            The upsampling and concatenation before a conv belong to its stage,
            so that ``remat`` keeps only the coarser ``h`` and the skip.
            """
            def run(mdl, h, *skip):
                if skip:  # the concatenation [upsample(h), skip], made by the conv
                    h = (upsample_nearest2(h), skip[0])
                return act(conv(features, 1, name)(h))
            return self.stage(run)

        h = x.astype(dtype)
        skips = [h]
        for i, features in enumerate(self.enc_features):
            # Not stages: each output is kept anyway, as a skip.
            h = act(conv(features, 2, f"enc_{i}")(h))
            skips.append(h)
        skips.pop()  # the bottleneck itself is not a skip
        for i, features in enumerate(self.dec_features):
            h = conv_act(f"dec_{i}", features)(self, h, *([skips.pop()] if i else []))
        for i, features in enumerate(self.final_features):
            h = conv_act(f"final_{i}", features)(self, h, *([skips.pop()] if i == 0 else []))
        return self.flow(h)
