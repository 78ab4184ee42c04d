"""A workdir is a contract: one run, one config; checked before it is written;
kept intact by interrupts, refusals and re-runs."""

import csv
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ofg_jax.configs import demo
from ofg_jax import cli
from ofg_jax.settings import config as config_lib
from ofg_jax.training import loop
from ofg_jax.training import workdir as workdir_lib
from tests import data_fixtures
from tests.compilation_cache import persistent_compilation_cache

REPO = pathlib.Path(__file__).resolve().parents[2]
SIZE = (16, 16, 16)
# A two-level VoxelMorph with XLA's convolution: the quickest to compile.
TINY = {"data.img_size": SIZE, "data.num_train": 4, "data.num_val": 1,
        "data.val_subjects": 1, "train.epochs": 3, "train.log_every": 1,
        "train.learning_rate": 1e-3, "train.figures": False, "ofg.steps": 2,
        "model.enc_features": (4, 8), "model.dec_features": (8, 8),
        "model.final_features": (4,), "model.conv_impl": "xla",
        "checkpoint.keep_best": 1}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with persistent_compilation_cache(str(tmp_path_factory.mktemp("xla"))):
        yield


def tiny(**overrides):
    """The demo at toy size, then ``overrides`` (a new ``model.name`` resets the
    network options to the new network's defaults)."""
    config = config_lib.with_overrides(config_lib.complete(demo.get_config()), TINY)
    return config_lib.with_overrides(config, overrides)


