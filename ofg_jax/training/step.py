"""The train state and the fused, jitted train step of OFG and unsupervised training.

:func:`train_step` is a pure function of ``(state, batch)`` and static settings:
it predicts the displacements, builds the OFG targets with the run's inner
optimiser (``ofg_jax.settings.inner_optimizer``), takes the loss of
``ofg_jax.settings.losses`` and applies
the optax update, all in one XLA computation. :func:`make_train_step` binds the
settings of a config and jits it once for the whole run.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ofg_jax.adam import torch_adam
from ofg_jax.schedules import epoch_of_step
from ofg_jax.schedules import make_lr_schedule
from ofg_jax.settings.config import Resolved
from ofg_jax.settings.inner_optimizer import Refiner
from ofg_jax.settings.inner_optimizer import make_refiner
from ofg_jax.settings.losses import Intensity
from ofg_jax.settings.losses import registration_loss

# ``fold_in`` constant of the per-pair draw of ``ofg.fraction`` (from the step's
# dropout key, which the network's own dropout uses unchanged).
FRACTION_STREAM = 0x0F6

# {"moving", "fixed"}: (B, *S) float32; optionally "target": (B, *S, 3) fixed
# pseudo labels that replace the refined predictions (self-training).
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


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


def create_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module,
                       img_size: Sequence[int], steps_per_epoch: int) -> TrainState:
    """Initialises the network and the PyTorch-style Adam (amsgrad) optimiser.

    The network's parameters come from ``PRNGKey(config.seed)``; the model
    learning rate is ``train.learning_rate`` decayed by epoch (``poly_lr``).
    With ``train.remat`` the state's ``apply_fn`` (what :func:`train_step` runs)
    is the network with its stages rematerialised (``RegistrationNetwork.remat``):
    the same parameters, values and gradients, less memory in the backward pass.
    """
    apply_model = model.clone(remat=True) if config.train.get("remat", False) else model
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
        state = TrainState.create(apply_fn=apply_model.apply, params=variables["params"],
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


def train_step(state: TrainState, batch: Batch, *, mode: str, reg_weight: float,
               unsupervised_reg_weight: float, similarity: str,
               model_lr: optax.Schedule, inner_lr: optax.Schedule,
               refiner: Optional[Refiner], intensity: Intensity,
               epoch_of: Callable[[jax.Array], jax.Array]
               ) -> tuple[TrainState, Metrics]:
    """One update of the network on a batch; returns the new state and metrics.

    Args:
      state: the train state (donated by :func:`make_train_step`).
      batch: :data:`Batch`.
      mode: "ofg" or "unsupervised" (``ofg_jax.settings.losses.registration_loss``).
      reg_weight: Grad weight of the model loss.
      unsupervised_reg_weight: Grad weight of pairs without an OFG target.
      similarity: the unsupervised similarity term, "ncc" or "mse".
      model_lr, inner_lr: schedules of the update count (for the metrics; the
        model's is also inside ``state.tx``).
      refiner: the inner optimiser (``ofg_jax.settings.inner_optimizer.make_refiner``), "ofg" mode.
      intensity: the OFG-intensity ablation settings (plain OFG by default).
      epoch_of: the 0-based epoch of an update count.

    Returns:
      The new state and ``{"loss", "similarity", "grad", "grad_norm",
      "update_norm", "lr", "ofg_lr"}`` (and ``ofg_fraction`` in the ablations).
    """
    moving, fixed = batch["moving"], batch["fixed"]
    ofg_lr = inner_lr(state.step)
    dropout_key = jax.random.fold_in(state.rng, state.step)
    if mode == "ofg":
        extra = {"ncc_weight": float(intensity.ncc_weight),
                 "use_ofg": intensity.guided_pairs(
                     epoch_of(state.step), jax.random.fold_in(dropout_key, FRACTION_STREAM),
                     moving.shape[0])}
    else:
        extra = {}

    pair = jnp.stack([moving, fixed], axis=-1)

    def predict(params):
        variables = {**state.variables, "params": params}
        if state.batch_stats:  # BatchNorm uses and updates the batch statistics.
            pred, updates = state.apply_fn(variables, pair, train=True,
                                           rngs={"dropout": dropout_key},
                                           mutable=["batch_stats"])
            return pred, updates["batch_stats"]
        pred = state.apply_fn(variables, pair, train=True, rngs={"dropout": dropout_key})
        return pred, state.batch_stats

    pred, backward, batch_stats = jax.vjp(predict, state.params, has_aux=True)
    targets = batch.get("target")
    if mode == "ofg" and targets is None:
        targets = jax.vmap(refiner, in_axes=(0, 0, 0, None))(moving, fixed, pred, ofg_lr)
        # The loss and the network's backward pass start after the refinement:
        # XLA would otherwise schedule parts of them (with train.remat, the
        # recomputed stages) during the inner loop, where the forward pass's
        # residuals and the inner loop's buffers are live anyway.
        backward, pred, targets = _after_each_other(backward, pred, targets)

    def loss_of_pred(pred):
        return registration_loss(
            pred, moving, fixed, mode=mode, reg_weight=reg_weight,
            similarity=similarity, targets=targets,
            unsupervised_reg_weight=unsupervised_reg_weight, **extra)

    (loss, terms), pred_grad = jax.value_and_grad(loss_of_pred, has_aux=True)(pred)
    (grads,) = backward(pred_grad)
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


def _after_each_other(*trees: Any) -> tuple[Any, ...]:
    """``trees`` unchanged, but nothing that uses one of them runs before all exist.

    (``lax.optimization_barrier`` on their leaves; a ``jax.vjp`` function is a
    pytree of its residuals.)
    """
    leaves, treedef = jax.tree.flatten(trees)
    return jax.tree.unflatten(treedef, jax.lax.optimization_barrier(leaves))


def make_train_step(resolved: Resolved, steps_per_epoch: int,
                    img_size: Sequence[int]
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns the jitted ``train_step(state, batch) -> (state, metrics)`` of a
    config resolved by ``ofg_jax.settings.config.resolve``.

    Both learning rates follow ``poly_lr`` by epoch, derived from ``state.step``
    inside the step, so one compilation serves the whole run. The inner
    optimiser is built here, before any tracing (the "network" design
    initialises its VoxelMorph once). The state argument is donated.
    """
    config = resolved.config
    epochs = config.train.epochs
    mode = config.train.mode
    refiner = None
    if mode == "ofg":
        refiner = make_refiner(resolved.refine, img_size,
                               seed=config.seed,
                               conv_impl=config.model.get("conv_impl") or "auto")
    step = functools.partial(
        train_step, mode=mode, reg_weight=resolved.reg_weight,
        unsupervised_reg_weight=float(config.train.reference_reg_weight.unsupervised),
        similarity=config.train.similarity,
        model_lr=make_lr_schedule(config.train.learning_rate, epochs, steps_per_epoch),
        inner_lr=make_lr_schedule(config.ofg.learning_rate, epochs, steps_per_epoch),
        refiner=refiner, intensity=resolved.intensity,
        epoch_of=lambda count: epoch_of_step(count, steps_per_epoch, epochs))
    return jax.jit(step, donate_argnums=0, compiler_options=_compiler_options())


def _compiler_options() -> Optional[dict[str, str]]:
    """XLA options of the train step: on CPU, keep the optimisation barriers.

    XLA:CPU turns ``optimization_barrier`` into a plain tuple before its
    common-subexpression elimination, which then merges every rematerialised
    stage (``train.remat``) with its forward pass, undoing it, and frees the
    scheduler to start the backward pass inside the inner loop
    (``_after_each_other``). The CPU backend runs the barriers as they are.
    Other backends keep them anyway.
    """
    if jax.default_backend() != "cpu":
        return None
    return {"xla_disable_hlo_passes": "cse_barrier_expander"}
