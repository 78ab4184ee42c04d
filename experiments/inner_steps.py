"""Experiment 2 (ablation "optimisation steps"): OFG with 1..15 inner steps.

    python -m experiments.inner_steps                          # demo, 3 seeds
    python -m experiments.inner_steps --steps 1,3,5,10,15 --seeds 1
    python -m experiments.inner_steps --config configs/ixi.py \\
        --set data.root=/data/IXI_data --steps 1,5,10,15 --seeds 1

One OFG run per ``ofg.steps`` value (and, unless ``--no-unsupervised``, the
unsupervised baseline as the reference of the training time): final validation
Dice, % non-positive Jacobian and seconds per training step (``summary.json``'s
``steps_per_second``: training only, no compilation or evaluation). Runs trained
at different times see different machine loads, so the step times are also
measured afterwards in one process, every setting's step in turn
(``--time-repeats`` rounds after a warm-up round; 0 skips it), and given
relative to the unsupervised step. The paper finds 5 to 10 steps best, at 10-18%
more training time than unsupervised training.
"""

from typing import Optional, Sequence

from experiments import common

NAME = "inner_steps"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.make_parser(__doc__, default_seeds=3)
    parser.add_argument("--steps", type=common.int_list, default=[1, 3, 5, 10, 15],
                        help="comma-separated inner step counts (default 1,3,5,10,15)")
    parser.add_argument("--no-unsupervised", action="store_true",
                        help="skip the unsupervised reference run")
    common.add_time_repeats_flag(parser)
    args = common.parse_args(parser, argv)
    base = common.base_config(args)
    runs = []
    if not args.no_unsupervised:
        runs += [common.Run("unsupervised", {"train.mode": "unsupervised"}, seed)
                 for seed in range(args.seeds)]
    for steps in args.steps:
        runs += [common.Run(f"OFG {steps} steps",
                            {"train.mode": "ofg", "ofg.steps": int(steps)}, seed)
                 for seed in range(args.seeds)]
    records = common.run_all(base, runs, args.workdir)
    for record in records:
        record["ofg_steps"] = record["overrides"].get("ofg.steps", 0)

    columns = [common.DICE, common.JACOBIAN, common.SECONDS_PER_STEP]
    table = common.standard_table(records, columns)
    notes = "Final validation metrics; mean ± sample std over seeds."
    timed = {}
    if args.time_repeats > 0:
        reference = None if args.no_unsupervised else "unsupervised"
        timed, text = common.time_steps(base, runs, records, args.time_repeats,
                                        reference)
        notes += "\n\n" + text
    common.write_results(NAME, args, records, table,
                         [c[0] for c in columns] + ["ofg_steps"], notes=notes,
                         extra={"timed_step_s": timed})
    return {"records": records, "table": table}


if __name__ == "__main__":
    common.run_main(main)