def snapshot(workdir):
    """Every file under ``workdir`` with its size and modification time."""
    files = {}
    for folder, _, names in os.walk(workdir):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            files[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return files


def train_losses(workdir):
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(f)
                if row["split"] == "train"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-step run: (workdir, summary)."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    return workdir, loop.train_and_evaluate(tiny(**{"train.max_steps": 2}), workdir)


@pytest.mark.parametrize("key, value", [
    ("ofg.steps", 3), ("train.learning_rate", 5e-3), ("seed", 1),
    ("train.epochs", 5), ("data.num_train", 6), ("model.name", "vitvnet"),
    ("model.enc_features", (4, 4)), ("train.mode", "unsupervised"),
])
def test_resume_refuses_a_changed_config_and_writes_nothing(finished, key, value):
    workdir, _ = finished
    before = snapshot(workdir)
    with pytest.raises(config_lib.ConfigError) as error:
        loop.train_and_evaluate(tiny(**{key: value, "train.max_steps": 4}), workdir)
    message = str(error.value)
    assert key in message and workdir in message and "\n" not in message
    assert snapshot(workdir) == before


def test_allowed_change_is_recorded_and_free_keys_change_freely(finished, tmp_path):
    workdir, _ = finished
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", workdir, copy], check=True)
    with pytest.raises(config_lib.ConfigError, match="--allow_config_change"):
        loop.train_and_evaluate(tiny(**{"train.epochs": 4, "train.max_steps": 3}), copy)
    summary = loop.train_and_evaluate(
        tiny(**{"train.epochs": 4, "train.max_steps": 3, "train.log_every": 2}), copy,
        allow_config_change=True)
    assert summary["steps"] == 3
    with open(os.path.join(copy, "config.json")) as f:
        record = json.load(f)
    assert record["train"]["epochs"] == 4
    assert record["history"] == [{"step": 2, "changed": {
        "train.epochs": {"from": 3, "to": 4}, "train.log_every": {"from": 1, "to": 2},
        "train.max_steps": {"from": 2, "to": 3}}}]


def test_rerunning_a_finished_run_changes_nothing(finished, capsys):
    workdir, summary = finished
    before = snapshot(workdir)
    assert loop.train_and_evaluate(tiny(**{"train.max_steps": 2}), workdir) == summary
    assert snapshot(workdir) == before
    out = capsys.readouterr()
    assert "finished run" in out.err and f"outputs in {workdir}" in out.out
    assert summary["steps_per_second"] > 0


def test_force_evaluate_recomputes_the_final_evaluation(finished, tmp_path):
    workdir, summary = finished
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", workdir, copy], check=True)
    again = loop.train_and_evaluate(tiny(**{"train.max_steps": 2}), copy,
                                     force_evaluate=True)
    assert again["final"] == pytest.approx(summary["final"], rel=1e-6)
    assert again["steps_per_second"] == summary["steps_per_second"]
    with open(os.path.join(copy, "metrics.csv"), newline="") as f:
        val = [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "val"]
    assert val == [0, 2]  # Re-evaluated, not duplicated.


# A run of TINY stopped at step 2 (train.max_steps=2), written by the code before
# the package's folders were its layers (commit 1d23817: ofg_jax.train,
# ofg_jax.config, ...), kept as it was written.
BEFORE_LAYOUT = REPO / "tests" / "fixtures" / "workdir_before_layout"


def test_a_workdir_of_the_previous_layout_resumes_exactly(tmp_path):
    """It resumes from its checkpoint, and its losses are those of a run done
    here from the start (to float32 rounding across XLA builds)."""
    workdir = str(tmp_path / "before")
    shutil.copytree(BEFORE_LAYOUT, workdir)
    config = tiny(**{"train.max_steps": 4})
    loop.train_and_evaluate(config, workdir)
    loop.train_and_evaluate(config, str(tmp_path / "here"))
    resumed, here = train_losses(workdir), train_losses(str(tmp_path / "here"))
    assert sorted(resumed) == sorted(here) == [1, 2, 3, 4]
    np.testing.assert_allclose([resumed[s] for s in range(1, 5)],
                               [here[s] for s in range(1, 5)], rtol=1e-5)
    assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:  # Not rerun.
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert {s: resumed[s] for s in (1, 2)} == train_losses(str(BEFORE_LAYOUT))


def test_initial_survives_a_resume_from_step_0(tmp_path, monkeypatch):
    workdir = str(tmp_path / "work")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Killed during the first epoch.

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            loop.train_and_evaluate(tiny(**{"train.max_steps": 1}), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0"]
    summary = loop.train_and_evaluate(tiny(**{"train.max_steps": 1}), workdir)
    assert summary["initial"] is not None and summary["initial"]["step"] == 0
    assert summary["identity"] is not None


def test_a_checkpoint_of_another_network_is_one_short_line(finished, tmp_path):
    workdir, _ = finished
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", workdir, copy], check=True)
    other = tiny(**{"model.enc_features": (4, 4), "train.max_steps": 4})
    with open(os.path.join(copy, "config.json"), "w") as f:  # A doctored record.
        json.dump(config_lib.record(other, SIZE), f)
    with pytest.raises(ValueError, match="checkpoint 2 .* does not fit") as error:
        loop.train_and_evaluate(other, copy)
    assert len(str(error.value)) < 500


@pytest.mark.parametrize("corrupt", ["truncated", "nan", "shape", "label"])
def test_bad_training_files_are_refused_before_the_workdir_exists(tmp_path, corrupt):
    root = tmp_path / "data"
    data_fixtures.write_ixi(str(root), np.random.default_rng(0), shape=SIZE,
                            num_train=4)
    bad = root / "Train" / "subject_2.pkl"
    image = np.random.default_rng(1).random(SIZE).astype(np.float32)
    seg = np.zeros(SIZE, np.float32)
    if corrupt == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif corrupt == "nan":
        image[1, 2, 3] = np.nan
        data_fixtures.write_pkl(str(bad), image, seg)
    elif corrupt == "shape":
        data_fixtures.write_pkl(str(bad), image[:-1], seg[:-1])
    else:
        seg[0, 0, 0] = 1000  # Not a FreeSurfer code of the IXI table.
        data_fixtures.write_pkl(str(bad), image, seg)
    config = config_lib.with_overrides(config_lib.complete(
        config_lib.load(str(REPO / "configs" / "ixi.py"))), {
            **{k: v for k, v in TINY.items() if not k.startswith("data.")},
            "data.root": str(root), "train.max_steps": 1})
    workdir = tmp_path / "work"
    with pytest.raises(ValueError, match="subject_2.pkl"):
        loop.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_or_read_only_is_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="is a file"):
        loop.train_and_evaluate(tiny(), str(a_file / "work"))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: use /proc.
        read_only = pathlib.Path("/proc/1")
    with pytest.raises(PermissionError, match="not writable"):
        loop.train_and_evaluate(tiny(), str(read_only / "work"))


CLI = ["--config=configs/demo.py", "--config.train.figures=false",
       "--config.data.img_size=(16,16,16)", "--config.data.num_train=4",
       "--config.data.num_val=1", "--config.data.val_subjects=1",
       "--config.train.log_every=1", "--config.train.learning_rate=0.001",
       "--config.ofg.steps=2", "--config.model.enc_features=(4,8)",
       "--config.model.dec_features=(8,8)", "--config.model.final_features=(4,)",
       "--config.model.conv_impl=xla", "--config.checkpoint.keep_best=1"]


def cli_env(cache):
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_writes_a_checkpoint_and_the_resume_is_exact(tmp_path, signum):
    env = cli_env(tmp_path.parent / "cli_cache")
    workdir = tmp_path / "work"
    run = lambda folder, *extra: [sys.executable, "-m", "ofg_jax.main", *CLI,
                                  "--config.train.epochs=50", f"--workdir={folder}",
                                  *extra]
    proc = subprocess.Popen(run(workdir), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(train_losses(workdir) if (workdir / "metrics.csv").exists() else {}) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == cli.EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert "run the same command again to resume" in stderr
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
    stopped = steps[-1]
    assert stopped >= 3 and stopped < 200

    # Resume to a few steps past the interruption; an uninterrupted run gives the
    # same losses at every step.
    end = f"--config.train.max_steps={stopped + 2}"
    reference = tmp_path / "reference"
    for folder in (workdir, reference):
        subprocess.run(run(folder, end), cwd=REPO, env=env, check=True,
                       capture_output=True)
    resumed, uninterrupted = train_losses(workdir), train_losses(reference)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, stopped + 3))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                               [uninterrupted[s] for s in sorted(resumed)], rtol=1e-6)


