"""OFG and unsupervised training of a registration network, with evaluation.

``train_and_evaluate(config, workdir)`` runs a whole experiment: it evaluates the
untrained network (step 0), trains epoch by epoch with a jitted train step,
evaluates after every ``train.eval_every_epochs`` epochs, and writes
``metrics.csv``, ``eval/step_XXXXXX.csv``, TensorBoard scalars, orbax checkpoints and
``summary.json`` into ``workdir``. Re-running with the same workdir resumes from the
latest checkpoint and continues exactly the sequence of an uninterrupted run.
"""

import csv
import json
import math
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from ofg_jax import checkpoint as checkpoint_lib
from ofg_jax import data as data_lib
from ofg_jax import evaluate as evaluate_lib
from ofg_jax import grad_loss
from ofg_jax import models
from ofg_jax import parallel
from ofg_jax import ofg_loss
from ofg_jax import poly_lr
from ofg_jax import registration_energy
from ofg_jax import torch_adam
from ofg_jax.refine import refine_with_network

MODES = ("ofg", "unsupervised")
SIMILARITIES = ("ncc", "mse")
# Weight of Grad(pred) in the model loss when ``train.reg_weight`` is None.
REFERENCE_REG_WEIGHT = {"ofg": 0.02, "unsupervised": 1.0}
# Optimiser designs of ``ofg.design`` (the downsampled one is ``ofg.downsample``).
DESIGNS = ("instance", "network")
# Ablation keys of ``config.ofg`` and the values that give plain OFG.
OFG_VARIANT_DEFAULTS = {"design": "instance", "network_width": 32,
                        "every_epochs": 1, "fraction": 1.0, "ncc_weight": 0.0}
# ``fold_in`` constant of the per-pair draw of ``ofg.fraction`` (from the step's
# dropout key, which the network's own dropout uses unchanged).
FRACTION_STREAM = 0x0F6

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class NonFiniteLossError(RuntimeError):
    """The loss or the update became NaN or infinite; training was stopped."""


