"""Experiment 5: OFG against self-training with pseudo labels fixed per stage.

    python experiments/self_training.py                        # demo, 3 seeds
    python experiments/self_training.py --stages 4 --seeds 1
    python experiments/self_training.py --config configs/lpba.py \\
        --set data.root=/data/LPBA40 --stages 5

Self-training in the style of cyclical self-training (Bigalke et al. 2023; the
paper compares on LPBA40: CST 0.628 Dice, OFG 0.666): training is cut into
``--stages`` stages of ``train.epochs / stages`` epochs. At the start of stage s
the current network predicts every training pair of the stage and ``refine``
(``--label-steps`` steps, default ``ofg.steps``, at the stage's inner learning
rate) turns the prediction into a pseudo label; the stage then trains on
``MSE(pred, label) + 0.02 * Grad(pred)`` with those labels fixed. OFG computes the
label anew at every step instead. Same network, optimiser, learning-rate decay,
epochs and data as the OFG and unsupervised rows (trained by
``train_and_evaluate``, shared with the other experiments' identical runs).

Pseudo labels are kept on disk (``<run>/labels/``), so full-size data sets fit.
Networks with BatchNorm statistics (ViT-V-Net) are not supported here.
"""

import json
import os
import time
from typing import Optional, Sequence

try:
    from experiments import common
except ImportError:
    import common  # type: ignore

NAME = "self_training"


