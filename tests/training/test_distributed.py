"""Training with several processes on JAX's distributed runtime, on this machine.

Real processes (``python -m ofg_jax.main --distributed``) on CPU: process 0
serves the coordinator on 127.0.0.1 at a free port, and Gloo carries the
collectives. Two processes of one device each must train, evaluate, checkpoint
and resume exactly as one process with two devices (the same global batch);
failures to connect must end with one ``error:`` line, not a hang; a workdir
holds one run at a time.
"""

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ofg_jax import cli
from ofg_jax.settings import config as config_lib
from ofg_jax.registration import network as network_lib
from ofg_jax.training import loop
from tests.compilation_cache import persistent_compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[2]
# The demo at toy size (as in test_workdir): 4 training subjects make 2 steps
# per epoch at batch 2, and the validation Dice moves by step 6 at this rate.
TINY = {"data.img_size": (16, 16, 16), "data.num_train": 4, "data.num_val": 1,
        "data.val_subjects": 1, "train.log_every": 1, "train.learning_rate": 0.01,
        "train.batch_size": 2, "train.figures": False, "ofg.steps": 2,
        "model.enc_features": (4, 8), "model.dec_features": (8, 8),
        "model.final_features": (4,), "model.conv_impl": "xla",
        "checkpoint.keep_best": 1}
STEPS = 10  # of the reference run; the two-process run stops 2 steps earlier.
TIMEOUT_S = 300  # for any one command; a hang fails the test instead of the CI job.


def cli_args(**overrides):
    """``--config=demo`` and ``--config.<key>=<value>`` for ``TINY`` and ``overrides``."""
    values = {**TINY, **overrides}
    return ["--config=demo"] + [f"--config.{key}={value}".replace(" ", "")
                                for key, value in values.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A compilation cache shared by every process of the module."""
    return tmp_path_factory.mktemp("xla")


PAIR = ((0, 2), (1, 2))  # (--process_id, --num_processes) of each process of a job


def start(cache, workdir, *args, job=PAIR, devices=1, port=None, timeout_s=60):
    """Starts the processes ``job`` (none: one plain run) with ``devices`` each."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    command = [sys.executable, "-m", "ofg_jax.main", *args, f"--workdir={workdir}"]
    port = port or free_port()
    commands = [command + ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                           f"--num_processes={count}", f"--process_id={i}",
                           f"--distributed_timeout={timeout_s}"]
                for i, count in job] or [command]
    return [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for c in commands]


def finish(procs):
    """``[(exit status, stdout, stderr)]`` of ``procs``, once all have ended."""
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


def run(cache, workdir, *args, **options):
    results = finish(start(cache, workdir, *args, **options))
    for status, _, err in results:
        assert status == 0, err[-3000:]
    return results


def rows(workdir, split):
    """``{step: loss or Dice}`` of ``metrics.csv``; fails on a duplicated row."""
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        found = [(int(row["step"]), float(row["loss" if split == "train" else "dice"]))
                 for row in csv.DictReader(f) if row["split"] == split]
    steps = [step for step, _ in found]
    assert len(steps) == len(set(steps)), f"rows written twice: {steps}"
    return dict(found)


def train_rows(workdir) -> int:
    """How many training rows ``metrics.csv`` holds so far (it may be mid-write)."""
    try:
        with open(os.path.join(workdir, "metrics.csv")) as f:
            return sum(",train," in line for line in f)
    except FileNotFoundError:
        return 0


