"""Experiment 3 (ablation "optimiser design"): instance, downsampled, network-based.

    python -m experiments.optimizer_design                     # demo, 3 seeds
    python -m experiments.optimizer_design --seeds 1 --network-width 8
    python -m experiments.optimizer_design --config configs/ixi.py \\
        --set data.root=/data/IXI_data --seeds 1

The OFG target of every training pair comes from
- instance: the per-voxel field optimised directly (``ofg.design=instance``, the
  default and the paper's proposal);
- downsampled: a half-resolution field, 1/8 of the parameters
  (``ofg.downsample=2``);
- network: a cascaded VoxelMorph (``ofg.design=network``): a second VoxelMorph of
  width ``--network-width`` (32 = the reference VoxelMorph) looks at the warped
  pair and adds its output (~0 at its initialisation) to the prediction; its
  weights, re-initialised for every pair, take ``ofg.steps`` amsgrad steps on the
  same energy at learning rate ``--network-lr`` (default 3e-3: weights need a far
  smaller step than the per-voxel 0.1; on a 32^3 demo pair, 10 steps at 1e-3,
  3e-3, 1e-2 and 3e-2 reached energies -0.605, -0.628, -0.593 and +130, against
  -0.714 for the instance optimiser, from -0.590).
Columns: final Dice, % non-positive Jacobian, seconds per training step
(``summary.json``), then each design's step timed in turn in one process
(``--time-repeats``, as in ``inner_steps.py``). Paper
(Table 5): instance best; network-based 0.642 Dice at 13.6% folding,
downsampled 0.610.
"""

from typing import Optional, Sequence

from experiments import common

NAME = "optimizer_design"
DESIGNS = ("instance", "downsampled", "network")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.make_parser(__doc__, default_seeds=3)
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--network-width", type=int, default=32)
    parser.add_argument("--network-lr", type=float, default=3e-3)
    common.add_time_repeats_flag(parser)
    args = common.parse_args(parser, argv)
    base = common.base_config(args)
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if set(designs) - set(DESIGNS):
        parser.error(f"unknown designs {sorted(set(designs) - set(DESIGNS))}")
    overrides = {
        "instance": {"train.mode": "ofg"},
        "downsampled": {"train.mode": "ofg", "ofg.downsample": 2},
        "network": {"train.mode": "ofg", "ofg.design": "network",
                    "ofg.network_width": args.network_width,
                    "ofg.learning_rate": args.network_lr},
    }
    runs = [common.Run(design, overrides[design], seed)
            for design in designs for seed in range(args.seeds)]
    records = common.run_all(base, runs, args.workdir)
    columns = [common.DICE, common.JACOBIAN, common.SECONDS_PER_STEP]
    table = common.standard_table(records, columns, first_header="optimiser")
    notes = ((f"network: cascaded VoxelMorph of width {args.network_width}, inner "
              f"lr {args.network_lr}; " if "network" in designs else "")
             + "final validation metrics, mean ± std over seeds.")
    timed = {}
    if args.time_repeats > 0:
        reference = "instance" if "instance" in designs else None
        timed, text = common.time_steps(base, runs, records, args.time_repeats,
                                        reference)
        notes += "\n\n" + text
    common.write_results(NAME, args, records, table, [c[0] for c in columns], notes,
                         extra={"timed_step_s": timed})
    return {"records": records, "table": table}


if __name__ == "__main__":
    common.run_main(main)
