"""The installed package works outside the repository.

The wheel is built from the checkout and installed into a fresh virtual
environment, which reuses this environment's dependencies (so nothing is
downloaded but the build backend); then, from a folder with no clone, the
demo trains by config name through both entry points, the result registers two
scans and carries an image over, and the primitives import.
"""

import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

from tests import registration_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
# The demo at toy size (the registration tests' tiny network and grid).
TINY = ["--config=demo", "--config.data.img_size=(16,16,32)", "--config.data.num_train=2",
        "--config.data.num_val=1", "--config.data.val_subjects=1",
        "--config.model.enc_features=(4,8)", "--config.model.dec_features=(8,8)",
        "--config.model.final_features=(4,)", "--config.ofg.steps=2",
        "--config.train.figures=False", "--config.train.log_every=1"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """The ``bin/`` folder of a fresh virtual environment with the wheel installed."""
    root = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(root / "dist"), str(REPO)], check=True,
                   timeout=600)
    wheel, = (root / "dist").glob("ofg_jax-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    # The dependencies of this environment, after the new environment's own packages.
    (pathlib.Path(site.stdout.strip()) / "dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--quiet", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=600)
    return venv / "bin"


def run(command, cwd):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=900)


def test_the_wheel_carries_the_configs_and_the_primitives(installed, tmp_path):
    proc = run([str(installed / "python"), "-c",
                "import ofg_jax; from ofg_jax import ncc, refine, warp; "
                "from ofg_jax.settings import config; "
                "print(ofg_jax.__file__); print(config.config_path('ixi'))"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    package, ixi = proc.stdout.split()
    assert "site-packages" in package and str(REPO) not in package
    assert ixi.endswith(os.path.join("site-packages", "ofg_jax", "configs", "ixi.py"))
    flag = {"ofg-train": "--config", "ofg-evaluate": "--split", "ofg-register": "--moving",
            "ofg-apply": "--registration", "ofg-plot": "--workdir"}
    for command, expected in flag.items():
        proc = run([str(installed / command), "--help"], tmp_path)
        assert proc.returncode == 0, (command, proc.stderr)
        assert expected in proc.stdout and "traceback" in proc.stdout, command


def test_train_register_and_apply_from_another_folder(installed, tmp_path):
    proc = run([str(installed / "python"), "-m", "ofg_jax.main", "--workdir=wd",
                "--config.train.max_steps=1", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The console script resumes the same run (the same config, by name).
    proc = run([str(installed / "ofg-train"), "--workdir=wd", "--config.train.max_steps=2",
                *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step 1" in proc.stderr
    assert sorted(os.listdir(tmp_path / "wd" / "checkpoints"))[-1] == "2"

    scans = registration_fixtures.write_scans(str(tmp_path / "scans"), seed=3)
    proc = run([str(installed / "ofg-register"), "--workdir=wd", f"--moving={scans['moving']}",
                f"--fixed={scans['fixed']}", "--out=out"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "transform.nii.gz").is_file()
    proc = run([str(installed / "ofg-apply"), "--registration=out",
                f"--image={scans['moving_seg']}", "--interpolation=nearest",
                "--out=out/seg.nii.gz"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "seg.nii.gz").is_file()
