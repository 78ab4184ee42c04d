"""Experiment 4 (ablation "OFG intensity"): less OFG in three forms.

    python -m experiments.ofg_intensity                        # demo, 3 seeds
    python -m experiments.ofg_intensity --every 2,4 --ncc-weights 1 \\
        --fractions 0.5 --seeds 1
    python -m experiments.ofg_intensity --config configs/lpba.py \\
        --set data.root=/data/LPBA40

1. optimisation frequency: OFG targets only in every k-th epoch
   (``ofg.every_epochs=k``); the other epochs train with the unsupervised loss
   ``-NCC + 1.0 * Grad``;
2. loss composition: ``MSE + lambda * (-NCC) + 0.02 * Grad``
   (``ofg.ncc_weight=lambda``);
3. probabilistic optimisation: each pair gets an OFG target with probability p,
   the others the unsupervised loss (``ofg.fraction=p``, drawn per pair from
   the step's random key).
Plain OFG (k=1, lambda=0, p=1) and unsupervised training are the two ends. The
paper (Fig. 4) finds accuracy falling as the intensity falls, in all three forms.
"""

from typing import Optional, Sequence

from experiments import common

NAME = "ofg_intensity"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.make_parser(__doc__, default_seeds=3)
    parser.add_argument("--every", type=common.int_list, default=[2, 4],
                        help="values of ofg.every_epochs besides 1 (default 2,4)")
    parser.add_argument("--ncc-weights", type=common.float_list, default=[0.5, 1.0],
                        help="values of ofg.ncc_weight besides 0 (default 0.5,1)")
    parser.add_argument("--fractions", type=common.float_list, default=[0.5, 0.25],
                        help="values of ofg.fraction besides 1 (default 0.5,0.25)")
    args = common.parse_args(parser, argv)
    base = common.base_config(args)
    variants = [("OFG (k=1, λ=0, p=1)", {})]
    variants += [(f"every {k} epochs", {"ofg.every_epochs": k}) for k in args.every]
    variants += [(f"+ {w:g} × NCC", {"ofg.ncc_weight": float(w)})
                 for w in args.ncc_weights]
    variants += [(f"fraction p={p:g}", {"ofg.fraction": float(p)})
                 for p in args.fractions]
    runs = [common.Run(label, {"train.mode": "ofg", **o}, seed)
            for label, o in variants for seed in range(args.seeds)]
    runs += [common.Run("unsupervised", {"train.mode": "unsupervised"}, seed)
             for seed in range(args.seeds)]
    records = common.run_all(base, runs, args.workdir)
    columns = [common.DICE, common.JACOBIAN]
    table = common.standard_table(records, columns, first_header="intensity")
    common.write_results(NAME, args, records, table, [c[0] for c in columns],
                         notes="Final validation metrics; mean ± std over seeds.")
    return {"records": records, "table": table}


if __name__ == "__main__":
    common.run_main(main)
