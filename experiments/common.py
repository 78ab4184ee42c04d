"""Shared code of the paper's comparisons and ablations (``python -m experiments.X``).

Every experiment builds a list of :class:`Run` (a label, config overrides and a
seed), trains each with ``ofg_jax.training.loop.train_and_evaluate`` through
:func:`run_all`, aggregates the metrics over seeds and writes
``<workdir>/<experiment>.json`` (everything) and ``<workdir>/<experiment>.md`` (the
table, mean ± sample std over seeds), and prints the table.

Command line shared by all experiments (:func:`make_parser`):

    --config configs/demo.py      the base config (default: the synthetic demo)
    --set KEY=VALUE [KEY=VALUE ...]  overrides, e.g. --set train.epochs=4
                                  data.img_size=32,32,32 model.enc_features=4,8,8,8
    --seeds N                     seeds 0..N-1
    --workdir DIR                 root of the runs and results

``--set KEY=VALUE`` is ``--config.KEY=VALUE`` of ``python -m ofg_jax.main``: the
same keys (the network's options among them), parsed the same way
(``ofg_jax.settings.config.load``).

Runs are stored under ``<workdir>/runs/<hash of the full config>``: a run whose
``summary.json`` exists is not trained again, so experiments sharing a workdir
share identical runs (the OFG VoxelMorph of experiment 1 is also 10 steps in
experiment 2 and the network of experiment 7), and an interrupted experiment
resumes where it stopped (``train_and_evaluate`` resumes unfinished runs).
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from experiments.timing import CompiledStep, device_description, interleaved_seconds
from experiments.timing import synthetic_batch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.py")
DEFAULT_WORKDIR = os.path.join("workdir", "experiments")


# ---------------------------------------------------------------------------
# Command line and configs.


def make_parser(description: str, default_seeds: int = 3) -> argparse.ArgumentParser:
    """The arguments every experiment takes (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="base config file (default: configs/demo.py)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=4 "
                             "data.img_size=32,32,32")
    parser.add_argument("--seeds", type=int, default=default_seeds,
                        help=f"number of seeds, 0..N-1 (default {default_seeds})")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"root of runs and results (default {DEFAULT_WORKDIR})")
    return parser


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def base_config(args: argparse.Namespace):
    """The experiment's base config: ``--config`` with the ``--set`` overrides."""
    from ofg_jax.settings import config as config_lib
    return config_lib.load(args.config, args.set)


def config_hash(config) -> str:
    """A short hash of the full config (the identity of a run)."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def setup_compilation_cache(workdir: str) -> None:
    """Persistent XLA cache in ``<workdir>/xla_cache`` (unless one is set already):
    runs that differ only in the seed compile once."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.config.jax_compilation_cache_dir or os.environ.get(
            "JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(
        os.path.abspath(workdir), "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_main(main: Callable[[], Any]) -> None:
    """Runs an experiment's ``main()``; an expected error is one ``error:`` line."""
    from ofg_jax import cli
    try:
        main()
    except cli.EXPECTED_ERRORS as e:
        cli.print_error(e)
        sys.exit(cli.exit_status(e))


# ---------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass
class Run:
    """One training run: a row ``label`` of the table, its overrides and seed."""
    label: str
    overrides: dict[str, Any]
    seed: int


def run_config(base, run: Run):
    from ofg_jax.settings import config as config_lib
    return config_lib.with_overrides(base, {**run.overrides, "seed": int(run.seed)})


def run_dir(workdir: str, config) -> str:
    return os.path.join(workdir, "runs", config_hash(config))


