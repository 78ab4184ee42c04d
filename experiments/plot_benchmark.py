"""Log-log plot of training-step time against volume size from benchmark JSONs.

    python -m experiments.plot_benchmark bench_64.json bench_full.json --out plot.png

Each input is a file written by ``experiments/benchmark.py`` (one record or a
list of records). One line per framework and step (unsupervised, OFG), time in
seconds against the number of voxels per volume.
"""

import argparse
import json
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STEPS = {"unsupervised_step_s": ("unsupervised", "--"), "ofg_step_s": ("OFG", "-")}
FRAMEWORKS = {"jax": "tab:blue", "torch": "tab:orange", "torch_compile": "tab:green"}


def load_records(paths: Sequence[str]) -> list[dict]:
    """All benchmark records in ``paths``; ``ValueError`` names a malformed file."""
    records = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for record in data if isinstance(data, list) else [data]:
            if "shape" not in record or "jax" not in record:
                raise ValueError(f"{path}: not a benchmark record (needs 'shape' and "
                                 f"'jax'), got keys {sorted(record)}")
            records.append(record)
    return records


def series(records: Sequence[dict], framework: str, key: str) -> tuple:
    """``(voxels, seconds)`` sorted by size, for records where the value exists."""
    points = sorted((int(np.prod(r["shape"])), r[framework][key]) for r in records
                    if isinstance(r.get(framework), dict)
                    and r[framework].get(key) is not None)
    return tuple(zip(*points)) if points else ((), ())


def plot(records: Sequence[dict], out: str) -> None:
    """Writes the step-time plot of ``records`` to ``out``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for framework, color in FRAMEWORKS.items():
        for key, (label, style) in STEPS.items():
            voxels, seconds = series(records, framework, key)
            if voxels:
                ax.plot(voxels, seconds, style, marker="o", color=color,
                        label=f"{framework} {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("voxels per volume")
    ax.set_ylabel("seconds per training step")
    models = sorted({r.get("model", "?") for r in records})
    devices = sorted({r.get("device", "?") for r in records})
    ax.set_title(f"{', '.join(models)}; {'; '.join(devices)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="benchmark JSON files")
    parser.add_argument("--out", default="benchmark.png", help="image to write")
    args = parser.parse_args(argv)
    plot(load_records(args.inputs), args.out)


if __name__ == "__main__":
    main()
