"""``python -m ofg_jax.evaluate``: a trained run on its held-out pairs, with
Learn2Reg's metrics, on a small IXI-layout folder written here."""

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from ofg_jax.configs import ixi
from ofg_jax import cli
from ofg_jax.settings import config as config_lib
from ofg_jax import evaluate
from ofg_jax.training import loop
from ofg_jax.data import ixi as ixi_data
from tests import data_fixtures
from tests.compilation_cache import persistent_compilation_cache
from tests.references import np_dice, np_sdlogj

SIZE = (16, 16, 16)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step IXI run whose data has a Test/ folder: (workdir, data root)."""
    root = tmp_path_factory.mktemp("ixi")
    data_fixtures.write_ixi(str(root), np.random.default_rng(0), num_train=2,
                            num_val=2, num_test=3, shape=SIZE)
    config = config_lib.with_overrides(config_lib.complete(ixi.get_config()), {
        "data.root": str(root), "data.num_train": 0, "data.num_val": 0,
        "train.max_steps": 1, "train.figures": False, "ofg.steps": 2,
        "train.learning_rate": 0.01,  # One large step: a visible displacement.
        "model.enc_features": (4, 8), "model.dec_features": (8, 8),
        "model.final_features": (4,), "model.conv_impl": "xla"})
    workdir = str(tmp_path_factory.mktemp("run"))
    with persistent_compilation_cache(str(tmp_path_factory.mktemp("xla"))):
        loop.train_and_evaluate(config, workdir)
    return workdir, root


def run_main(capsys, *args):
    status = evaluate.main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_writes_the_table_the_fields_and_the_box_plot(run, capsys):
    workdir, root = run
    status, out, err = run_main(capsys, f"--workdir={workdir}", "--save-fields",
                                "--checkpoint=latest")
    assert status == 0, err
    folder = os.path.join(workdir, "eval_test_step1")
    with open(os.path.join(folder, "pairs.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    labels = ixi_data.LABELS
    assert list(rows[0]) == (list(evaluate.COLUMNS)
                             + [f"dice_{label}" for label in labels])
    assert [row["name"] for row in rows] == ["subject_200", "subject_201", "subject_202"]
    atlas = data_fixtures.read_ixi_pair(str(root), "atlas.pkl")
    for row in rows:
        subject = data_fixtures.read_ixi_pair(str(root), f"Test/{row['name']}.pkl")
        disp = nib.load(os.path.join(folder, "fields",
                                     f"disp_{row['name']}.nii.gz")).get_fdata()
        assert disp.shape == SIZE + (3,)
        # Independent checks: identity Dice of the atlas -> subject labels, and
        # Learn2Reg's SDlogJ of the saved field.
        identity = np_dice(atlas[1], subject[1], labels).mean()
        assert float(row["identity_dice"]) == pytest.approx(identity, abs=1e-6)
        assert np_sdlogj(disp) > 1e-3
        assert float(row["sdlogj"]) == pytest.approx(np_sdlogj(disp), rel=1e-3)
        dice = [float(row[f"dice_{label}"]) for label in labels]
        assert float(row["dice"]) == pytest.approx(np.mean(dice), abs=1e-6)
        assert np.isfinite(float(row["hd95"])) and float(row["hd95"]) >= 0
        assert float(row["seconds"]) > 0
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["split"], summary["step"], summary["pairs"]) == ("test", 1, 3)
    assert summary["dice"]["mean"] == pytest.approx(
        np.mean([float(r["dice"]) for r in rows]), abs=1e-9)
    with open(os.path.join(folder, "dice_per_structure.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "test split, 3 pairs" in out and "hd95" in out


def test_the_validation_split_scores_as_training_did(run, capsys, tmp_path):
    workdir, _ = run
    status, _, err = run_main(capsys, f"--workdir={workdir}", "--split=val",
                              "--checkpoint=latest", f"--out={tmp_path / 'val'}")
    assert status == 0, err
    with open(os.path.join(workdir, "summary.json")) as f:
        final = json.load(f)["final"]
    with open(tmp_path / "val" / "summary.json") as f:
        summary = json.load(f)
    assert summary["dice"]["mean"] == pytest.approx(final["dice"], rel=1e-6)
    assert summary["sdlogj"]["mean"] == pytest.approx(final["sdlogj"], rel=1e-5)


def test_errors_are_one_line_and_leave_nothing_behind(run, capsys, tmp_path):
    workdir, root = run
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), no_checkpoint)
    status, _, err = run_main(capsys, f"--workdir={no_checkpoint}")
    assert status == cli.EXIT_FAILURE and "no checkpoint" in err
    assert err.startswith("error: ") and err.count("\n") == 1

    a_file = tmp_path / "file"
    a_file.write_text("")
    status, _, err = run_main(capsys, f"--workdir={workdir}", f"--out={a_file}")
    assert status == cli.EXIT_FAILURE and "is a file" in err

    status, _, err = run_main(capsys, f"--workdir={workdir}", "--checkpoint=soon")
    assert status == cli.EXIT_USAGE and "--checkpoint" in err

    # A test subject off the grid: found while registering, nothing is kept.
    data_fixtures.write_pkl(os.path.join(root, "Test", "subject_203.pkl"),
                            np.zeros((16, 16, 15), np.float32),
                            np.zeros((16, 16, 15), np.float32))
    out = tmp_path / "out"
    status, _, err = run_main(capsys, f"--workdir={workdir}", "--save-fields",
                              f"--out={out}")
    assert status == cli.EXIT_FAILURE and "subject_203.pkl" in err and "(16, 16, 15)" in err
    assert not out.exists()

    shutil.rmtree(os.path.join(root, "Test"))  # No test split at all.
    status, _, err = run_main(capsys, f"--workdir={workdir}", f"--out={out}")
    assert status == cli.EXIT_FAILURE and "IXI Test" in err and "not found" in err
    assert err.count("\n") == 1 and not out.exists()