class TrainState(train_state.TrainState):
    """Flax train state plus the base dropout key and BatchNorm statistics.

    The dropout key of step ``t`` is ``fold_in(rng, t)``, so a resumed run draws the
    same keys as an uninterrupted one. ``batch_stats`` holds the running statistics
    of networks with BatchNorm (ViT-V-Net's decoder) and is empty for the others.
    """
    rng: jax.Array
    batch_stats: Any = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> dict[str, Any]:
        """The network's variables for ``model.apply`` in evaluation mode."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


# ---------------------------------------------------------------------------
# Configuration.


def reg_weight(config: ml_collections.ConfigDict) -> float:
    """The Grad weight of the model loss: ``train.reg_weight`` or the mode's default."""
    if config.train.reg_weight is None:
        return REFERENCE_REG_WEIGHT[config.train.mode]
    return float(config.train.reg_weight)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first invalid training setting."""
    train, ofg = config.train, config.ofg

    def check(ok, key, value, expected):
        if not ok:
            raise ValueError(f"invalid config: {key}={value!r}; expected {expected}")

    check(train.mode in MODES, "train.mode", train.mode, f"one of {MODES}")
    check(train.similarity in SIMILARITIES, "train.similarity", train.similarity,
          f"one of {SIMILARITIES}")
    check(ofg.similarity in SIMILARITIES, "ofg.similarity", ofg.similarity,
          f"one of {SIMILARITIES}")
    for key, value in [("train.epochs", train.epochs),
                       ("train.batch_size", train.batch_size),
                       ("train.log_every", train.log_every),
                       ("ofg.downsample", ofg.downsample)]:
        check(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
    for key, value in [("train.max_steps", train.max_steps),
                       ("train.eval_every_epochs", train.eval_every_epochs),
                       ("ofg.steps", ofg.steps),
                       ("checkpoint.keep_best", config.checkpoint.keep_best),
                       ("checkpoint.every_steps", config.checkpoint.every_steps)]:
        check(isinstance(value, int) and value >= 0, key, value, "an integer >= 0")
    # NaN passes (NaN < 0 is False): the run then stops at the first non-finite
    # update, with the same message as any other divergence.
    for key, value in [("train.learning_rate", train.learning_rate),
                       ("train.weight_decay", train.weight_decay),
                       ("ofg.learning_rate", ofg.learning_rate),
                       ("ofg.reg_weight", ofg.reg_weight)]:
        check(not value < 0, key, value, "a number >= 0")
    if train.reg_weight is not None:
        check(not train.reg_weight < 0, "train.reg_weight", train.reg_weight,
              "a number >= 0 or None")
    # The ablation keys (OFG intensity, optimiser design); absent = plain OFG.
    variant = ofg_variant(config)
    check(variant["design"] in DESIGNS, "ofg.design", variant["design"],
          f"one of {DESIGNS}")
    check(variant["design"] == "instance" or ofg.downsample == 1, "ofg.downsample",
          ofg.downsample, "1 with ofg.design='network'")
    for key in ("every_epochs", "network_width"):
        value = variant[key]
        check(isinstance(value, int) and value >= 1, f"ofg.{key}", value,
              "an integer >= 1")
    check(0 <= variant["fraction"] <= 1, "ofg.fraction", variant["fraction"],
          "a number in [0, 1]")
    check(variant["ncc_weight"] >= 0, "ofg.ncc_weight", variant["ncc_weight"],
          "a number >= 0")


def ofg_variant(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ablation settings of ``config.ofg``, with plain OFG for absent keys."""
    return {key: config.ofg.get(key, default)
            for key, default in OFG_VARIANT_DEFAULTS.items()}


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments for ``models.create``: every ``model.*`` key but ``name``."""
    return {key: value for key, value in config.model.items() if key != "name"}


# ---------------------------------------------------------------------------
# Learning rates.


def epoch_lr_table(lr0: float, epochs: int) -> np.ndarray:
    """``(epochs,)`` float32: ``poly_lr(lr0, e, epochs)`` for every epoch ``e``."""
    return np.asarray([poly_lr(lr0, epoch, epochs) for epoch in range(epochs)],
                      np.float32)


def epoch_of_step(step: jax.Array, steps_per_epoch: int, epochs: int) -> jax.Array:
    """0-based epoch of the update with 0-based index ``step``, clipped to the last."""
    return jnp.minimum(step // steps_per_epoch, epochs - 1)


def make_lr_schedule(lr0: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """An optax schedule of the update count that holds ``poly_lr`` per epoch."""
    table = jnp.asarray(epoch_lr_table(lr0, epochs))
    return lambda count: table[epoch_of_step(count, steps_per_epoch, epochs)]


# ---------------------------------------------------------------------------
# State, loss and train step.


def create_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module,
                       img_size: Sequence[int], steps_per_epoch: int) -> TrainState:
    """Initialises the network and the PyTorch-style Adam (amsgrad) optimiser.

    The network's parameters come from ``PRNGKey(config.seed)``; the model
    learning rate is ``train.learning_rate`` decayed by epoch (``poly_lr``).
    """
    tx = torch_adam(
        make_lr_schedule(config.train.learning_rate, config.train.epochs,
                         steps_per_epoch),
        amsgrad=True, weight_decay=config.train.weight_decay)

    @jax.jit  # One compilation instead of one per initialiser op.
    def create():
        init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
        variables = model.init(init_key, jnp.zeros((1, *img_size, 2), jnp.float32),
                               train=False)
        extra = set(variables) - {"params", "batch_stats"}
        if extra:
            raise ValueError(
                f"model {config.model.name!r} has variable collections "
                f"{sorted(extra)} besides 'params' and 'batch_stats'; the train step "
                "does not update them")
        state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                                  tx=tx, rng=dropout_key,
                                  batch_stats=variables.get("batch_stats", {}))
        # An int32 array rather than Python's 0: the first train step then sees
        # the same argument types as all later ones and compiles once.
        return state.replace(step=jnp.zeros([], jnp.int32))

    # XLA:CPU compiles the partitionable Threefry (JAX's default) ~5x slower: with
    # one random initialiser per layer that is half a minute for VoxelMorph.
    # Initialisation does not need partitioning.
    with jax.threefry_partitionable(False):
        return create()


def registration_loss(pred: jax.Array, moving: jax.Array, fixed: jax.Array, *,
                      mode: str, reg_weight: float, similarity: str = "ncc",
                      refine_kwargs: Optional[dict[str, Any]] = None,
                      refine_fn: Optional[Callable[..., jax.Array]] = None,
                      ncc_weight: float = 0.0,
                      use_ofg: Optional[jax.Array] = None,
                      unsupervised_reg_weight: float = REFERENCE_REG_WEIGHT[
                          "unsupervised"]
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The model loss of a batch of predictions.

    Args:
      pred: ``(B, *S, N)`` predicted displacements in voxels.
      moving, fixed: ``(B, *S)`` images.
      mode: "ofg": ``MSE(pred, stop_gradient(refine(pred))) + reg_weight *
        Grad(pred)``; "unsupervised": ``-NCC(fixed, moving o pred) + reg_weight *
        Grad(pred)`` (MSE instead of -NCC with ``similarity="mse"``).
      reg_weight: weight of the Grad regulariser.
      similarity: the unsupervised similarity term, "ncc" or "mse".
      refine_kwargs: keyword arguments of ``refine`` in "ofg" mode (steps,
        learning_rate, reg_weight of the inner energy, ...).
      refine_fn: "ofg" mode: ``refine_fn(moving, fixed, pred) -> (B, *S, N)``
        targets (batched) instead of ``refine(**refine_kwargs)``, e.g. the
        network-based optimiser or fixed pseudo labels.
      ncc_weight: "ofg" mode: adds ``ncc_weight * -NCC(fixed, moving o pred)``
        (the unsupervised data term) to the loss of every OFG pair.
      use_ofg: "ofg" mode: ``(B,)`` booleans (or a scalar); pairs where False get
        the unsupervised loss ``-NCC + unsupervised_reg_weight * Grad`` instead.
      unsupervised_reg_weight: Grad weight of the pairs where ``use_ofg`` is False.

    Returns:
      The scalar loss (batch mean) and its terms ``{"similarity", "grad"}``
      (with ``ncc_weight`` or ``use_ofg`` also ``ofg_fraction``, the fraction of
      pairs with an OFG target).
    """
    unsupervised_term = lambda: jax.vmap(lambda p, m, f: registration_energy(
        m, f, p, reg_weight=0.0, similarity=similarity))(pred, moving, fixed)
    if mode == "ofg":
        if refine_fn is None:
            per_pair = lambda p, m, f: ofg_loss(p, m, f, **(refine_kwargs or {}))
            ofg_term = jax.vmap(per_pair)(pred, moving, fixed)
        else:
            target = jax.lax.stop_gradient(refine_fn(moving, fixed, pred))
            ofg_term = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
        if use_ofg is not None or ncc_weight:
            # The intensity ablations: per-pair OFG or unsupervised loss.
            unsupervised = unsupervised_term()
            use = jnp.broadcast_to(jnp.asarray(True if use_ofg is None else use_ofg),
                                   ofg_term.shape)
            smoothness = jax.vmap(grad_loss)(pred)
            data = jnp.where(use, ofg_term + ncc_weight * unsupervised, unsupervised)
            weight = jnp.where(use, reg_weight, unsupervised_reg_weight)
            loss = jnp.mean(data + weight * smoothness)
            return loss, {"similarity": jnp.mean(data), "grad": jnp.mean(smoothness),
                          "ofg_fraction": jnp.mean(use.astype(jnp.float32))}
        data_term = jnp.mean(ofg_term)
    elif mode == "unsupervised":
        data_term = jnp.mean(unsupervised_term())
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    smoothness = jnp.mean(jax.vmap(grad_loss)(pred))
    loss = data_term + reg_weight * smoothness
    return loss, {"similarity": data_term, "grad": smoothness}