def wait_for(condition, what):
    deadline = time.time() + TIMEOUT_S
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def one_error_line(err):
    """The single ``error:`` line of ``err``, which must be all of stderr's last line."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """One process with two devices, ``STEPS`` steps: ``(workdir, its pid, [(exit
    status, stdout, stderr)] of a two-process job started there while it ran)``."""
    workdir = tmp_path_factory.mktemp("reference") / "work"
    first = start(cache, workdir, *cli_args(**{"train.max_steps": STEPS}), job=(),
                  devices=2)
    wait_for(lambda: (workdir / ".lock").exists() or first[0].poll() is not None,
             "the first run to lock its workdir")
    second = finish(start(cache, workdir, *cli_args(**{"train.max_steps": STEPS})))
    first_was_running = first[0].poll() is None
    holder = first[0].pid
    [(status, _, err)] = finish(first)
    assert status == 0, err[-3000:]
    assert first_was_running, "the first run ended before the second one tried"
    return workdir, holder, second


def test_a_second_job_on_a_busy_workdir_is_refused_on_every_process(reference):
    workdir, holder, second = reference
    for status, _, err in second:
        assert status == cli.EXIT_FAILURE
        line = one_error_line(err)
        assert f"{workdir} is in use by another run" in line
        assert f"host {socket.gethostname()}, pid {holder}" in line
    # The first run's files are as if it had run alone: one row per step, one
    # TensorBoard event file.
    assert sorted(rows(workdir, "train")) == list(range(1, STEPS + 1))
    assert len(os.listdir(workdir / "tensorboard")) == 1
    assert not (workdir / ".lock").exists()


def test_two_processes_train_and_resume_like_one_process_with_two_devices(
        reference, cache, tmp_path):
    """(2 processes x 1 device) = (1 process x 2 devices), through a Ctrl-C of both
    processes and a restart; then one single-device process resumes the
    checkpoint and ``register``'s loader reads it."""
    reference_dir = reference[0]
    workdir = tmp_path / "work"
    procs = start(cache, workdir, *cli_args())  # 60 steps: stopped long before
    wait_for(lambda: train_rows(workdir) >= 2 or any(p.poll() is not None for p in procs),
             "two training steps")
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    stops = set()
    for status, _, err in finish(procs):
        assert status == cli.EXIT_INTERRUPTED, err[-3000:]
        line = one_error_line(err)
        assert "interrupted by SIGINT" in line and "run the same command again" in line
        stops.add(int(line.split(" at step ")[1].split()[0]))
    [stopped] = stops  # Both processes stopped at the same step.
    checkpoints = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
    assert checkpoints[-1] == stopped and 2 <= stopped < STEPS - 2, (stopped, checkpoints)

    run(cache, workdir, *cli_args(**{"train.max_steps": STEPS - 2}))
    expected, val = rows(reference_dir, "train"), rows(reference_dir, "val")
    losses = rows(workdir, "train")
    assert sorted(losses) == list(range(1, STEPS - 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [expected[s] for s in sorted(losses)], rtol=1e-5)
    dice = rows(workdir, "val")
    assert sorted(dice) == [s for s in sorted(val) if s <= STEPS - 2]
    np.testing.assert_allclose([dice[s] for s in sorted(dice)],
                               [val[s] for s in sorted(dice)], rtol=1e-5)
    assert len(set(dice.values())) > 1  # Training moved the Dice: not a vacuous match.

    # One process with one device resumes the two processes' checkpoint.
    config = config_lib.load("demo", [arg[len("--config."):] for arg in cli_args(
        **{"train.max_steps": STEPS})[1:]])
    with persistent_compilation_cache(str(cache / "in_process")):
        loop.train_and_evaluate(config, str(workdir))
    losses = rows(workdir, "train")
    np.testing.assert_allclose([losses[s] for s in (STEPS - 1, STEPS)],
                               [expected[s] for s in (STEPS - 1, STEPS)], rtol=1e-5)
    trained = network_lib.load_trained(str(workdir), step="latest")
    assert trained.step == STEPS
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(trained.variables))


def test_two_processes_of_two_devices_train_a_batch_of_four(cache, tmp_path):
    """Each process feeds its two devices its half of every global batch; process
    0 writes the summary and the figures, of the best checkpoint, which every
    process restores."""
    overrides = {"train.batch_size": 4, "train.max_steps": 2}
    workdir = tmp_path / "work"
    results = run(cache, workdir, *cli_args(**overrides, **{
        "train.figures": True, "checkpoint.keep_best": 3}), devices=2)
    assert "outputs in" in results[0][1] and "outputs in" not in results[1][1]
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    # The figures' checkpoint is not the final state: it was restored.
    assert summary["best"]["step"] != summary["final"]["step"] == 2
    assert str(summary["best"]["step"]) in os.listdir(workdir / "checkpoints")
    assert (workdir / "figures" / "curves.png").is_file()

    config = config_lib.load("demo", [arg[len("--config."):]
                                      for arg in cli_args(**overrides)[1:]])
    with persistent_compilation_cache(str(cache / "in_process")):
        loop.train_and_evaluate(config, str(tmp_path / "one_device"))
    expected, losses = rows(tmp_path / "one_device", "train"), rows(workdir, "train")
    assert sorted(losses) == sorted(expected) == [1, 2]
    np.testing.assert_allclose([losses[1], losses[2]], [expected[1], expected[2]],
                               rtol=1e-5)


def test_a_process_that_cannot_reach_the_coordinator_ends_in_bounded_time(cache, tmp_path):
    began = time.time()
    [(status, _, err)] = finish(start(cache, tmp_path / "work", *cli_args(),
                                      job=((1, 2),), timeout_s=2))
    elapsed = time.time() - began
    assert status == cli.EXIT_FAILURE
    assert "gave up waiting for the job's processes after 2 s" in one_error_line(err)
    assert elapsed < 60, elapsed  # 2 s of waiting, and the start of Python and JAX
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("job, message", [
    (((0, 3), (1, 3)), "gave up waiting for the job's processes after 2 s"),
    (((0, 2), (1, 3)), "2 processes connected, but process(es) [1] were started "
                       "with --num_processes=[3]"),
])
def test_a_wrong_num_processes_ends_every_process_in_bounded_time(cache, tmp_path, job,
                                                                 message):
    began = time.time()
    results = finish(start(cache, tmp_path / "work", *cli_args(), job=job, timeout_s=2))
    elapsed = time.time() - began
    for status, _, err in results:
        assert status != 0
        assert message in one_error_line(err)
    assert elapsed < 60, elapsed
    assert not (tmp_path / "work").exists()
