"""Plots of the experiments' JSON results.

    python -m experiments.plot_experiments workdir/experiments/*.json --out plots/

For every JSON given:
- ``inner_steps.json``: Dice against inner steps, and Dice against seconds per
  training step (mean ± std over seeds; the step times measured in turn where
  the experiment took them);
- ``test_time_refinement.json``: Dice against refinement steps, and Dice against
  seconds per pair, for "network + k steps" and "zero field + n steps";
- ``ofg_vs_unsupervised.json``: the validation Dice of every run against the
  epoch, both training modes and all seeds in one figure (a panel per network);
- every experiment whose records name per-pair evaluation CSVs (``eval_csv``):
  a box plot of per-pair Dice per label, one box per setting (pairs of all seeds
  pooled).
"""

import argparse
import collections
import csv
import json
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import matplotlib.ticker  # pylint: disable=g-import-not-at-top
import numpy as np


def _mean_std(values):
    values = np.asarray(values, float)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def _curve(ax, records, x_key, label, marker="o"):
    """Mean ± std of Dice over seeds, x = mean of ``x_key`` per label group."""
    by_label = collections.OrderedDict()
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    xs, ys, es = [], [], []
    for group in by_label.values():
        x = [r[x_key] for r in group if r.get(x_key) is not None]
        if not x:
            continue
        xs.append(np.mean(x))
        m, s = _mean_std([r["dice"] for r in group])
        ys.append(m)
        es.append(s)
    order = np.argsort(xs)
    ax.errorbar(np.asarray(xs)[order], np.asarray(ys)[order], yerr=np.asarray(es)[order],
                marker=marker, capsize=3, label=label)


def plot_inner_steps(result, out):
    ofg = [r for r in result["records"] if r.get("ofg_steps")]
    unsup = [r for r in result["records"] if r["label"] == "unsupervised"]
    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _curve(ax, ofg, "ofg_steps", "OFG")
    if unsup:
        m, _ = _mean_std([r["dice"] for r in unsup])
        ax.axhline(m, color="gray", ls="--", label="unsupervised")
    ax.set(xlabel="inner optimisation steps", ylabel="validation Dice",
           title="Dice against OFG steps")
    ax.legend()
    paths.append(_save(fig, out, "inner_steps_dice_vs_steps.png"))
    # The step times measured in turn where the experiment took them.
    time_key = ("timed_step_s" if any("timed_step_s" in r for r in result["records"])
                else "seconds_per_step")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _curve(ax, ofg, time_key, "OFG")
    if unsup:
        _curve(ax, unsup, time_key, "unsupervised", marker="s")
    ax.set(xlabel="seconds per training step", ylabel="validation Dice",
           title="Dice against training time")
    ax.legend()
    paths.append(_save(fig, out, "inner_steps_dice_vs_time.png"))
    return paths


def validation_curve(workdir):
    """``(epochs, Dice)`` of the validation rows of a run's ``metrics.csv``."""
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    return (np.asarray([float(r["epoch"]) for r in rows]),
            np.asarray([float(r["dice"]) for r in rows]))


def plot_validation_curves(result, out, name="ofg_vs_unsupervised_curves.png"):
    records = [r for r in result["records"]
               if os.path.exists(os.path.join(r["workdir"], "metrics.csv"))]
    models = list(dict.fromkeys(r["label"].split("/")[0] for r in records))
    if not models:
        return []
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8),
                             squeeze=False)
    colors = {"ofg": "tab:blue", "unsupervised": "tab:orange"}
    for ax, model in zip(axes[0], models):
        for record in records:
            label_model, mode = record["label"].split("/")
            if label_model != model:
                continue
            epochs, dice = validation_curve(record["workdir"])
            ax.plot(epochs, dice, color=colors.get(mode, "gray"), alpha=0.8, lw=1.2,
                    ls="-" if mode == "ofg" else "--",
                    label=f"{mode}, seed {record['seed']}")
        ax.set(xlabel="epoch", ylabel="validation Dice", title=model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return [_save(fig, out, name)]


def plot_test_time(result, out):
    records = result["records"]
    network = [r for r in records if not r.get("from_zero")]
    zero = [r for r in records if r.get("from_zero")]
    paths = []
    for x_key, xlabel, name in [("steps", "optimisation steps at inference",
                                 "test_time_dice_vs_steps.png"),
                                ("seconds_per_pair", "seconds per pair",
                                 "test_time_dice_vs_time.png")]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        _curve(ax, network, x_key, "network + k OFG steps")
        if zero:
            _curve(ax, zero, x_key, "zero field + n steps", marker="s")
        ax.set(xlabel=xlabel, ylabel="validation Dice",
               title="Test-time refinement")
        if x_key == "seconds_per_pair":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend()
        paths.append(_save(fig, out, name))
    return paths


def per_label_dice(records):
    """``{setting: {label: [per-pair Dice]}}`` from the records' eval CSVs."""
    table = collections.OrderedDict()
    for r in records:
        path = r.get("eval_csv")
        if not path or not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key.startswith("dice_"):
                        table.setdefault(r["label"], collections.OrderedDict()) \
                            .setdefault(key[5:], []).append(float(value))
    return table


def plot_boxes(result, out):
    table = per_label_dice(result["records"])
    if not table:
        return []
    settings = list(table)
    labels = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels) * len(settings) ** 0.5),
                                    4))
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        data = [table[setting].get(label, []) for label in labels]
        positions = np.arange(len(labels)) + (i - (len(settings) - 1) / 2) * width
        box = ax.boxplot(data, positions=positions, widths=width * 0.9,
                         patch_artist=True, showfliers=False)
        color = plt.cm.tab10(i % 10)
        for patch in box["boxes"]:
            patch.set_facecolor(color)
        ax.plot([], [], color=color, lw=6, label=setting)
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set(xlabel="label", ylabel="Dice per pair",
           title=f"{result['experiment']}: Dice per label")
    ax.legend(fontsize=7, ncol=2)
    return [_save(fig, out, f"{result['experiment']}_boxplot.png")]


def _save(fig, out, name):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="experiment JSON files")
    parser.add_argument("--out", default="plots", help="output folder")
    args = parser.parse_args(argv)
    paths = []
    for path in args.results:
        with open(path) as f:
            result = json.load(f)
        if result.get("experiment") == "inner_steps":
            paths += plot_inner_steps(result, args.out)
        if result.get("experiment") == "test_time_refinement":
            paths += plot_test_time(result, args.out)
        if result.get("experiment") == "ofg_vs_unsupervised":
            paths += plot_validation_curves(
                result, args.out, f"{os.path.splitext(os.path.basename(path))[0]}"
                                  "_curves.png")
        paths += plot_boxes(result, args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