def train_run(base, run: Run, workdir: str,
              train_fn: Optional[Callable[[Any, str], dict]] = None) -> dict[str, Any]:
    """Trains ``run`` (or reuses its finished run) and returns its record.

    The record: ``label``, ``seed``, ``overrides``, ``workdir``, ``summary`` (the
    run's ``summary.json``), ``eval_csv`` (per-pair rows of the final evaluation)
    and the metrics ``dice``, ``non_pos_jacobian_pct`` (final), ``identity_dice``
    and ``seconds_per_step`` (training only).
    """
    from ofg_jax.training import loop  # pylint: disable=g-import-not-at-top
    config = run_config(base, run)
    directory = run_dir(workdir, config)
    summary_path = os.path.join(directory, "summary.json")
    if os.path.exists(summary_path):
        log(f"[{run.label} seed {run.seed}] reusing {directory}")
        with open(summary_path) as f:
            summary = json.load(f)
    else:
        log(f"[{run.label} seed {run.seed}] training in {directory}")
        summary = (train_fn or loop.train_and_evaluate)(config, directory)
    return make_record(run, directory, summary)


def make_record(run: Run, directory: str, summary: dict[str, Any]) -> dict[str, Any]:
    sps = summary.get("steps_per_second")
    return {
        "label": run.label, "seed": run.seed, "overrides": jsonable(run.overrides),
        "workdir": directory, "summary": summary,
        "eval_csv": os.path.join(directory, "eval", f"step_{summary['steps']:06d}.csv"),
        "dice": summary["final"]["dice"],
        "non_pos_jacobian_pct": summary["final"]["non_pos_jacobian_pct"],
        "sdlogj": summary["final"].get("sdlogj"),
        "best_dice": (summary.get("best") or {}).get("dice"),
        "identity_dice": summary["identity"]["dice"],
        "seconds_per_step": 1.0 / sps if sps else None,
    }


def run_all(base, runs: Iterable[Run], workdir: str, **kwargs) -> list[dict[str, Any]]:
    setup_compilation_cache(workdir)
    return [train_run(base, run, workdir, **kwargs) for run in runs]


def timed_step_seconds(base, settings: dict[str, dict[str, Any]], repeats: int,
                       warmup: int = 1) -> dict[str, float]:
    """Median seconds of one training step per setting, timed in turn in one process.

    ``settings`` maps a label to config overrides (as in :class:`Run`). Each
    setting's compiled train step runs on one batch of smooth random images of
    the data's grid and ``train.batch_size``, round by round
    (``timing.interleaved_seconds``): unlike the ``steps_per_second`` of runs
    trained at different times, the ratios are not skewed by the machine's load.
    """
    import jax  # pylint: disable=g-import-not-at-top
    from ofg_jax.settings import config as config_lib  # pylint: disable=g-import-not-at-top
    from ofg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    img_size = tuple(data_lib.create(base.data, base.seed).img_size)
    moving, fixed = synthetic_batch(img_size, base.train.batch_size)
    batch = {"moving": jax.device_put(moving), "fixed": jax.device_put(fixed)}
    calls = {}
    for label, overrides in settings.items():
        config = config_lib.with_overrides(base, overrides)
        config_lib.validate(config)
        calls[label] = CompiledStep(config, img_size, batch)
    log(f"timing {', '.join(calls)} in turn: {warmup} + {repeats} rounds")
    medians, _, _ = interleaved_seconds(calls, repeats, warmup)
    return medians


def add_time_repeats_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--time-repeats", type=int, default=10,
                        help="rounds of the step timing after the runs "
                             "(default 10; 0 skips it)")


def time_steps(base, runs: Sequence[Run], records: Sequence[dict], repeats: int,
               reference: Optional[str] = None) -> tuple[dict[str, float], str]:
    """Times every label's training step with :func:`timed_step_seconds`.

    Sets ``timed_step_s`` in each record; returns the seconds per label and a
    markdown paragraph with the table (``× reference``: relative to that label).
    """
    settings = {}
    for run in runs:
        settings.setdefault(run.label, run.overrides)
    seconds = timed_step_seconds(base, settings, repeats)
    for record in records:
        record["timed_step_s"] = seconds[record["label"]]
    header = ["setting", "s / step"] + ([f"× {reference}"] if reference else [])
    rows = [[label, f"{value:.4f}"]
            + ([f"{value / seconds[reference]:.2f}"] if reference else [])
            for label, value in seconds.items()]
    text = ("Step time, every setting's jitted step timed in turn in one process "
            f"(median of {repeats} rounds after a warm-up round):\n\n"
            + markdown_table(header, rows))
    return seconds, text


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: (
        list(v) if isinstance(v, tuple) else str(v))))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Aggregation and tables.


