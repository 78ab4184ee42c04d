"""Tests of ``ofg_jax.plot``: the figures of a training workdir and of a pair."""

import os
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from ofg_jax import cli
from ofg_jax.registration import figures
from ofg_jax import plot

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAINING_FIGURES = ["curves.png", "slices.png", "grid.png", "jacobian.png",
                    "labels.png"]


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir


def check_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, path
    assert image.std() > 0, f"{path} is blank"


def test_training_figures_are_valid_pngs(workdir, tmp_path):
    paths = plot.write_training_figures(workdir, str(tmp_path / "figures"))
    assert [os.path.basename(p) for p in paths] == TRAINING_FIGURES
    for path in paths:
        assert os.path.dirname(path) == str(tmp_path / "figures")
        check_png(path)


def test_command_line_writes_into_workdir_figures_by_default(workdir, capsys):
    assert plot.main(["plot", f"--workdir={workdir}"]) == 0
    out_dir = os.path.join(workdir, "figures")
    assert sorted(os.listdir(out_dir)) == sorted(TRAINING_FIGURES)
    assert capsys.readouterr().out.startswith(
        f"wrote {os.path.join(out_dir, 'curves.png')}")


def test_command_line_errors_name_the_problem(tmp_path, capsys):
    assert plot.main(["plot", f"--workdir={tmp_path}"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "config.json") in err
    assert err.count("\n") == 1
    result = subprocess.run([sys.executable, "-m", "ofg_jax.plot"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == cli.EXIT_USAGE
    assert result.stderr == "error: --workdir is required\n"


def test_pair_figures_without_segmentations(tmp_path):
    rng = np.random.default_rng(0)
    shape = (8, 10, 12)
    fixed, moving = rng.random(shape), rng.random(shape)
    disp = 0.5 * rng.standard_normal(shape + (3,))
    result = {"warped": moving, "disp": disp, "jacobian": 1 + rng.standard_normal(shape)}
    paths = figures.write_pair_figures(str(tmp_path), fixed, moving, result)
    assert [os.path.basename(p) for p in paths] == ["slices.png", "grid.png",
                                                    "jacobian.png"]
    for path in paths:
        check_png(path)


def test_central_slices_and_label_outlines():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    assert figures.central_slice(volume, 0).shape == (5, 6)
    np.testing.assert_array_equal(figures.central_slice(volume, 1), volume[:, 2])
    field = np.zeros((4, 5, 6, 3))
    assert figures.central_slice(field, 2).shape == (4, 5, 3)
    labels = np.zeros((5, 5), int)
    labels[1:3, 1:4] = 7
    outline = figures.label_outlines(labels)
    # Cells whose right (axis 0) or upper (axis 1) neighbour differs.
    expected = np.zeros((5, 5), bool)
    expected[0, 1:4] = expected[2, 1:4] = True  # Row before the block, last row.
    expected[1:3, 0] = expected[1:3, 3] = True  # Column before it, last column.
    np.testing.assert_array_equal(outline, expected)
