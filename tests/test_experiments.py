"""Smoke tests of the experiment scripts (experiments/*.py) at toy size.

Every script runs in-process through its ``main(argv)`` on a 16^3 synthetic set
(2 training pairs, 1 validation pair, 1 epoch, a tiny VoxelMorph); the tests check
the JSON and markdown outputs. All scripts share one workdir, so identical runs
(e.g. the OFG VoxelMorph) are trained once, as they would be in real use.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments import inner_steps
from experiments import ofg_intensity
from experiments import ofg_vs_unsupervised
from experiments import optimizer_design
from experiments import plot_experiments
from experiments import self_training
from experiments import syn_baseline
from experiments import test_time_refinement
from ofg_jax.settings import config as config_lib
from ofg_jax.training import scoring
from tests.compilation_cache import persistent_compilation_cache

# A two-level VoxelMorph with XLA's convolution: the quickest to compile.
TINY = ["data.img_size=16,16,16", "data.num_train=2", "data.num_val=1",
        "data.val_subjects=1", "train.epochs=1", "ofg.steps=1",
        "model.enc_features=4,4", "model.dec_features=4,4", "model.final_features=4,",
        "model.conv_impl=xla", "checkpoint.keep_best=1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The shared workdir, with a persistent compilation cache across the runs."""
    with persistent_compilation_cache(str(tmp_path_factory.mktemp("xla"))):
        yield str(tmp_path_factory.mktemp("experiments"))


def argv(workdir, *extra):
    return ["--workdir", workdir, "--seeds", "1", *extra, "--set", *TINY]


def check_outputs(workdir, name, labels, metrics=("dice", "non_pos_jacobian_pct")):
    with open(os.path.join(workdir, f"{name}.json")) as f:
        result = json.load(f)
    for key in ("experiment", "date", "device", "command", "config", "set", "seeds",
                "records", "aggregate", "table"):
        assert key in result, key
    assert result["experiment"] == name
    assert list(result["aggregate"]) == list(labels)
    for label in labels:
        for metric in metrics:
            stats = result["aggregate"][label][metric]
            assert stats["n"] >= 1 and np.isfinite(stats["mean"]), (label, metric)
    for record in result["records"]:
        assert 0 <= record["dice"] <= 1
        assert 0 <= record["non_pos_jacobian_pct"] <= 100
    with open(os.path.join(workdir, f"{name}.md")) as f:
        markdown = f.read()
    assert result["table"] in markdown and result["table"].startswith("| ")
    return result


def test_ofg_vs_unsupervised(workdir, capsys):
    ofg_vs_unsupervised.main(argv(workdir, "--models", "voxelmorph"))
    result = check_outputs(workdir, "ofg_vs_unsupervised",
                           ["voxelmorph/unsupervised", "voxelmorph/ofg"],
                           ("dice", "best_dice", "non_pos_jacobian_pct", "sdlogj",
                            "seconds_per_step"))
    assert "| voxelmorph | 16x16x16 | 1 |" in result["table"]
    assert result["table"] in capsys.readouterr().out
    # The paired comparison: OFG minus unsupervised of the same seed.
    by_mode = {r["label"]: r for r in result["records"]}
    diff = by_mode["voxelmorph/ofg"]["dice"] - by_mode["voxelmorph/unsupervised"]["dice"]
    assert f"| voxelmorph | final Dice | {diff:+.3f} |" in result["notes"]
    paths = plot_experiments.main([os.path.join(workdir, "ofg_vs_unsupervised.json"),
                                   "--out", os.path.join(workdir, "plots")])
    assert os.path.basename(paths[0]) == "ofg_vs_unsupervised_curves.png"
    assert os.path.getsize(paths[0]) > 0


def test_small_transformer_overrides_fit_the_architectures():
    from ofg_jax import models
    for grid in [(32, 32, 32), (48, 64, 16), (64, 32, 96)]:
        for name in ("vitvnet", "transmorph"):
            overrides = ofg_vs_unsupervised.small_transformer_overrides(name, grid)
            size = overrides.pop("data.img_size")
            assert all(n % 64 == 0 and n >= g for n, g in zip(size, grid))
            kwargs = {k.split(".", 1)[1]: v for k, v in overrides.items()}
            models.create(name, size, **kwargs)  # Raises if it does not fit.
    assert ofg_vs_unsupervised.small_transformer_overrides(
        "vitvnet", (32, 32, 32))["data.img_size"] == (64, 64, 64)
    assert ofg_vs_unsupervised.small_transformer_overrides("voxelmorph", (32,) * 3) == {}


