"""Experiment 5: OFG against self-training with pseudo labels fixed per stage.

    python -m experiments.self_training                        # demo, 3 seeds
    python -m experiments.self_training --stages 4 --seeds 1
    python -m experiments.self_training --config configs/lpba.py \\
        --set data.root=/data/LPBA40 --stages 5

Self-training in the style of cyclical self-training (Bigalke et al. 2023; the
paper compares on LPBA40: CST 0.628 Dice, OFG 0.666): training is cut into
``--stages`` stages of ``train.epochs / stages`` epochs. At the start of stage s
the current network predicts every training pair of the stage and ``refine``
(``--label-steps`` steps, default ``ofg.steps``, at the stage's inner learning
rate) turns the prediction into a pseudo label; the stage then trains on
``MSE(pred, label) + 0.02 * Grad(pred)`` with those labels fixed. OFG computes the
label anew at every step instead. Same network, optimiser, learning-rate decay,
epochs and data as the OFG and unsupervised rows; all three are trained by
``ofg_jax.training.loop.train_and_evaluate`` (self-training with its ``pseudo_labels``
hook: the train step regresses on the stage's labels instead of refining).

Pseudo labels are kept on disk (``<run>/labels/stage_<s>/``), so full-size data
sets fit, and an interrupted run resumes with the labels of its stage.
"""

import csv
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from experiments import common

NAME = "self_training"


class StagePseudoLabels:
    """Pseudo labels fixed per stage (``ofg_jax.training.loop.PseudoLabels``).

    At the first epoch of stage ``s`` the network predicts every training item of
    the stage's epochs, and the run's inner optimiser (``label_steps`` steps at
    the inner learning rate of that epoch) turns each prediction into a label,
    saved as ``<workdir>/labels/stage_<s>/<i>.npy``; the stage's other epochs
    (and a resumed run) read them back.
    """

    def __init__(self, config, workdir: str, stages: int, label_steps: int):
        import jax
        from ofg_jax.settings import config as config_lib
        from ofg_jax import data as data_lib
        from ofg_jax.registration.network import predict
        from ofg_jax.settings.inner_optimizer import RefineSettings, make_refiner
        from ofg_jax.schedules import epoch_lr_table

        epochs = config.train.epochs
        if not 1 <= stages <= epochs:
            raise ValueError(f"--stages must be in 1..train.epochs={epochs}, got {stages}")
        self.data = data_lib.create(config.data, config.seed)
        img_size = tuple(self.data.img_size)
        model = config_lib.build_model(config, img_size)
        settings = dataclasses.replace(RefineSettings.from_config(config.ofg),
                                       steps=label_steps)
        refiner = make_refiner(settings, img_size, seed=config.seed,
                               conv_impl=config.model.get("conv_impl") or "auto")
        self._label = jax.jit(lambda variables, moving, fixed, lr: refiner(
            moving, fixed, predict(model, variables, moving, fixed), lr))
        self._inner_lr = epoch_lr_table(config.ofg.learning_rate, epochs)
        self.steps_per_epoch = len(self.data.train_plan(0)) // config.train.batch_size
        self._items = self.steps_per_epoch * config.train.batch_size
        self.bounds = np.linspace(0, epochs, stages + 1).round().astype(int)
        self.folder = os.path.join(workdir, "labels")

    def stage(self, epoch: int) -> int:
        return int(np.searchsorted(self.bounds, epoch, side="right") - 1)

    def for_epoch(self, variables, epoch: int) -> Callable:
        s = self.stage(epoch)
        folder = os.path.join(self.folder, f"stage_{s}")
        items = {}
        for e in range(self.bounds[s], self.bounds[s + 1]):
            for item in self.data.train_plan(e)[:self._items]:
                items.setdefault(repr(item), item)
        paths = {key: os.path.join(folder, f"{i:05d}.npy")
                 for i, key in enumerate(items)}
        done = os.path.join(folder, "complete")
        if not os.path.exists(done):
            os.makedirs(folder, exist_ok=True)
            lr = self._inner_lr[self.bounds[s]]
            for key, item in items.items():
                pair = self.data.load_train(item)
                np.save(paths[key], np.asarray(self._label(
                    variables, np.asarray(pair["moving"], np.float32),
                    np.asarray(pair["fixed"], np.float32), lr)))
            open(done, "w").close()
            common.log(f"stage {s}: {len(paths)} pseudo labels, epochs "
                       f"{self.bounds[s]}..{self.bounds[s + 1] - 1}")
        return lambda item: np.load(paths[repr(item)])


def train_self_training(config, workdir: str, stages: int,
                        label_steps: Optional[int] = None) -> dict:
    """Trains with stage-wise pseudo labels; returns the run's ``summary.json``
    (``train_and_evaluate``'s, plus ``stages``: the validation Dice at the end of
    each stage, and ``label_steps``)."""
    from ofg_jax.training import loop
    label_steps = config.ofg.steps if label_steps is None else label_steps
    labels = StagePseudoLabels(config, workdir, stages, label_steps)
    summary = loop.train_and_evaluate(config, workdir, pseudo_labels=labels)
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        dice = {int(row["step"]): float(row["dice"]) for row in csv.DictReader(f)
                if row["split"] == "val"}
    ends = [int(end) * labels.steps_per_epoch for end in labels.bounds[1:]]
    summary.update(stages=[dice[step] for step in ends if step in dice],
                   label_steps=label_steps)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = common.make_parser(__doc__, default_seeds=3)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--label-steps", type=int, default=None,
                        help="refine steps per pseudo label (default ofg.steps)")
    args = common.parse_args(parser, argv)
    base = common.base_config(args)
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
    notes = ("Self-training s/step excludes the pseudo-label passes at stage starts; "
             "final validation metrics, mean ± std over seeds.")
    common.write_results(NAME, args, records, table, [c[0] for c in columns], notes)
    return {"records": records, "table": table}


if __name__ == "__main__":
    common.run_main(main)