def values_of(records: Sequence[dict], label: str, metric: str) -> list[float]:
    return [float(r[metric]) for r in records
            if r["label"] == label and r.get(metric) is not None]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample, ddof=1; 0 for one value), "n", "values"}``."""
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": len(values),
            "values": values}


def aggregate(records: Sequence[dict], metrics: Sequence[str]) -> dict[str, dict]:
    """``{label: {metric: mean_std}}`` over the records' seeds, labels in order."""
    labels = list(dict.fromkeys(r["label"] for r in records))
    return {label: {m: mean_std(values_of(records, label, m)) for m in metrics}
            for label in labels}


def cell(stats: dict[str, Any], digits: int = 3) -> str:
    """``"0.712 ± 0.004"`` (``"0.712"`` for one seed, ``"–"`` for none)."""
    if not stats or stats["n"] == 0 or stats["mean"] is None:
        return "–"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# Columns of the common table: (metric, header, digits).
DICE = ("dice", "Dice", 3)
SDLOGJ = ("sdlogj", "SDlogJ", 3)
JACOBIAN = ("non_pos_jacobian_pct", "% det J ≤ 0", 3)
SECONDS_PER_STEP = ("seconds_per_step", "s / train step", 3)


def standard_table(records: Sequence[dict], columns=(DICE, JACOBIAN),
                   first_header: str = "setting") -> str:
    """One row per label, one column per metric, mean ± std over seeds."""
    stats = aggregate(records, [c[0] for c in columns])
    rows = []
    for label, metrics in stats.items():
        n = max(s["n"] for s in metrics.values())
        rows.append([label, str(n)] + [cell(metrics[m], d) for m, _, d in columns])
    return markdown_table([first_header, "seeds"] + [h for _, h, _ in columns], rows)


# ---------------------------------------------------------------------------
# Outputs.


def write_results(name: str, args: argparse.Namespace, records: Sequence[dict],
                  table: str, metrics: Sequence[str], notes: str = "",
                  extra: Optional[dict[str, Any]] = None) -> tuple[str, str]:
    """Writes ``<workdir>/<name>.json`` and ``.md``, prints the table; returns the paths."""
    os.makedirs(args.workdir, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "-m", f"experiments.{name}"]
                         + list(getattr(args, "argv", []) or []))
    payload = {
        "experiment": name, "date": date, "device": device_description(),
        "command": command, "config": os.path.relpath(os.path.abspath(args.config),
                                                      REPO_ROOT),
        "set": list(args.set), "seeds": args.seeds, "records": jsonable(list(records)),
        "aggregate": aggregate(records, metrics), "table": table, "notes": notes,
        **jsonable(extra or {}),
    }
    json_path = os.path.join(args.workdir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    md_path = os.path.join(args.workdir, f"{name}.md")
    header = (f"### {name}\n\n`{command}`\n\nconfig `{payload['config']}`"
              f"{' with ' + ' '.join(args.set) if args.set else ''}; {date}; "
              f"{payload['device']}\n\n")
    with open(md_path, "w") as f:
        f.write(header + table + "\n" + (f"\n{notes}\n" if notes else ""))
    print(table)
    if notes:
        print(notes)
    log(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    """Parses ``argv`` (default ``sys.argv[1:]``); keeps it for the recorded command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if getattr(args, "time_repeats", 0) < 0:
        parser.error("--time-repeats must be >= 0")
    return args

