"""Tests of the training loop, the train step, evaluation and checkpointing."""

import csv
import json
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ofg_jax.configs import default
from ofg_jax.training import checkpoints
from ofg_jax.settings import config as config_lib
from ofg_jax.training import scoring
from ofg_jax.training import input_pipeline
from ofg_jax import ncc
from ofg_jax import refine
from ofg_jax import schedules
from ofg_jax.training import loop
from ofg_jax.training import step as train_step
from ofg_jax import warp
from tests.compilation_cache import persistent_compilation_cache
from tests.references import np_dice, np_grad_loss, np_jacobian_determinant, np_warp
from tests.step_fixtures import TinyNet, random_batch


# ---------------------------------------------------------------------------
# A stand-in network for the evaluation tests.


class FixedDisp(nn.Module):
    """Predicts the same displacement for every input (no parameters)."""

    disp: tuple

    @nn.compact
    def __call__(self, x, train=False):
        disp = jnp.asarray(np.array(self.disp, np.float32))
        return jnp.broadcast_to(disp, x.shape[:-1] + (3,))


def small_config(mode="ofg", **train_overrides):
    config = default.get_config()
    config.data.name = "synthetic"
    config.train.mode = mode
    config.train.epochs = 4
    config.ofg.steps = 3
    config.train.update(train_overrides)
    return config


# ---------------------------------------------------------------------------
# Learning rates.


