"""Experiment 7: OFG steps at inference, and instance optimisation alone.

    python -m experiments.test_time_refinement                 # demo, 1 seed
    python -m experiments.test_time_refinement --k 0,1,3,5,10,20 --zero-steps 10,50,100
    python -m experiments.test_time_refinement --config configs/ixi.py \\
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

from experiments import common

NAME = "test_time_refinement"


def make_register_fn(trained, steps: int, from_zero: bool):
    """Jitted ``(moving, fixed) -> disp``: the network (``network_lib.registration_fn``)
    or a zero field, then ``steps`` steps of the run's inner optimiser at its
    initial learning rate."""
    if not from_zero:
        from ofg_jax.registration import network as network_lib
        return network_lib.registration_fn(trained, steps)
    import dataclasses
    import jax
    import jax.numpy as jnp
    from ofg_jax.settings.inner_optimizer import RefineSettings, make_refiner

    settings = dataclasses.replace(RefineSettings.from_config(trained.config.ofg),
                                   steps=steps)
    refiner = make_refiner(settings, trained.img_size)

    @jax.jit
    def register(moving, fixed):
        disp = jnp.zeros(moving.shape + (moving.ndim,), jnp.float32)
        return refiner(moving, fixed, disp, settings.learning_rate)

    return register


def evaluate_method(register, pairs, labels, dice_over="labels"):
    """Per-pair scores (``EvalResult``) and the mean seconds per pair (after one
    warm-up call)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from ofg_jax.training import scoring
    metrics_fn = jax.jit(lambda d, ms, fs: scoring.pair_metrics(d, ms, fs, labels))
    as_f32 = lambda x: jnp.asarray(x, jnp.float32)
    jax.block_until_ready(register(as_f32(pairs[0].moving),
                                   as_f32(pairs[0].fixed)))  # Compilation.
    rows, seconds = [], []
    for pair in pairs:
        moving, fixed = as_f32(pair.moving), as_f32(pair.fixed)
        start = time.perf_counter()
        disp = jax.block_until_ready(register(moving, fixed))
        seconds.append(time.perf_counter() - start)
        metrics = jax.device_get(metrics_fn(
            disp, jnp.asarray(pair.moving_seg, jnp.int32),
            jnp.asarray(pair.fixed_seg, jnp.int32)))
        rows.append(scoring.pair_row(pair.name, metrics, labels,
                                        dice_over=dice_over))
    return scoring.EvalResult.from_rows(rows), float(np.mean(seconds))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.make_parser(__doc__, default_seeds=1)
    parser.add_argument("--k", type=common.int_list, default=[0, 1, 3, 5, 10, 20],
                        help="OFG steps after the network (default 0,1,3,5,10,20)")
    parser.add_argument("--zero-steps", type=common.int_list, default=[10, 50, 100],
                        help="steps of refine from a zero field (default 10,50,100)")
    args = common.parse_args(parser, argv)
    from ofg_jax import data as data_lib
    from ofg_jax.training import scoring
    from ofg_jax.registration import network as network_lib
    base = common.base_config(args)
    trained = common.run_all(
        base, [common.Run("OFG network", {"train.mode": "ofg"}, seed)
               for seed in range(args.seeds)], args.workdir)
    methods = ([(f"network + {k} OFG steps", k, False) for k in args.k]
               + [(f"zero field + {n} steps (refine only)", n, True)
                  for n in args.zero_steps])
    records = []
    for training in trained:
        seed = training["seed"]
        network = network_lib.load_trained(training["workdir"],
                                         training["summary"]["steps"])
        data = data_lib.create(network.config.data, network.config.seed)
        pairs, labels = data.val_pairs(), tuple(int(l) for l in data.labels)
        for label, steps, from_zero in methods:
            common.log(f"[seed {seed}] {label}")
            result, seconds = evaluate_method(
                make_register_fn(network, steps, from_zero), pairs, labels,
                data.dice_over)
            slug = label.split(" (")[0].replace(" + ", "_").replace(" ", "_")
            csv_path = os.path.join(args.workdir, NAME, f"seed{seed}", f"{slug}.csv")
            scoring.write_rows(csv_path, result)
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
    common.run_main(main)
