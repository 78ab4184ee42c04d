"""Tests of the command line: flags, configs, exit codes and messages."""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from ofg_jax import cli
from ofg_jax.settings import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("demo", "ixi", "oasis", "lpba", "abdomen_ct")


def run_cli(*args, cwd=REPO, env=None):
    """Runs ``python -m ofg_jax.main ARGS``; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "ofg_jax.main", *args], cwd=cwd, capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO),
                                     **(env or {})})


def load_config(name):
    import importlib
    return importlib.import_module(f"ofg_jax.configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_hold_the_reference_hyper_parameters(name):
    config = load_config(name)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.model.name == "voxelmorph"
    assert config.train.mode == "ofg"
    assert config.train.reg_weight is None  # = 0.02 in OFG mode.
    assert config.ofg.optimizer == "amsgrad"
    if name == "demo":
        assert config.ofg.reg_weight == 1.0
        return
    assert config.data.name == name
    assert config.train.epochs == 500
    assert config.train.batch_size == 1
    assert config.train.learning_rate == 1e-4
    assert config.ofg.learning_rate == 0.1
    # Abdomen CT: the reference's MSE-energy code, MSE + 0.02 Grad, 3 steps.
    expected = ("mse", 3, 0.02) if name == "abdomen_ct" else ("ncc", 10, 1.0)
    assert (config.ofg.similarity, config.ofg.steps, config.ofg.reg_weight) == expected
    assert (config.data.num_train, config.data.num_val) == {
        "ixi": (200, 20), "oasis": (200, 0)}.get(name, (0, 0))


def test_without_config_the_demo_is_used():
    assert config_lib.DEMO_CONFIG.is_file()
    assert config_lib.load(None).to_dict() == config_lib.load(
        str(config_lib.DEMO_CONFIG)).to_dict()
    assert config_lib.load(None).data.name == "synthetic"


def test_unknown_config_key_is_named_and_exits_non_zero():
    result = run_cli("--config=configs/ixi.py", "--config.train.epoch=3")
    assert result.returncode == cli.EXIT_USAGE
    assert "unknown config key in --config.train.epoch" in result.stderr
    assert 'did you mean "epochs"' in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_without_config_flag_uses_the_demo_and_fails_cleanly():
    result = run_cli("--config.trian.epochs=3")
    assert result.returncode == cli.EXIT_USAGE
    assert "--config.trian.epochs" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_and_bad_value_exit_non_zero():
    result = run_cli("--config=configs/nope.py")
    assert result.returncode == cli.EXIT_USAGE
    assert "config file 'configs/nope.py' not found" in result.stderr
    result = run_cli("--config=configs/ixi.py", "--config.train.epochs=many")
    assert result.returncode == cli.EXIT_USAGE
    assert "--config.train.epochs=many" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_root_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    result = run_cli("--config=configs/ixi.py", f"--config.data.root={missing}",
                     f"--workdir={tmp_path / 'work'}")
    assert result.returncode == cli.EXIT_FAILURE
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.train.mode=foo", "train.mode='foo'"),
    ("--config.model.name=resnet", "resnet"),
    ("--config.train.epochs=0", "train.epochs=0"),
    ("--config.ofg.optimizer=adamw", "ofg.optimizer='adamw'"),
])
def test_invalid_config_values_exit_2_before_anything_is_written(tmp_path, override,
                                                                 message):
    workdir = tmp_path / "work"
    result = run_cli("--config=configs/demo.py", override, f"--workdir={workdir}")
    assert result.returncode == cli.EXIT_USAGE
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


# The command line with ``loop.train_and_evaluate`` replaced by a stand-in that
# records its arguments or fails: checks the wiring without training.
FAKE_TRAIN = """
import json, os
from ofg_jax import main
from ofg_jax.training import loop

def fake(config, workdir, **options):
    if config.train.mode == "unsupervised":
        raise loop.NonFiniteLossError("non-finite training loss at step 3")
    with open(os.environ["RECORD"], "w") as f:
        json.dump({"workdir": workdir, "epochs": config.train.epochs,
                   "data": config.data.name}, f)

loop.train_and_evaluate = fake
main.run()
"""


def run_fake_cli(*args, cwd, record=""):
    return subprocess.run(
        [sys.executable, "-c", FAKE_TRAIN, *args], cwd=cwd, capture_output=True,
        text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "RECORD": str(record)})


def test_flags_reach_training_and_workdir_defaults_to_the_config_name(tmp_path):
    record = tmp_path / "args.json"
    result = run_fake_cli("--config.train.epochs=7", cwd=tmp_path, record=record)
    assert result.returncode == 0, result.stderr
    assert json.loads(record.read_text()) == {
        "workdir": os.path.join("workdir", "demo"), "epochs": 7, "data": "synthetic"}

    result = run_fake_cli(f"--config={REPO / 'configs' / 'lpba.py'}",
                          f"--workdir={tmp_path / 'w'}", cwd=tmp_path, record=record)
    assert result.returncode == 0, result.stderr
    assert json.loads(record.read_text()) == {
        "workdir": str(tmp_path / "w"), "epochs": 500, "data": "lpba"}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_shipped_config_by_name_is_the_file_of_that_name(name):
    by_name = config_lib.load(name, ["train.epochs=3", "model.name=transmorph"])
    by_path = config_lib.load(str(REPO / "configs" / f"{name}.py"),
                              ["train.epochs=3", "model.name=transmorph"])
    assert by_name.to_dict() == by_path.to_dict()  # config.json and resume see the same
    assert by_name.train.epochs == 3 and by_name.model.window_size


def test_config_by_name_works_from_any_folder(tmp_path):
    record = tmp_path / "args.json"
    result = run_fake_cli("--config=lpba", "--config.train.epochs=9", cwd=tmp_path,
                          record=record)
    assert result.returncode == 0, result.stderr
    assert json.loads(record.read_text()) == {
        "workdir": os.path.join("workdir", "lpba"), "epochs": 9, "data": "lpba"}
    result = run_fake_cli("--config=ixx", cwd=tmp_path, record=record)
    assert result.returncode == cli.EXIT_USAGE
    assert result.stderr.count("\n") == 1
    assert ("config file 'ixx' not found" in result.stderr
            and "abdomen_ct, demo, ixi, lpba, oasis" in result.stderr)


def test_diverging_run_exits_non_zero_with_one_message(tmp_path):
    result = run_fake_cli("--config.train.mode=unsupervised", cwd=tmp_path)
    assert result.returncode == cli.EXIT_FAILURE
    assert result.stderr.strip() == "error: non-finite training loss at step 3"
    result = run_fake_cli("--config.train.mode=unsupervised", "--traceback",
                          cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "NonFiniteLossError" in result.stderr