def train_self_training(config, workdir: str, stages: int,
                        label_steps: Optional[int] = None) -> dict:
    """Trains with stage-wise pseudo labels; writes and returns a ``summary.json``
    with the keys of ``train_and_evaluate``'s (and ``stages``: Dice per stage)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ofg_jax import data as data_lib
    from ofg_jax import evaluate as evaluate_lib
    from ofg_jax import models
    from ofg_jax import refine
    from ofg_jax import train

    train.validate_config(config)
    epochs = config.train.epochs
    if not 1 <= stages <= epochs:
        raise ValueError(f"--stages must be in 1..train.epochs={epochs}, got {stages}")
    label_steps = config.ofg.steps if label_steps is None else label_steps
    data = data_lib.create(config.data, config.seed)
    img_size = tuple(data.img_size)
    labels = tuple(int(label) for label in data.labels)
    model = models.create(config.model.name, img_size, **train.model_overrides(config))
    batch_size = config.train.batch_size
    steps_per_epoch = len(data.train_plan(0)) // batch_size
    state = train.create_train_state(config, model, img_size, steps_per_epoch)
    if state.batch_stats:
        raise ValueError(f"self-training does not support {config.model.name!r} "
                         "(BatchNorm statistics)")
    weight = train.reg_weight(config)
    inner_lr = train.epoch_lr_table(config.ofg.learning_rate, epochs)
    os.makedirs(os.path.join(workdir, "labels"), exist_ok=True)

    @jax.jit
    def pseudo_label(params, moving, fixed, lr):
        pair = jnp.stack([moving, fixed], axis=-1)[None]
        pred = model.apply({"params": params}, pair, train=False)[0]
        return refine(moving, fixed, pred, steps=label_steps, learning_rate=lr,
                      reg_weight=config.ofg.reg_weight, similarity=config.ofg.similarity,
                      optimizer=config.ofg.optimizer, downsample=config.ofg.downsample)

    def step(state, moving, fixed, target):
        """The OFG train step's loss with the labels fixed (``refine_fn``)."""
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            pair = jnp.stack([moving, fixed], axis=-1)
            pred = state.apply_fn({"params": params}, pair, train=True,
                                  rngs={"dropout": key})
            return train.registration_loss(pred, moving, fixed, mode="ofg",
                                           reg_weight=weight,
                                           refine_fn=lambda m, f, p: target)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), loss

    step = jax.jit(step, donate_argnums=0)
    model_eval = evaluate_lib.make_model_eval_fn(model, labels)
    val_pairs = data.val_pairs()
    identity = evaluate_lib.evaluate(evaluate_lib.make_identity_eval_fn(labels), None,
                                     val_pairs, labels)
    initial = evaluate_lib.evaluate(model_eval, {"params": state.params}, val_pairs,
                                    labels)
    bounds = np.linspace(0, epochs, stages + 1).round().astype(int)
    stage_dice, train_seconds, timed, losses = [], 0.0, 0, []
    for s in range(stages):
        stage_epochs = range(bounds[s], bounds[s + 1])
        items = {}
        for epoch in stage_epochs:
            for item in data.train_plan(epoch)[:steps_per_epoch * batch_size]:
                items.setdefault(repr(item), item)
        paths = {}
        for i, (key, item) in enumerate(items.items()):
            pair = data.load_train(item)
            target = pseudo_label(state.params, jnp.asarray(pair["moving"], jnp.float32),
                                  jnp.asarray(pair["fixed"], jnp.float32),
                                  inner_lr[bounds[s]])
            paths[key] = os.path.join(workdir, "labels", f"{i:05d}.npy")
            np.save(paths[key], np.asarray(target))
        common.log(f"stage {s}: {len(paths)} pseudo labels, epochs "
                   f"{bounds[s]}..{bounds[s + 1] - 1}")
        for epoch in stage_epochs:
            plan = data.train_plan(epoch)
            for b in range(steps_per_epoch):
                chunk = plan[b * batch_size:(b + 1) * batch_size]
                pairs = [data.load_train(item) for item in chunk]
                moving = np.stack([np.asarray(p["moving"], np.float32) for p in pairs])
                fixed = np.stack([np.asarray(p["fixed"], np.float32) for p in pairs])
                target = np.stack([np.load(paths[repr(item)]) for item in chunk])
                start = time.perf_counter()
                state, loss = step(state, moving, fixed, target)
                loss = float(loss)
                if int(state.step) > 1:  # The first step compiles.
                    train_seconds += time.perf_counter() - start
                    timed += 1
                losses.append(loss)
                if not np.isfinite(loss):
                    raise train.NonFiniteLossError(f"non-finite loss at step "
                                                   f"{int(state.step)}")
        result = evaluate_lib.evaluate(model_eval, {"params": state.params}, val_pairs,
                                       labels)
        stage_dice.append(result.dice)
        common.log(f"stage {s}: validation Dice {result.dice:.4f}")
    steps = int(state.step)
    evaluate_lib.write_rows(os.path.join(workdir, "eval", f"step_{steps:06d}.csv"),
                            result)
    summarise = lambda r, step: {"dice": r.dice, "step": step,
                                 "non_pos_jacobian_pct": r.non_pos_jacobian_pct}
    summary = {"identity": summarise(identity, 0), "initial": summarise(initial, 0),
               "final": summarise(result, steps), "best": None, "steps": steps,
               "steps_per_second": timed / train_seconds if timed else None,
               "stages": stage_dice, "label_steps": label_steps,
               "mean_loss": float(np.mean(losses))}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.make_parser(__doc__, default_seeds=3)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--label-steps", type=int, default=None,
                        help="refine steps per pseudo label (default ofg.steps)")
    args = common.parse_args(parser, argv)
    base = common.apply_overrides(common.load_config(args.config),
                                  common.parse_sets(args.set))
    common.setup_compilation_cache(args.workdir)
    records = []
    for seed in range(args.seeds):
        records.append(common.train_run(
            base, common.Run("OFG (labels every step)", {"train.mode": "ofg"}, seed),
            args.workdir))
    for seed in range(args.seeds):
        # The stage settings are part of the run's identity (its directory).
        run = common.Run(f"self-training ({args.stages} stages)",
                         {"train.mode": "ofg"}, seed)
        config = common.run_config(base, run)
        label_steps = config.ofg.steps if args.label_steps is None else args.label_steps
        directory = os.path.join(args.workdir, "runs", "self_training_" +
                                 common.config_hash(config) +
                                 f"_s{args.stages}_l{label_steps}")
        summary_path = os.path.join(directory, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        else:
            summary = train_self_training(config, directory, args.stages, label_steps)
        records.append(common.make_record(run, directory, summary))
    for seed in range(args.seeds):
        records.append(common.train_run(
            base, common.Run("unsupervised", {"train.mode": "unsupervised"}, seed),
            args.workdir))
    columns = [common.DICE, common.JACOBIAN, common.SECONDS_PER_STEP]
    table = common.standard_table(records, columns, first_header="training")
    notes = ("Self-training s/step excludes the pseudo-label passes between stages; "
             "final validation metrics, mean ± std over seeds.")
    common.write_results(NAME, args, records, table, [c[0] for c in columns], notes)
    return {"records": records, "table": table}


if __name__ == "__main__":
    main()