def make_network_refiner(config: ml_collections.ConfigDict, img_size: Sequence[int]
                         ) -> tuple[flax.linen.Module, Any]:
    """The residual VoxelMorph of ``ofg.design="network"`` and its initial params.

    Channels ``w/2, w, w, w`` (encoder), ``w`` x4 (decoder), ``w, w/2, w/2`` (full
    resolution) for ``w = ofg.network_width`` (32: the reference VoxelMorph);
    parameters from ``PRNGKey(config.seed + 1)``, the same for every pair; the
    convolution implementation of the main network (``model.conv_impl``).
    """
    width = int(ofg_variant(config)["network_width"])
    half = max(width // 2, 1)
    network = models.create("voxelmorph", img_size, enc_features=(half,) + (width,) * 3,
                            dec_features=(width,) * 4, final_features=(width, half, half),
                            conv_impl=config.model.get("conv_impl", "auto"))
    with jax.threefry_partitionable(False):
        params = jax.jit(network.init)(jax.random.PRNGKey(config.seed + 1),
                                       jnp.zeros((1, *img_size, 2), jnp.float32))
    return network, params["params"]


def make_train_step(config: ml_collections.ConfigDict,
                    steps_per_epoch: int) -> Callable[[TrainState, Batch],
                                                      tuple[TrainState, Metrics]]:
    """Returns the jitted ``train_step(state, batch) -> (state, metrics)``.

    ``batch`` holds ``moving`` and ``fixed``, ``(B, *S)`` float32. Both learning rates
    follow ``poly_lr`` by epoch, derived from ``state.step`` inside the step, so one
    compilation serves the whole run. The state argument is donated.
    """
    epochs = config.train.epochs
    mode = config.train.mode
    weight = reg_weight(config)
    model_lr = make_lr_schedule(config.train.learning_rate, epochs, steps_per_epoch)
    inner_lr = make_lr_schedule(config.ofg.learning_rate, epochs, steps_per_epoch)
    refine_kwargs = dict(steps=config.ofg.steps, reg_weight=config.ofg.reg_weight,
                         similarity=config.ofg.similarity,
                         optimizer=config.ofg.optimizer,
                         downsample=config.ofg.downsample)
    variant = ofg_variant(config)
    networks = {}  # img_size -> (network, params) of ofg.design="network".

    def variant_kwargs(step, moving, ofg_lr, dropout_key):
        """``registration_loss`` keywords of the ablations (none for plain OFG)."""
        if mode != "ofg":
            return {}
        kwargs = {"ncc_weight": float(variant["ncc_weight"])}
        every, fraction = variant["every_epochs"], float(variant["fraction"])
        if every > 1 or fraction < 1:
            epoch = epoch_of_step(step, steps_per_epoch, epochs)
            use = jnp.broadcast_to(epoch % every == 0, moving.shape[:1])
            if fraction < 1:
                key = jax.random.fold_in(dropout_key, FRACTION_STREAM)
                use = use & jax.random.bernoulli(key, fraction, moving.shape[:1])
            kwargs["use_ofg"] = use
        if variant["design"] == "network":
            img_size = tuple(moving.shape[1:])
            if img_size not in networks:
                with jax.ensure_compile_time_eval():  # Constants of the step.
                    networks[img_size] = make_network_refiner(config, img_size)
            network, params0 = networks[img_size]
            kwargs["refine_fn"] = jax.vmap(
                lambda m, f, d: refine_with_network(
                    m, f, d, network, params0, steps=config.ofg.steps,
                    learning_rate=ofg_lr, reg_weight=config.ofg.reg_weight,
                    similarity=config.ofg.similarity, optimizer=config.ofg.optimizer))
        return kwargs

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        moving, fixed = batch["moving"], batch["fixed"]
        ofg_lr = inner_lr(state.step)
        dropout_key = jax.random.fold_in(state.rng, state.step)
        extra = variant_kwargs(state.step, moving, ofg_lr, dropout_key)

        def loss_fn(params):
            pair = jnp.stack([moving, fixed], axis=-1)
            variables = {**state.variables, "params": params}
            if state.batch_stats:  # BatchNorm uses and updates the batch statistics.
                pred, updates = state.apply_fn(variables, pair, train=True,
                                               rngs={"dropout": dropout_key},
                                               mutable=["batch_stats"])
                batch_stats = updates["batch_stats"]
            else:
                pred = state.apply_fn(variables, pair, train=True,
                                      rngs={"dropout": dropout_key})
                batch_stats = state.batch_stats
            loss, terms = registration_loss(
                pred, moving, fixed, mode=mode, reg_weight=weight,
                similarity=config.train.similarity,
                refine_kwargs={**refine_kwargs, "learning_rate": ofg_lr}, **extra)
            return loss, (terms, batch_stats)

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        update_norm = optax.tree.norm(
            jax.tree.map(jnp.subtract, new_state.params, state.params))
        metrics = {
            "loss": loss, **terms,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": update_norm,
            "lr": model_lr(state.step),
            "ofg_lr": ofg_lr,
        }
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


# ---------------------------------------------------------------------------
# Input pipeline.


def check_pair(moving: np.ndarray, fixed: np.ndarray, img_size: Sequence[int],
               where: str) -> None:
    """Raises ``ValueError`` unless both images have shape ``img_size`` and are finite."""
    img_size = tuple(img_size)
    if moving.shape != fixed.shape:
        raise ValueError(f"{where}: moving image of shape {moving.shape} and fixed "
                         f"image of shape {fixed.shape} differ in shape")
    if moving.shape != img_size:
        raise ValueError(f"{where}: images of shape {moving.shape}, but the dataset's "
                         f"img_size is {img_size}")
    for name, image in (("moving", moving), ("fixed", fixed)):
        if not np.all(np.isfinite(image)):
            raise ValueError(f"{where}: the {name} image has non-finite intensities "
                             f"({int(np.sum(~np.isfinite(image)))} voxels)")


def epoch_batches(data: Any, epoch: int, start: int, steps_per_epoch: int,
                  batch_size: int, local: slice = slice(None)
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Host batches of ``epoch`` from step ``start`` on (to resume mid-epoch).

    Items past ``steps_per_epoch * batch_size`` (an incomplete last batch) are
    dropped so that every batch has the same shape. Only the items ``local`` of
    each global batch are loaded (this process's share on several hosts).
    """
    plan = data.train_plan(epoch)
    if len(plan) < steps_per_epoch * batch_size:
        raise ValueError(
            f"train_plan({epoch}) has {len(plan)} items, fewer than the "
            f"{steps_per_epoch * batch_size} of epoch 0")
    for step in range(start, steps_per_epoch):
        items = plan[step * batch_size:(step + 1) * batch_size][local]
        moving, fixed = [], []
        for item in items:
            pair = data.load_train(item)
            m, f = np.asarray(pair["moving"]), np.asarray(pair["fixed"])
            check_pair(m, f, data.img_size, f"training item {item!r} of epoch {epoch}")
            moving.append(m.astype(np.float32))
            fixed.append(f.astype(np.float32))
        yield {"moving": np.stack(moving), "fixed": np.stack(fixed)}


class Prefetcher:
    """Loads batches on a background thread and copies them to the device ahead.

    Iterating yields device arrays (``put(batch)``, by default ``jax.device_put``)
    while up to ``size`` further batches are being loaded; an exception raised by
    the loader is re-raised by the iterator.
    """

    _DONE = object()

    def __init__(self, batches: Iterator[Any], size: int = 2,
                 put: Callable[[Any], Any] = jax.device_put):
        self._put_on_device = put
        self._queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches,),
                                        daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _fill(self, batches):
        try:
            for batch in batches:
                if not self._put(self._put_on_device(batch)):
                    return
            self._put(self._DONE)
        except BaseException as e:  # pylint: disable=broad-except
            self._put(e)

    def __iter__(self):
        while True:
            value = self._queue.get()
            if value is self._DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield value

    def close(self) -> None:
        """Stops the loader thread (it may be waiting to hand over a batch)."""
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------
# Outputs.


METRIC_COLUMNS = ("step", "epoch", "split", "loss", "dice",
                  "non_pos_jacobian_pct", "lr", "ofg_lr", "steps_per_s")


class MetricsLog:
    """Rows of ``metrics.csv`` and TensorBoard scalars, for training and validation.

    Training metrics arrive as device arrays, one dict per step, and are fetched
    only by :meth:``flush`` (every ``train.log_every`` steps), which writes their
    mean loss as one row with the step rate over the interval and checks that
    every step was finite. On resume from ``resume_step``, rows and events that
    the interrupted run wrote after that step are dropped, so the files read like
    one uninterrupted run. With ``write=False`` (the other processes of a
    multi-host run) nothing is written, but the finiteness checks still run.
    """

    def __init__(self, workdir: str, steps_per_epoch: int,
                 resume_step: Optional[int], write: bool = True):
        self.path = os.path.join(workdir, "metrics.csv")
        self._steps_per_epoch = steps_per_epoch
        self._pending = []  # (step, device metrics), not fetched yet.
        self.last_loss = None
        self.restart_clock()
        self._tb = None
        if not write:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f)
                        if int(row["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        # Imported here: tensorboardX imports PyTorch when it is installed, which
        # takes seconds that runs failing early should not pay.
        import tensorboardX  # pylint: disable=g-import-not-at-top
        purge = None if resume_step is None else resume_step + 1
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                              purge_step=purge)

    def restart_clock(self, skip_pending: bool = False) -> None:
        """Starts timing the step rate now (after compilation, evaluation, saving)."""
        self._clock = time.perf_counter()
        self._untimed = len(self._pending) if skip_pending else 0

    def add_train_step(self, step: int, metrics: Metrics) -> None:
        self._pending.append((step, metrics))

    def flush(self) -> None:
        """Writes the pending training steps as one row.

        Raises:
          NonFiniteLossError: if a pending step had a non-finite loss or update.
        """
        if not self._pending:
            return
        timed = len(self._pending) - self._untimed
        steps = [step for step, _ in self._pending]
        fetched = jax.device_get([metrics for _, metrics in self._pending])
        elapsed = time.perf_counter() - self._clock
        self._pending = []
        for step, metrics in zip(steps, fetched):
            values = [float(metrics[k]) for k in ("loss", "grad_norm", "update_norm")]
            if not all(math.isfinite(v) for v in values):
                raise NonFiniteLossError(
                    f"non-finite training loss or update at step {step} (loss="
                    f"{values[0]}, gradient norm {values[1]}, update norm "
                    f"{values[2]}, lr {float(metrics['lr'])})")
        self.last_loss = float(np.mean([float(m["loss"]) for m in fetched]))
        self._write({"step": steps[-1], "split": "train", "loss": self.last_loss,
                     "lr": _round(fetched[-1]["lr"]),
                     "ofg_lr": _round(fetched[-1]["ofg_lr"]),
                     "steps_per_s": timed / elapsed if timed > 0 else ""})
        self.restart_clock()

    def write_eval(self, step: int, result: evaluate_lib.EvalResult) -> None:
        self._write({"step": step, "split": "val", "dice": result.dice,
                     "non_pos_jacobian_pct": result.non_pos_jacobian_pct})

    def _write(self, row: dict[str, Any]) -> None:
        if self._tb is None:
            return
        row = {"epoch": round(row["step"] / self._steps_per_epoch, 4), **row}
        row = {key: row.get(key, "") for key in METRIC_COLUMNS}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow(row)
        for key in METRIC_COLUMNS[3:]:
            if row[key] != "":
                self._tb.add_scalar(f"{row['split']}/{key}", row[key], row["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _round(value) -> float:
    # float32 learning rates, written without float32 noise (1e-4, not 9.99e-05).
    return float(f"{float(value):.7g}")


def _metric_summary(result: evaluate_lib.EvalResult, step: int) -> dict[str, Any]:
    return {"dice": result.dice,
            "non_pos_jacobian_pct": result.non_pos_jacobian_pct, "step": step}


def format_table(rows: dict[str, Optional[dict[str, Any]]]) -> str:
    """A small text table of Dice and folding, one line per evaluated model."""
    lines = [f"{'':10s} {'Dice':>8s} {'% det<=0':>9s} {'step':>7s}"]
    for name, metrics in rows.items():
        if metrics:
            lines.append(f"{name:10s} {metrics['dice']:8.4f} "
                         f"{metrics['non_pos_jacobian_pct']:9.3f} "
                         f"{metrics['step']:>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The experiment.


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
    """Trains and evaluates as configured; returns the content of ``summary.json``.

    Raises:
      ValueError: for invalid settings or data (the message names them).
      FileNotFoundError: for missing data.
      NonFiniteLossError: if the loss or an update becomes non-finite; the
        checkpoints written before stay as they are.
    """
    validate_config(config)
    data = data_lib.create(config.data, config.seed)
    img_size = tuple(data.img_size)
    labels = tuple(int(label) for label in data.labels)
    model = models.create(config.model.name, img_size, **model_overrides(config))

    batch_size = config.train.batch_size
    mesh = parallel.data_mesh()
    parallel.check_batch_size(batch_size, mesh)
    # On several hosts every process trains, the first one writes the files.
    chief = jax.process_index() == 0
    items_per_epoch = len(data.train_plan(0))
    steps_per_epoch = items_per_epoch // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset {data.name!r} has {items_per_epoch} training items per epoch, "
            f"fewer than train.batch_size={batch_size}")
    total_steps = steps_per_epoch * config.train.epochs
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)

    os.makedirs(workdir, exist_ok=True)
    state = parallel.replicate(
        create_train_state(config, model, img_size, steps_per_epoch), mesh)
    train_step = make_train_step(config, steps_per_epoch)
    checkpoints = checkpoint_lib.Checkpoints(
        os.path.join(workdir, "checkpoints"), config.checkpoint.keep_best)
    # Saved with every checkpoint; "initial", "best" and "final" are evaluations.
    meta = {"steps_per_epoch": steps_per_epoch, "step": 0, "epoch": 0,
            "position": 0, "identity": None, "initial": None, "best": None,
            "final": None}
    resume_step = checkpoints.latest_step()
    if resume_step is not None:
        state, saved = checkpoints.restore(resume_step, state)
        if saved["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"the checkpoint in {checkpoints.directory} was trained with "
                f"{saved['steps_per_epoch']} steps per epoch, this config gives "
                f"{steps_per_epoch}; use another --workdir")
        meta.update(saved)
        logging.info("Resuming from step %d of %s.", resume_step, checkpoints.directory)
    elif chief:
        # With the grid read from the data: the run's record, and what
        # ``ofg_jax.register`` rebuilds the network from.
        resolved = json.loads(config.to_json_best_effort())
        resolved["data"]["img_size"] = list(img_size)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
    log = MetricsLog(workdir, steps_per_epoch, resume_step, write=chief)
    val_pairs = data.val_pairs()
    model_eval = evaluate_lib.make_model_eval_fn(model, labels)
    step = int(state.step)

    def run_eval() -> float:
        result = evaluate_lib.evaluate(model_eval, state.variables,
                                       val_pairs, labels)
        if chief:
            evaluate_lib.write_rows(
                os.path.join(workdir, "eval", f"step_{step:06d}.csv"), result)
        log.write_eval(step, result)
        meta["final"] = _metric_summary(result, step)
        if meta["best"] is None or result.dice > meta["best"]["dice"]:
            meta["best"] = meta["final"]
        logging.info("Step %d: validation Dice %.4f, %.3f%% voxels with det <= 0.",
                     step, result.dice, result.non_pos_jacobian_pct)
        return result.dice

    def save(dice: Optional[float] = None) -> None:
        meta.update(step=step, epoch=step // steps_per_epoch,
                    position=step % steps_per_epoch)
        checkpoints.save(step, state, meta, dice=dice)

    # Training throughput for the summary: excludes the first step of this
    # process (compilation), evaluation and checkpointing.
    train_seconds, timed_steps, clock = 0.0, 0, None
    progress = tqdm.tqdm(total=total_steps, initial=step, unit="step",
                         dynamic_ncols=True, disable=None)
    try:
        if resume_step is None:
            identity = evaluate_lib.evaluate(
                evaluate_lib.make_identity_eval_fn(labels), None, val_pairs, labels)
            meta["identity"] = _metric_summary(identity, 0)
            save(dice=run_eval())
            meta["initial"] = meta["final"]
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            prefetcher = Prefetcher(
                epoch_batches(data, epoch, position, steps_per_epoch, batch_size,
                              local=parallel.local_slice(batch_size)),
                put=lambda batch: parallel.shard_batch(batch, mesh))
            try:
                for batch in prefetcher:
                    state, metrics = train_step(state, batch)
                    step += 1
                    log.add_train_step(step, metrics)
                    if clock is None:
                        jax.block_until_ready(metrics)
                        log.restart_clock(skip_pending=True)
                        clock = time.perf_counter()
                    else:
                        timed_steps += 1
                    progress.update(1)
                    if step % config.train.log_every == 0:
                        log.flush()
                        progress.set_postfix(loss=f"{log.last_loss:.4g}", epoch=epoch)
                    every = config.checkpoint.every_steps
                    if every and step % every == 0 and step % steps_per_epoch:
                        log.flush()  # Never save a state whose update was not finite.
                        save()
                    if step >= total_steps:
                        break
            finally:
                prefetcher.close()
            log.flush()
            if clock is not None:
                train_seconds += time.perf_counter() - clock
            epochs_done, mid_epoch = divmod(step, steps_per_epoch)
            eval_every = config.train.eval_every_epochs
            if step >= total_steps or (not mid_epoch and eval_every
                                       and epochs_done % eval_every == 0):
                save(dice=run_eval())
            else:
                save()
            if clock is not None:
                clock = time.perf_counter()
            log.restart_clock()
    except NonFiniteLossError as e:
        last = checkpoints.latest_step()
        kept = ("no checkpoint had been written" if last is None else
                f"the last good checkpoint, step {last} in {checkpoints.directory}, "
                "is kept")
        raise NonFiniteLossError(
            f"{e}. Training stopped; {kept}. Lower train.learning_rate or check "
            "the data.") from None
    finally:
        progress.close()
        log.close()
        checkpoints.close()

    summary = {
        "identity": meta["identity"], "initial": meta["initial"],
        "final": meta["final"], "best": meta["best"], "steps": step,
        "steps_per_second": timed_steps / train_seconds if timed_steps else None,
    }
    if chief:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if config.train.figures:
            from ofg_jax import plot  # pylint: disable=g-import-not-at-top
            plot.write_training_figures(workdir)
    print(format_table({"identity": meta["identity"], "initial": meta["initial"],
                        "final": meta["final"], "best": meta["best"]}))
    return summary