@pytest.fixture(scope="module")
def inner_steps_run(workdir):
    inner_steps.main(argv(workdir, "--steps", "1,2", "--time-repeats", "1"))
    return os.path.join(workdir, "inner_steps.json")


@pytest.fixture(scope="module")
def ofg_intensity_run(workdir):
    ofg_intensity.main(argv(workdir, "--every", "2", "--ncc-weights", "0.5",
                            "--fractions", "0.5"))
    return os.path.join(workdir, "ofg_intensity.json")


@pytest.fixture(scope="module")
def test_time_run(workdir):
    test_time_refinement.main(argv(workdir, "--k", "0,2", "--zero-steps", "3"))
    return os.path.join(workdir, "test_time_refinement.json")


def test_inner_steps(workdir, inner_steps_run):
    result = check_outputs(workdir, "inner_steps",
                           ["unsupervised", "OFG 1 steps", "OFG 2 steps"],
                           ("dice", "non_pos_jacobian_pct", "seconds_per_step"))
    assert sorted(r["ofg_steps"] for r in result["records"]) == [0, 1, 2]
    timed = result["timed_step_s"]
    assert list(timed) == ["unsupervised", "OFG 1 steps", "OFG 2 steps"]
    assert all(seconds > 0 for seconds in timed.values())
    assert all(r["timed_step_s"] == timed[r["label"]] for r in result["records"])
    with open(os.path.join(workdir, "inner_steps.md")) as f:
        markdown = f.read()
    ratio = timed["OFG 2 steps"] / timed["unsupervised"]
    assert f"| OFG 2 steps | {timed['OFG 2 steps']:.4f} | {ratio:.2f} |" in markdown


