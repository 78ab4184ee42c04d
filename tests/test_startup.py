"""``ofg-register`` checks its command line and files before it imports JAX.

Each case runs the command in a fresh Python process, which then says whether
``jax`` was imported: a bad flag, a missing or unreadable file, a bad pairs CSV
or workdir gets its one ``error:`` line and exit status with JAX never
imported; optimisation alone then imports neither orbax, flax nor matplotlib. The
package itself loads its primitives on first use. (How long the start-up takes is
measured, not asserted: docs/registration_without_network.md.)
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ofg_jax import cli
from tests import registration_fixtures as fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
# ``register.main(argv)``, then which of jax, orbax, flax and matplotlib were imported,
# on the last line.
WRAPPER = ("import sys; from ofg_jax import register; "
           "status = register.main(['ofg-register'] + sys.argv[1:]); "
           "print('imported:', *[name for name in ('jax', 'orbax', 'flax', 'matplotlib') "
           "if name in sys.modules]); sys.exit(status)")


def python(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files of every kind the checks meet: a pair, a 4-D series, a text file, a
    file where the output folder should be, a folder that is not a workdir and
    pairs CSVs."""
    folder = tmp_path_factory.mktemp("inputs")
    affine = fixtures.oblique_affine()
    rng = np.random.default_rng(0)
    write = lambda name, shape, dtype=np.float32: fixtures.write_nifti(
        folder / name, rng.random(shape), affine, dtype)
    paths = {"moving": write("moving.nii.gz", fixtures.SIZE),
             "fixed": write("fixed.nii.gz", fixtures.SIZE),
             "four_d": write("4d.nii.gz", fixtures.SIZE + (2,)),
             "text": folder / "text.nii.gz", "out_file": folder / "out_file",
             "not_workdir": folder / "not_workdir", "missing": folder / "missing.nii.gz",
             "bad_csv": folder / "bad.csv", "csv_missing_file": folder / "pairs.csv"}
    paths["text"].write_text("not a NIfTI file")
    paths["out_file"].write_text("")
    paths["not_workdir"].mkdir()
    paths["bad_csv"].write_text("moving,image\na,b\n")
    paths["csv_missing_file"].write_text("moving,fixed\nmoving.nii.gz,absent.nii.gz\n")
    return paths


# (arguments, exit status, a piece of the error line); {name} are paths of `inputs`,
# {out} a fresh output folder.
CASES = {
    "missing moving": (["--moving={missing}", "--fixed={fixed}", "--out={out}"],
                       cli.EXIT_FAILURE, "moving image {missing} not found"),
    "not NIfTI": (["--moving={text}", "--fixed={fixed}", "--out={out}"],
                  cli.EXIT_FAILURE, "could not read moving image {text}"),
    "4-D": (["--moving={moving}", "--fixed={four_d}", "--out={out}"],
            cli.EXIT_FAILURE, "2 volumes"),
    "out is a file": (["--moving={moving}", "--fixed={fixed}", "--out={out_file}"],
                      cli.EXIT_FAILURE, "output folder {out_file} is a file"),
    "unknown flag": (["--moving={moving}", "--fixed={fixed}", "--out={out}", "--nope"],
                     cli.EXIT_USAGE, "nope"),
    "no fixed": (["--moving={moving}", "--out={out}"], cli.EXIT_USAGE,
                 "--moving and --fixed (or --pairs) are required"),
    "bad levels": (["--moving={moving}", "--fixed={fixed}", "--out={out}",
                    "--levels=2,3", "--steps=1,1"], cli.EXIT_USAGE,
                   "each a multiple of the next"),
    "network flag": (["--moving={moving}", "--fixed={fixed}", "--out={out}",
                      "--refine-steps=2"], cli.EXIT_USAGE,
                     "--refine-steps: only with a trained network"),
    "missing workdir": (["--workdir={missing}", "--moving={moving}", "--fixed={fixed}",
                         "--out={out}"], cli.EXIT_FAILURE, "workdir {missing} not found"),
    "not a workdir": (["--workdir={not_workdir}", "--moving={moving}",
                       "--fixed={fixed}", "--out={out}"], cli.EXIT_FAILURE,
                      "config.json not found"),
    "bad pairs CSV": (["--pairs={bad_csv}", "--out={out}"], cli.EXIT_FAILURE,
                      "expected moving,fixed"),
    "pairs CSV names a missing file": (["--pairs={csv_missing_file}", "--out={out}"],
                                       cli.EXIT_FAILURE, "absent.nii.gz not found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_come_before_jax_is_imported(case, inputs, tmp_path):
    args, status, piece = CASES[case]
    names = {**inputs, "out": tmp_path / "out"}
    proc = python("-c", WRAPPER, *[arg.format(**names) for arg in args])
    assert proc.returncode == status, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert piece.format(**names) in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "imported:", proc.stdout
    assert not (tmp_path / "out").exists()


def test_optimisation_alone_imports_neither_orbax_flax_nor_matplotlib(inputs, tmp_path):
    """The checks pass, JAX is imported and the pair registered; the trained
    network's side (orbax), the networks (flax) and the figures (matplotlib)
    are not imported."""
    proc = python("-c", WRAPPER, f"--moving={inputs['moving']}",
                  f"--fixed={inputs['fixed']}", f"--out={tmp_path / 'out'}",
                  "--levels=1", "--steps=2", "--nocompilation-cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "imported: jax", proc.stdout
    assert (tmp_path / "out" / "warped.nii.gz").exists()


@pytest.mark.parametrize("args, status", [
    (["--moving=missing.nii.gz", "--fixed=x", "--out=o"], cli.EXIT_FAILURE),
    (["--help"], 0),
], ids=["missing file", "help"])
def test_the_module_entry_point_imports_no_jax(args, status, tmp_path):
    """``python -X importtime -m ofg_jax.register``: no import of jax is listed."""
    proc = python("-X", "importtime", "-m", "ofg_jax.register", *args, cwd=tmp_path)
    assert proc.returncode == status, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "ofg_jax.cli" in imported and "ofg_jax.registration.pairs" in imported  # register's
    assert not [name for name in imported if name.split(".")[0] in (
        "jax", "jaxlib", "flax", "optax", "orbax", "matplotlib")], imported
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == (["error: moving image missing.nii.gz not found"] if status
                      else []), proc.stderr[-2000:]


def test_the_package_loads_its_primitives_on_first_use():
    """``import ofg_jax`` imports no JAX; the public names are the functions, also
    once their submodules are imported (``ofg_jax.warp`` is ``warp.warp``)."""
    code = """if True:
        import sys, types
        import ofg_jax
        print('jax' in sys.modules)
        import ofg_jax.warp, ofg_jax.refine
        from ofg_jax import ncc, refine, warp
        import ofg_jax.ncc as ncc_again
        print(warp is sys.modules['ofg_jax.warp'].warp, refine is ofg_jax.refine,
              ncc is ncc_again is sys.modules['ofg_jax.ncc'].ncc)
        print(all(callable(getattr(ofg_jax, name))
                  and not isinstance(getattr(ofg_jax, name), types.ModuleType)
                  for name in ofg_jax.__all__), 'jax' in sys.modules)
        print(set(ofg_jax.__all__) <= set(dir(ofg_jax)), hasattr(ofg_jax, 'absent'))
    """
    proc = python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True", "True", "True", "True",
                                   "True", "False"], proc.stdout
