"""Half-resolution training (``data.downsample``): block means in, the coarse
displacement upsampled for a full-resolution evaluation."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ofg_jax.configs import demo
from ofg_jax.settings import config as config_lib
from ofg_jax import data as data_lib
from ofg_jax.training import scoring
from ofg_jax import evaluate
from ofg_jax.training import loop
from ofg_jax.resolution import block_mean, upsample_displacement
from tests.references import np_dice, np_jacobian_determinant, np_sdlogj, np_warp

FULL = (16, 20, 12)


def np_upsample(disp, factor):
    """float64: linear interpolation between coarse voxel centres (fine coordinate
    ``(i + 0.5) / f - 0.5``, clamped at the edges), values times ``factor``."""
    fine = [n * factor for n in disp.shape[:-1]]
    coords = np.meshgrid(*[np.clip((np.arange(n) + 0.5) / factor - 0.5, 0, n // factor - 1)
                           for n in fine], indexing="ij")
    return factor * np.stack([ndimage.map_coordinates(disp[..., k].astype(np.float64),
                                                      coords, order=1)
                              for k in range(disp.shape[-1])], -1)


def test_block_mean_and_upsampling_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.random(FULL)
    want = np.zeros([n // 2 for n in FULL])
    for offset in np.ndindex(2, 2, 2):
        want += x[offset[0]::2, offset[1]::2, offset[2]::2] / 8
    np.testing.assert_allclose(block_mean(x, 2), want, rtol=1e-12)
    coarse = rng.normal(size=(8, 10, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(upsample_displacement(coarse, 2), np_upsample(coarse, 2),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        block_mean(np.zeros((5, 4, 4)), 2)


class FixedDisp(nn.Module):
    """Predicts one displacement for every input."""

    disp: tuple

    @nn.compact
    def __call__(self, x, train=False):
        return jnp.broadcast_to(jnp.asarray(np.array(self.disp, np.float32)),
                                x.shape[:-1] + (3,))


def test_full_resolution_evaluation_of_a_half_resolution_network():
    rng = np.random.default_rng(1)
    coarse = ndimage.gaussian_filter(rng.normal(size=(8, 10, 6, 3)), (1, 1, 1, 0)) * 3
    coarse = coarse.astype(np.float32)
    labels = (1, 2, 3)
    moving_seg = rng.integers(0, 4, FULL).astype(np.int32)
    fixed_seg = rng.integers(0, 4, FULL).astype(np.int32)
    image = rng.random(FULL).astype(np.float32)
    eval_fn = scoring.make_model_eval_fn(FixedDisp(tuple(coarse.tolist())), labels,
                                            downsample=2)
    got = eval_fn({}, image, image, moving_seg, fixed_seg)

    disp = np_upsample(coarse, 2)
    assert np.abs(disp).max() > 2  # A field that moves labels: a real check.
    np.testing.assert_allclose(
        got["dice"], np_dice(np_warp(moving_seg, disp, order=0), fixed_seg, labels),
        atol=1e-6)
    np.testing.assert_allclose(got["non_pos_jacobian_pct"],
                               100 * np.mean(np_jacobian_determinant(disp) <= 0),
                               atol=1e-4)
    np.testing.assert_allclose(got["sdlogj"], np_sdlogj(disp), rtol=1e-4)


def tiny(**overrides):
    config = config_lib.with_overrides(config_lib.complete(demo.get_config()), {
        "data.img_size": (32, 32, 32), "data.downsample": 2, "data.num_train": 2,
        "data.num_val": 1, "data.val_subjects": 1, "data.test_subjects": 1,
        "train.max_steps": 2, "train.figures": False, "ofg.steps": 2,
        "model.enc_features": (4, 8), "model.dec_features": (8, 8),
        "model.final_features": (4,), "model.conv_impl": "xla"})
    return config_lib.with_overrides(config, overrides)


def test_a_half_resolution_run_trains_and_evaluates_at_full_resolution(tmp_path, capsys):
    config = tiny()
    data = data_lib.create(config.data, 0)
    assert data.img_size == (16, 16, 16) and data.full_size == (32, 32, 32)
    item = data.train_plan(0)[0]
    np.testing.assert_allclose(data.load_train(item)["fixed"],
                               block_mean(data_lib.create(tiny(**{
                                   "data.downsample": 1}).data, 0).load_train(item)["fixed"],
                                          2), rtol=1e-6)
    assert data.val_pairs()[0].fixed.shape == (32, 32, 32)  # Evaluated at full size.

    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 2 and 0 < summary["final"]["dice"] <= 1
    record = config_lib.from_json(str(tmp_path / "config.json"))
    assert record.data.img_size == (32, 32, 32) and record.data.downsample == 2
    result = evaluate.evaluate_split(str(tmp_path), split="val", checkpoint="latest",
                                     out=str(tmp_path / "val"))
    assert result["dice"]["mean"] == pytest.approx(summary["final"]["dice"], rel=1e-6)


def test_the_coarse_grid_must_fit_the_network(tmp_path):
    config = tiny(**{"data.downsample": 4})  # 8^3 for a 4-level VoxelMorph.
    config = config_lib.with_overrides(config, {"model.enc_features": (4, 8, 8, 8),
                                                "model.dec_features": (8, 8, 8, 8)})
    with pytest.raises(config_lib.ConfigError, match=r"\(8, 8, 8\).*divisible by 16"):
        loop.train_and_evaluate(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()