@pytest.mark.parametrize("extra, name", [
    (["--seeds", "0"], "--seeds"),
    (["--time-repeats", "-1"], "--time-repeats"),
])
def test_rejects_bad_counts(extra, name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inner_steps.main(["--steps", "1", *extra])
    assert exit_info.value.code != 0 and name in capsys.readouterr().err


def test_optimizer_design(workdir):
    # "downsampled" is only ofg.downsample=2 (tested in test_refine.py); left out
    # to keep these tests quick.
    optimizer_design.main(argv(workdir, "--designs", "instance,network",
                               "--network-width", "2", "--time-repeats", "0"))
    result = check_outputs(workdir, "optimizer_design", ["instance", "network"])
    assert result["timed_step_s"] == {}


def test_ofg_intensity(workdir, ofg_intensity_run):
    check_outputs(workdir, "ofg_intensity",
                  ["OFG (k=1, λ=0, p=1)", "every 2 epochs", "+ 0.5 × NCC",
                   "fraction p=0.5", "unsupervised"])


def test_self_training(workdir):
    self_training.main(argv(workdir, "--stages", "1"))
    result = check_outputs(workdir, "self_training",
                           ["OFG (labels every step)", "self-training (1 stages)",
                            "unsupervised"])
    st = [r for r in result["records"] if r["label"].startswith("self")][0]
    assert len(st["summary"]["stages"]) == 1 and st["summary"]["steps"] == 2
    assert os.path.exists(st["eval_csv"])


def test_test_time_refinement(workdir, test_time_run):
    result = check_outputs(workdir, "test_time_refinement",
                           ["network + 0 OFG steps", "network + 2 OFG steps",
                            "zero field + 3 steps (refine only)"],
                           ("dice", "non_pos_jacobian_pct", "seconds_per_pair"))
    # k = 0 is the network alone: the training run's own final evaluation.
    network = [r for r in result["records"] if r["steps"] == 0][0]
    trained = result["trained"][0]["summary"]["final"]
    assert network["dice"] == pytest.approx(trained["dice"], abs=1e-6)


def test_plots(workdir, inner_steps_run, test_time_run, ofg_intensity_run):
    results = [inner_steps_run, test_time_run, ofg_intensity_run]
    paths = plot_experiments.main(results + ["--out", os.path.join(workdir, "plots")])
    names = {os.path.basename(p) for p in paths}
    assert {"inner_steps_dice_vs_steps.png", "inner_steps_dice_vs_time.png",
            "test_time_dice_vs_steps.png", "test_time_dice_vs_time.png",
            "ofg_intensity_boxplot.png"} <= names
    assert all(os.path.getsize(p) > 0 for p in paths)


# ---------------------------------------------------------------------------
# The SyN baseline, with a stand-in for ANTs.


def test_physical_to_voxel_displacement_inverts_spacing_and_direction():
    rng = np.random.default_rng(0)
    voxel = rng.normal(size=(4, 5, 6, 3))
    spacing = np.array([2.0, 0.5, 1.5])
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    physical = voxel @ (direction @ np.diag(spacing)).T
    np.testing.assert_allclose(
        syn_baseline.physical_to_voxel_displacement(physical, spacing, direction),
        voxel, atol=1e-5)
    np.testing.assert_allclose(  # Unit spacing, identity: unchanged.
        syn_baseline.physical_to_voxel_displacement(voxel, np.ones(3), np.eye(3)),
        voxel, atol=1e-6)


def test_syn_baseline_metrics_with_a_fake_registration(workdir):
    """A registration that returns a known field in physical units (anisotropic
    spacing): the script must score it exactly as ofg_jax.training.scoring scores the same
    field in voxels."""
    spacing = np.array([2.0, 1.0, 0.5])
    known = np.zeros((16, 16, 16, 3), np.float32)
    known[..., 0] = 1.5
    known[4:12, 4:12, 4:12, 1] = -2.0
    calls = []

    def fake_register(moving, fixed, seed):
        calls.append(seed)
        return known * spacing, spacing, np.eye(3)

    syn_baseline.main(argv(workdir, "--seeds", "2"), register=fake_register)
    result = check_outputs(workdir, "syn_baseline",
                           ["identity", "ANTs SyN (mattes)"],
                           ("dice", "non_pos_jacobian_pct", "seconds_per_pair"))
    assert calls == [0, 1]
    config = config_lib.load(common.DEFAULT_CONFIG, TINY)
    from ofg_jax import data as data_lib
    data = data_lib.create(config.data, 0)
    pair = data.val_pairs()[0]
    metrics = scoring.pair_metrics(jnp.asarray(known), pair.moving_seg,
                                      pair.fixed_seg, data.labels)
    dice, folding = metrics["dice"], metrics["non_pos_jacobian_pct"]
    syn = [r for r in result["records"] if r["label"].startswith("ANTs")]
    assert len(syn) == 2
    for record in syn:
        assert record["dice"] == pytest.approx(float(np.mean(dice)), abs=1e-6)
        assert record["non_pos_jacobian_pct"] == pytest.approx(float(folding), abs=1e-6)
    assert folding > 0  # The field folds at the block's faces: a real check.


def test_ants_displacement_field_conversion_on_a_known_translation(tmp_path):
    """With antspyx only: a translation written as an ANTs transform, composed
    into ANTs' displacement field and converted, is the translation in voxels,
    and ofg_jax.warp with it reproduces ants.apply_transforms."""
    ants = pytest.importorskip("ants")
    from ofg_jax import warp
    rng = np.random.default_rng(0)
    shape = (20, 18, 16)
    from scipy import ndimage
    moving = ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float32)
    spacing = (2.0, 1.0, 1.5)
    translation = np.array([3.0, -2.0, 1.5])  # Physical (mm).
    fixed_image = ants.from_numpy(np.zeros(shape, np.float32), spacing=spacing)
    moving_image = ants.from_numpy(moving, spacing=spacing)
    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, translation=tuple(translation))
    path = str(tmp_path / "translation.mat")
    ants.write_transform(transform, path)
    composed = ants.apply_transforms(fixed_image, moving_image, [path],
                                     compose=str(tmp_path / "composed_"))
    field = ants.image_read(composed)
    disp = syn_baseline.physical_to_voxel_displacement(
        field.numpy(), np.asarray(field.spacing), np.asarray(field.direction))
    np.testing.assert_allclose(disp, np.broadcast_to(translation / spacing, disp.shape),
                               atol=1e-4)
    warped_ants = ants.apply_transforms(fixed_image, moving_image, [path]).numpy()
    warped_ours = np.asarray(warp(jnp.asarray(moving), jnp.asarray(disp)))
    inside = (slice(3, -3),) * 3  # Away from the zero-padded border.
    np.testing.assert_allclose(warped_ours[inside], warped_ants[inside], atol=1e-4)