HOLD_LOCK = """
import sys
from ofg_jax.training import workdir
with workdir.exclusive(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # Until the test closes stdin or kills this process.
"""


def hold_lock(workdir):
    """A process that holds the lock of ``workdir`` (a run in progress)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_locked_workdir_is_refused_and_a_killed_holder_does_not_block(finished,
                                                                        tmp_path):
    workdir, _ = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", workdir, str(copy)], check=True)
    holder = hold_lock(copy)
    try:
        before = snapshot(copy)
        with pytest.raises(workdir_lib.WorkdirInUseError) as error:
            loop.train_and_evaluate(tiny(**{"train.max_steps": 3}), str(copy))
        assert str(error.value) == (
            f"workdir {copy} is in use by another run (host {socket.gethostname()}, "
            f"pid {holder.pid}); wait for it to end, or use another --workdir")
        assert snapshot(copy) == before  # Refused before anything was written.
    finally:
        holder.kill()  # SIGKILL: no clean-up; the operating system drops the lock.
        holder.wait()
    assert (copy / workdir_lib.LOCK).exists()
    summary = loop.train_and_evaluate(tiny(**{"train.max_steps": 3}), str(copy))
    assert summary["steps"] == 3
    assert not (copy / workdir_lib.LOCK).exists()  # Removed at the end of the run.


def test_a_refused_new_run_leaves_no_workdir_and_frees_the_lock(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(config_lib.ConfigError):
        loop.train_and_evaluate(tiny(**{"train.mode": "nope"}), str(workdir))
    assert not workdir.exists()
    holder = hold_lock(workdir)  # The lock is free again.
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
    assert not workdir.exists()