def test_lr_schedule_is_reference_poly_decay_by_epoch():
    lr0, epochs, steps_per_epoch = 3e-4, 7, 5
    schedule = jax.jit(schedules.make_lr_schedule(lr0, epochs, steps_per_epoch))
    for step in range(epochs * steps_per_epoch + 3):
        epoch = min(step // steps_per_epoch, epochs - 1)
        expected = round(lr0 * (1 - epoch / epochs) ** 0.9, 8)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# The train step.


@pytest.mark.parametrize("mode", ["ofg", "unsupervised"])
def test_train_step_loss_and_gradient_match_hand_computation(mode):
    size, steps_per_epoch = (12, 10, 8), 3
    config = small_config(mode, learning_rate=1e-3)
    model = TinyNet()
    state = train_step.create_train_state(config, model, size, steps_per_epoch)
    params0 = jax.tree.map(np.array, state.params)  # Copies: the step donates state.
    rng_key = np.array(state.rng)
    batch = random_batch(np.random.default_rng(1), 2, size)

    step = train_step.make_train_step(config_lib.resolve(config), steps_per_epoch, size)
    new_state, metrics = step(state, batch)

    # By hand: the prediction with the step-0 dropout key; in OFG mode the
    # refined target is a constant computed separately, and the gradient flows
    # through the prediction only.
    x = jnp.stack([batch["moving"], batch["fixed"]], axis=-1)
    key = jax.random.fold_in(jnp.asarray(rng_key), 0)
    predict = lambda p: model.apply({"params": p}, x, train=True,
                                    rngs={"dropout": key})
    weight = 0.02 if mode == "ofg" else 1.0

    @jax.jit
    def by_hand(params):
        pred = predict(params)
        if mode == "ofg":
            target = jax.vmap(lambda m, f, d: refine(
                m, f, d, steps=3, learning_rate=0.1, reg_weight=1.0))(
                    batch["moving"], batch["fixed"], pred)
            data_loss = lambda d: jnp.mean((d - target) ** 2)
        else:
            target = None
            data_loss = lambda d: -jnp.mean(jax.vmap(ncc)(
                batch["fixed"], jax.vmap(warp)(batch["moving"], d)))
        smoothness = lambda u: sum(jnp.mean(jnp.diff(u, axis=k) ** 2)
                                   for k in range(3)) / 3
        loss = lambda p: (data_loss(predict(p))
                          + weight * jnp.mean(jax.vmap(smoothness)(predict(p))))
        return pred, target, data_loss(pred), jax.grad(loss)(params)

    pred, target, data_term, grads = by_hand(params0)
    if mode == "ofg":
        data_term = np.mean((np.float64(pred) - np.float64(target)) ** 2)
    reg_term = np.mean([np_grad_loss(d) for d in np.asarray(pred)])
    np.testing.assert_allclose(float(metrics["loss"]), data_term + weight * reg_term,
                               rtol=1e-5)
    np.testing.assert_allclose(float(metrics["similarity"]), data_term, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad"]), reg_term, rtol=1e-5)
    grad_norm = np.sqrt(sum(np.sum(np.float64(g) ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1e-4)

    # First PyTorch amsgrad step: p - lr * g / (|g| + eps), lr of epoch 0.
    expected = jax.tree.map(lambda p, g: p - 1e-3 * g / (np.abs(g) + 1e-8),
                            params0, jax.device_get(grads))
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert int(new_state.step) == 1


def test_train_step_follows_both_lr_decays_without_recompiling(monkeypatch):
    # The settings of the OFG hand-computation test: its compilation is reused.
    size, steps_per_epoch = (12, 10, 8), 3
    config = small_config(learning_rate=1e-3)
    # Tracing the step a second time (a recompilation) fails the test.
    monkeypatch.setattr(train_step, "train_step",
                        chex.assert_max_traces(train_step.train_step, n=1))
    state = train_step.create_train_state(config, TinyNet(), size, steps_per_epoch)
    step = train_step.make_train_step(config_lib.resolve(config), steps_per_epoch, size)
    rng = np.random.default_rng(0)
    for i in range(7):
        state, metrics = step(state, random_batch(rng, 2, size))
        epoch = i // steps_per_epoch
        np.testing.assert_allclose(float(metrics["lr"]),
                                   round(1e-3 * (1 - epoch / 4) ** 0.9, 8), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["ofg_lr"]),
                                   round(0.1 * (1 - epoch / 4) ** 0.9, 8), rtol=1e-6)


def test_reg_weight_defaults_to_the_modes_reference_value():
    assert config_lib.reg_weight(small_config("ofg")) == 0.02
    assert config_lib.reg_weight(small_config("unsupervised")) == 1.0
    assert config_lib.reg_weight(small_config("ofg", reg_weight=0.5)) == 0.5


# ---------------------------------------------------------------------------
# Evaluation.


def test_evaluation_matches_numpy_dice_and_jacobian():
    rng = np.random.default_rng(0)
    size, labels = (10, 12, 9), (1, 2, 4)
    disp = rng.normal(0, 0.7, size + (3,)).astype(np.float32)
    pairs = []
    for i in range(3):
        moving_seg = rng.integers(0, 5, size).astype(np.int32)
        fixed_seg = rng.integers(0, 5, size).astype(np.int32)
        pairs.append(evaluate_pair(f"pair{i}", moving_seg, fixed_seg, rng))

    eval_fn = scoring.make_model_eval_fn(FixedDisp(tuple(disp.tolist())), labels)
    result = scoring.evaluate(eval_fn, {}, pairs, labels)

    folding = 100.0 * np.mean(np_jacobian_determinant(disp) <= 0)
    assert 0 < folding < 100  # The random field folds somewhere: a real check.
    per_pair = [np_dice(np_warp(p.moving_seg, disp, order=0), p.fixed_seg, labels)
                for p in pairs]
    for row, dice in zip(result.rows, per_pair):
        np.testing.assert_allclose([row[f"dice_{l}"] for l in labels], dice, atol=1e-6)
        np.testing.assert_allclose(row["dice"], dice.mean(), atol=1e-6)
        np.testing.assert_allclose(row["non_pos_jacobian_pct"], folding, atol=1e-4)
    np.testing.assert_allclose(result.dice, np.mean(per_pair), atol=1e-6)
    np.testing.assert_allclose(result.non_pos_jacobian_pct, folding, atol=1e-4)

    identity = scoring.evaluate(scoring.make_identity_eval_fn(labels), None,
                                   pairs, labels)
    np.testing.assert_allclose(
        identity.dice, np.mean([np_dice(p.moving_seg, p.fixed_seg, labels)
                                for p in pairs]), atol=1e-6)
    assert identity.non_pos_jacobian_pct == 0


def evaluate_pair(name, moving_seg, fixed_seg, rng):
    from ofg_jax.data import Pair
    return Pair(name, rng.random(moving_seg.shape).astype(np.float32),
                rng.random(moving_seg.shape).astype(np.float32), moving_seg, fixed_seg)


# ---------------------------------------------------------------------------
# Configuration and input checks.


@pytest.mark.parametrize("key, value, message", [
    ("train.mode", "foo", "train.mode='foo'"),
    ("train.epochs", 0, "train.epochs=0"),
    ("train.batch_size", -1, "train.batch_size=-1"),
    ("train.similarity", "l2", "train.similarity='l2'"),
    ("ofg.similarity", "cc", "ofg.similarity='cc'"),
    ("ofg.steps", -2, "ofg.steps=-2"),
    ("train.learning_rate", -1.0, "train.learning_rate=-1.0"),
])
def test_invalid_config_values_are_named(key, value, message):
    config = small_config()
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        config_lib.validate(config)


def test_check_pair_rejects_mismatched_shapes_and_non_finite_images():
    good = np.zeros((4, 5, 6), np.float32)
    input_pipeline.check_pair(good, good, (4, 5, 6), "pair x")
    with pytest.raises(ValueError, match=r"pair x.*\(4, 5, 6\).*\(4, 5, 5\)"):
        input_pipeline.check_pair(good, good[..., :5], (4, 5, 6), "pair x")
    with pytest.raises(ValueError, match="img_size is"):
        input_pipeline.check_pair(good[..., :5], good[..., :5], (4, 5, 6), "pair x")
    bad = good.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="fixed image has non-finite"):
        input_pipeline.check_pair(good, bad, (4, 5, 6), "pair x")


# ---------------------------------------------------------------------------
# End-to-end runs of `train_and_evaluate` on tiny data in every format.

SIZE = (16, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Shares compiled train and eval steps between the runs of this module."""
    with persistent_compilation_cache(str(tmp_path_factory.mktemp("xla"))):
        yield


def load_config(name):
    import importlib
    return importlib.import_module(f"ofg_jax.configs.{name}").get_config()


def tiny_run_config(name="demo", root=None, **train_overrides):
    """The dataset's config at toy size: a couple of short epochs, every step logged."""
    config = load_config(name)
    if name == "demo":
        config.data.img_size = SIZE
        config.data.num_train = 4
        config.data.num_val = 2
    else:
        config.data.root = str(root)
    config.train.epochs = 2
    config.train.log_every = 1
    config.train.learning_rate = 1e-3
    config.checkpoint.keep_best = 1
    config.train.figures = False  # Written and checked once, in the resume test.
    config.train.update(train_overrides)
    return config


def read_metrics(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return [row for row in csv.DictReader(f) if row["split"] == split]


def train_losses(workdir):
    return {int(row["step"]): float(row["loss"]) for row in read_metrics(workdir)}


def tensorboard_scalars(workdir):
    """``{tag: {step: value}}`` read back from the event files (TFRecord framing)."""
    import struct
    from tensorboardX.proto import event_pb2
    scalars = {}
    folder = os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def check_outputs(workdir, summary, num_labels):
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f) == summary
    for key in ("identity", "initial", "final", "best"):
        assert 0 <= summary[key]["dice"] <= 1
        assert 0 <= summary[key]["non_pos_jacobian_pct"] <= 100
    assert summary["steps"] > 0 and summary["steps_per_second"] > 0
    assert all(math.isfinite(float(row["loss"])) for row in read_metrics(workdir))
    val = read_metrics(workdir, "val")
    assert [int(row["step"]) for row in val][0] == 0
    assert int(val[-1]["step"]) == summary["steps"]
    with open(os.path.join(workdir, "eval", f"step_{summary['steps']:06d}.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len([c for c in rows[0] if c.startswith("dice_")]) == num_labels
    np.testing.assert_allclose(np.mean([float(r["dice"]) for r in rows]),
                               summary["final"]["dice"], rtol=1e-6)
    scalars = tensorboard_scalars(workdir)
    assert {"train/loss", "train/lr", "train/ofg_lr", "val/dice",
            "val/non_pos_jacobian_pct", "val/sdlogj"} <= set(scalars)
    assert scalars["val/sdlogj"][summary["steps"]] == pytest.approx(
        summary["final"]["sdlogj"], rel=1e-6)
    with open(os.path.join(workdir, "splits.json")) as f:
        splits = json.load(f)
    assert set(splits) == {"train", "val", "test"} and splits["train"] and splits["val"]
    assert scalars["val/dice"][summary["steps"]] == pytest.approx(
        summary["final"]["dice"], rel=1e-6)
    for row in read_metrics(workdir):
        assert scalars["train/loss"][int(row["step"])] == pytest.approx(
            float(row["loss"]), rel=1e-6)
    assert summary["steps"] in checkpoints.Checkpoints(
        os.path.join(workdir, "checkpoints"), 1).all_steps()


# Four training pairs per epoch in every format, like the synthetic runs below:
# the train step depends on the steps per epoch, and then compiles only once.
@pytest.mark.parametrize("name, write, subjects", [
    ("ixi", "write_ixi", {"num_train": 4}),
    ("oasis", "write_oasis", {"num_train": 2}),  # Both directions: 4 pairs.
    ("lpba", "write_lpba", {"train": ("S02", "S03", "S04", "S07")}),
    ("abdomen_ct", "write_abdomen", {})])
def test_every_dataset_format_trains_end_to_end(tmp_path, name, write, subjects):
    import data_fixtures
    getattr(data_fixtures, write)(str(tmp_path / "data"), np.random.default_rng(0),
                                  shape=SIZE, **subjects)
    config = tiny_run_config(name, tmp_path / "data", max_steps=2)
    # The reference inner settings everywhere (abdomen_ct.py has MSE, 3 steps):
    # one train step compilation serves all formats.
    config.ofg.similarity, config.ofg.steps = "ncc", 10
    summary = loop.train_and_evaluate(config, str(tmp_path / "work"))
    assert summary["steps"] == 2
    from ofg_jax import data as data_lib
    check_outputs(str(tmp_path / "work"), summary,
                  len(data_lib.create(config.data, 0).labels))


def test_unsupervised_mode_trains_end_to_end(tmp_path):
    config = tiny_run_config(mode="unsupervised", max_steps=2)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 2
    check_outputs(str(tmp_path), summary, 26)


def diverging_data(create, epoch, position):
    """Wraps ``data_lib.create``: one training pair gets intensities of 1e30.

    They pass the input checks (finite) but overflow the loss, as a diverging
    run would.
    """
    def create_diverging(config, seed):
        data = create(config, seed)
        plan_of = data.train_plan
        bad_item = plan_of(epoch)[position]
        load = data.load_train

        def load_train(item):
            pair = load(item)
            if item == bad_item:
                pair = {k: np.asarray(v) * np.float32(1e30) for k, v in pair.items()}
            return pair

        data.load_train = load_train
        return data

    return create_diverging


def test_resume_and_reruns_reproduce_the_uninterrupted_run(tmp_path, monkeypatch):
    full = str(tmp_path / "full")
    summary = loop.train_and_evaluate(tiny_run_config(figures=True), full)
    for name in ("curves", "slices", "grid", "jacobian", "labels"):
        with open(os.path.join(full, "figures", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(full, "config.json")) as f:
        assert json.load(f)["data"]["img_size"] == list(SIZE)
    assert summary["steps"] == 8
    reference = train_losses(full)
    assert sorted(reference) == list(range(1, 9))
    check_outputs(full, summary, 26)

    # Stopped in the middle of epoch 2, then a continuation that diverges at
    # step 6: it stops with a clear error and leaves the last checkpoint as it was.
    resumed = str(tmp_path / "resumed")
    loop.train_and_evaluate(tiny_run_config(max_steps=5), resumed)
    with monkeypatch.context() as patch:
        patch.setattr(loop.data_lib, "create", diverging_data(loop.data_lib.create,
                                                               epoch=1, position=1))
        with pytest.raises(loop.NonFiniteLossError,
                           match=r"step 6.*last good checkpoint, step 5"):
            loop.train_and_evaluate(tiny_run_config(), resumed)
    assert checkpoints.Checkpoints(
        os.path.join(resumed, "checkpoints"), 1).latest_step() == 5

    # What a kill in the middle of saving step 9 leaves: orbax's unrenamed
    # temporary directory. It is ignored, then removed.
    unfinished = os.path.join(resumed, "checkpoints", "9.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(unfinished, "state"))
    with open(os.path.join(unfinished, "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"\x00partial")

    # Resuming from step 5 continues the uninterrupted run exactly. Steps 1-5
    # were a separate run with the same seed, so they check reproducibility too.
    summary_resumed = loop.train_and_evaluate(tiny_run_config(), resumed)
    losses = train_losses(resumed)
    assert sorted(losses) == list(range(1, 9))  # One row per step, no duplicates.
    np.testing.assert_allclose([losses[s] for s in range(1, 9)],
                               [reference[s] for s in range(1, 9)], rtol=1e-6)
    assert summary_resumed["final"] == pytest.approx(summary["final"], rel=1e-6)
    assert summary_resumed["initial"] == summary["initial"]
    assert not os.path.exists(unfinished)
