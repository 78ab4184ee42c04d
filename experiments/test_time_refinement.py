"""Experiment 7: OFG steps at inference, and instance optimisation alone.

    python experiments/test_time_refinement.py                 # demo, 1 seed
    python experiments/test_time_refinement.py --k 0,1,3,5,10,20 --zero-steps 10,50,100
    python experiments/test_time_refinement.py --config configs/ixi.py \\
        --set data.root=/data/IXI_data

Trains the OFG network once per seed (or reuses the identical run of another
experiment in the same ``--workdir``), restores its final checkpoint, then on
every validation pair
- refines the network's prediction with k steps of the OFG optimiser
  (``ofg_jax.refine`` with the config's inner settings and its initial learning
  rate ``ofg.learning_rate``); k = 0 is the network alone;
- runs ``refine`` alone from a zero field for n steps (pure instance
  optimisation), to show what the network contributes.
Columns: Dice, % non-positive Jacobian, seconds per pair (network + refinement,
compiled, excluding the metrics). Per-pair rows go to
``<workdir>/test_time_refinement/seed<k>/<label>.csv`` (for box plots).
"""

import os
import time
from typing import Optional, Sequence

try:
    from experiments import common
except ImportError:
    import common  # type: ignore

NAME = "test_time_refinement"


def restore_trained(config, directory: str, steps: int):
    """``(data, model, variables, labels)`` of the run in ``directory`` at ``steps``."""
    from ofg_jax import checkpoint as checkpoint_lib
    from ofg_jax import data as data_lib
    from ofg_jax import models
    from ofg_jax import train
    data = data_lib.create(config.data, config.seed)
    img_size = tuple(data.img_size)
    model = models.create(config.model.name, img_size, **train.model_overrides(config))
    steps_per_epoch = len(data.train_plan(0)) // config.train.batch_size
    state = train.create_train_state(config, model, img_size, steps_per_epoch)
    checkpoints = checkpoint_lib.Checkpoints(os.path.join(directory, "checkpoints"),
                                             config.checkpoint.keep_best)
    try:
        state, _ = checkpoints.restore(steps, state)
    finally:
        checkpoints.close()
    labels = tuple(int(label) for label in data.labels)
    return data, model, state.variables, labels


def make_register_fn(model, config, steps: int, from_zero: bool):
    """Jitted ``(variables, moving, fixed) -> disp``: network (or zero) + ``steps``."""
    import jax
    import jax.numpy as jnp
    from ofg_jax import refine

    @jax.jit
    def register(variables, moving, fixed):
        if from_zero:
            disp = jnp.zeros(moving.shape + (moving.ndim,), jnp.float32)
        else:
            pair = jnp.stack([moving, fixed], axis=-1)[None]
            disp = model.apply(variables, pair, train=False)[0]
        if steps:
            disp = refine(moving, fixed, disp, steps=steps,
                          learning_rate=config.ofg.learning_rate,
                          reg_weight=config.ofg.reg_weight,
                          similarity=config.ofg.similarity,
                          optimizer=config.ofg.optimizer,
                          downsample=config.ofg.downsample)
        return disp

    return register


def evaluate_method(register, variables, pairs, labels):
    """Per-pair metrics rows and the mean seconds per pair (after one warm-up)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ofg_jax import evaluate as evaluate_lib
    metrics_fn = jax.jit(lambda d, ms, fs: evaluate_lib.pair_metrics(d, ms, fs, labels))
    as_f32 = lambda x: jnp.asarray(x, jnp.float32)
    jax.block_until_ready(register(variables, as_f32(pairs[0].moving),
                                   as_f32(pairs[0].fixed)))  # Compilation.
    rows, seconds = [], []
    for pair in pairs:
        moving, fixed = as_f32(pair.moving), as_f32(pair.fixed)
        start = time.perf_counter()
        disp = jax.block_until_ready(register(variables, moving, fixed))
        seconds.append(time.perf_counter() - start)
        dice, folding = jax.device_get(metrics_fn(
            disp, jnp.asarray(pair.moving_seg, jnp.int32),
            jnp.asarray(pair.fixed_seg, jnp.int32)))
        row = {"name": str(pair.name), "dice": float(np.mean(dice)),
               "non_pos_jacobian_pct": float(folding)}
        row.update({f"dice_{l}": float(d) for l, d in zip(labels, dice)})
        rows.append(row)
    return evaluate_lib.EvalResult(
        dice=float(np.mean([r["dice"] for r in rows])),
        non_pos_jacobian_pct=float(np.mean([r["non_pos_jacobian_pct"] for r in rows])),
        rows=rows), float(np.mean(seconds))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.make_parser(__doc__, default_seeds=1)
    parser.add_argument("--k", type=common.int_list, default=[0, 1, 3, 5, 10, 20],
                        help="OFG steps after the network (default 0,1,3,5,10,20)")
    parser.add_argument("--zero-steps", type=common.int_list, default=[10, 50, 100],
                        help="steps of refine from a zero field (default 10,50,100)")
    args = common.parse_args(parser, argv)
    from ofg_jax import evaluate as evaluate_lib
    base = common.apply_overrides(common.load_config(args.config),
                                  common.parse_sets(args.set))
    trained = common.run_all(
        base, [common.Run("OFG network", {"train.mode": "ofg"}, seed)
               for seed in range(args.seeds)], args.workdir)
    methods = ([(f"network + {k} OFG steps", k, False) for k in args.k]
               + [(f"zero field + {n} steps (refine only)", n, True)
                  for n in args.zero_steps])
    records = []
    for training in trained:
        seed = training["seed"]
        config = common.run_config(base, common.Run("", {"train.mode": "ofg"}, seed))
        data, model, variables, labels = restore_trained(
            config, training["workdir"], training["summary"]["steps"])
        pairs = data.val_pairs()
        for label, steps, from_zero in methods:
            common.log(f"[seed {seed}] {label}")
            result, seconds = evaluate_method(
                make_register_fn(model, config, steps, from_zero), variables, pairs,
                labels)
            slug = label.split(" (")[0].replace(" + ", "_").replace(" ", "_")
            csv_path = os.path.join(args.workdir, NAME, f"seed{seed}", f"{slug}.csv")
            evaluate_lib.write_rows(csv_path, result)
            records.append({
                "label": label, "seed": seed, "steps": steps, "from_zero": from_zero,
                "trained_workdir": training["workdir"], "eval_csv": csv_path,
                "dice": result.dice, "non_pos_jacobian_pct": result.non_pos_jacobian_pct,
                "seconds_per_pair": seconds})
    columns = [common.DICE, common.JACOBIAN, ("seconds_per_pair", "s / pair", 3)]
    table = common.standard_table(records, columns, first_header="inference")
    notes = (f"Inner learning rate {base.ofg.learning_rate}, energy -"
             f"{base.ofg.similarity.upper()} + {base.ofg.reg_weight} Grad; network: "
             "the final checkpoint of OFG training; mean ± std over seeds.")
    common.write_results(NAME, args, records, table, [c[0] for c in columns], notes,
                         extra={"trained": trained})
    return {"records": records, "table": table}


if __name__ == "__main__":
    main()
