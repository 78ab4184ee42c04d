"""Configs: every documented key works from the command line, the network's
options are config keys, and a run records what it trained."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

from ofg_jax.settings import config as config_lib
from ofg_jax import models

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = {name: str(REPO / "configs" / f"{name}.py")
           for name in ("demo", "ixi", "oasis", "lpba", "abdomen_ct")}
# Sample values for keys whose default is None.
SAMPLES = {"train.reg_weight": "0.5", "data.img_size": "(32,32,32)",
           "data.spacing": "(1.0,1.0,1.0)", "data.orientation": "RAS",
           "model.dtype": "bfloat16", "train.init_from": "workdir/imported"}


def documented_keys(path, first_column_prefix=""):
    """The backquoted keys in the first column of the markdown tables of ``path``."""
    keys = []
    for line in pathlib.Path(path).read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 3 and cells[1].startswith("`"):
            for key in re.findall(r"`([\w.<>]+)`", cells[1]):
                keys.append((first_column_prefix + key, cells[2]))
    return keys


def get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def value_text(config, key):
    """A command-line value for ``key``: its current value, or a sample."""
    value = get(config, key)
    return SAMPLES[key] if value is None else str(value)


def check_override(config_file, key, text):
    """``--config.KEY=TEXT`` loads, and sets ``key`` to the value ``text`` spells."""
    value = get(config_lib.load(config_file, [f"{key}={text}"]), key)
    assert value == (text if isinstance(value, str) else ast.literal_eval(text)), key


def test_every_key_of_the_readme_tables_is_accepted_from_the_command_line():
    keys = [key for key, _ in documented_keys(REPO / "docs" / "training.md")
            if re.fullmatch(r"(seed|(model|train|ofg|checkpoint|data)\.[\w<>]+)", key)]
    assert len(keys) > 25  # The configs table was found.
    demo = config_lib.load(CONFIGS["demo"])
    for key in keys:
        if key == "model.<option>":
            continue
        check_override(CONFIGS["demo"], key, value_text(demo, key))


def test_every_option_of_every_network_is_a_model_key():
    for name in models.NAMES:
        loaded = config_lib.load(CONFIGS["demo"], [f"model.name={name}"])
        assert set(loaded.model) - {"name"} == set(models.options(name))
        for option, default in models.options(name).items():
            text = SAMPLES[f"model.{option}"] if default is None else str(default)
            overridden = config_lib.load(CONFIGS["demo"], [f"model.name={name}",
                                                           f"model.{option}={text}"])
            assert str(overridden.model[option]) == text, (name, option)
    transmorph = config_lib.load(CONFIGS["demo"], ["model.name=transmorph",
                                                   "model.window_size=(2,2,2)"])
    assert transmorph.model.window_size == (2, 2, 2)
    assert "enc_features" not in transmorph.model  # VoxelMorph's options are gone.


def test_a_misspelt_option_names_the_valid_ones():
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.load(CONFIGS["demo"], ["model.name=transmorph",
                                          "model.windw_size=(2,2,2)"])
    message = str(error.value)
    assert "model.windw_size" in message and "window_size" in message
    assert "embed_dim" in message  # The valid options of TransMorph are listed.


def test_every_data_key_of_the_data_readme_is_accepted():
    rows = documented_keys(REPO / "docs" / "datasets.md", "data.")
    assert len(rows) > 12
    for key, datasets in rows:
        names = ["demo"] if datasets == "synthetic" else (
            ["abdomen_ct"] if datasets == "abdomen_ct" else (
                ["lpba"] if datasets == "lpba" else (
                    ["ixi"] if datasets == "all but synthetic" else ["demo", "ixi"])))
        for name in names:
            config = config_lib.load(CONFIGS[name])
            check_override(CONFIGS[name], key, value_text(config, key))


def test_dataset_defaults_of_a_network_and_the_record():
    lpba = config_lib.load(CONFIGS["lpba"], ["model.name=transmorph"])
    assert lpba.model.window_size == (5, 6, 5)  # The reference's for LPBA40's grid.
    model = config_lib.build_model(lpba, (160, 192, 160))
    assert model.window_size == (5, 6, 5)
    record = config_lib.record(config_lib.complete(config_lib.load(CONFIGS["demo"])),
                               (32, 32, 32))
    assert record["model"]["enc_features"] == [8, 32, 32, 32]  # Resolved options.
    assert record["data"]["img_size"] == [32, 32, 32]
    rebuilt = config_lib.build_model(config_lib.complete(config_lib.load(
        CONFIGS["demo"])), (32, 32, 32))
    assert rebuilt.enc_features == (8, 32, 32, 32)


@pytest.mark.parametrize("options", [
    ["--config.model.name=transmorph", "--config.model.window_size=(2,2,2)",
     "--config.model.embed_dim=12", "--config.model.depths=(1,1,1,1)",
     "--config.model.num_heads=(2,2,2,2)", "--config.model.reg_head_chan=4"],
    ["--config.model.name=vitvnet", "--config.model.hidden_size=24",
     "--config.model.num_layers=1", "--config.model.num_heads=2",
     "--config.model.mlp_dim=24", "--config.model.conv_first_channel=8",
     "--config.model.encoder_channels=(4,4,4)",
     "--config.model.decoder_channels=(8,8,4,4,4)"],
], ids=["transmorph", "vitvnet"])
def test_transformers_train_from_the_command_line_on_the_demo_grid(tmp_path, options):
    # The demo's 32^3 grid: TransMorph's last stage (1^3) is padded to its window.
    result = subprocess.run(
        [sys.executable, "-m", "ofg_jax.main", "--config=configs/demo.py",
         f"--workdir={tmp_path}", "--config.train.max_steps=1",
         "--config.data.num_train=2", "--config.data.num_val=1",
         "--config.data.val_subjects=1", "--config.train.figures=false",
         "--config.ofg.steps=1", *options],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final" in result.stdout and os.path.isdir(tmp_path / "checkpoints" / "1")
    recorded = config_lib.from_json(str(tmp_path / "config.json"))
    assert recorded.model.name == options[0].split("=")[1]
