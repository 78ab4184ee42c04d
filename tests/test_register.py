"""Tests of ``ofg_jax.register``: NIfTI files registered with a trained workdir, or
with none (optimisation alone)."""

import contextlib
import csv
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from ofg_jax import cli
from ofg_jax.registration import geometry
from ofg_jax.registration import network as network_lib
from ofg_jax import nifti
from ofg_jax import register
from ofg_jax.registration import pairs as pairs_lib
from ofg_jax.registration import scans as scans_lib
from ofg_jax.registration import transforms
from ofg_jax import registration_energy
from ofg_jax import warp
from tests import registration_fixtures as fixtures
from tests.references import np_dice, np_jacobian_determinant, np_warp

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """The persistent compilation cache of in-process runs in a fresh folder, never
    in the user's ``~/.cache``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache_home"))
    return tmp_path / "cache_home"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return fixtures.write_pair(tmp_path_factory.mktemp("pair"))


def run_main(capsys, *args):
    """``python -m ofg_jax.register ARGS`` in this process: (status, stdout, stderr)."""
    status = register.main(["register", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def assert_apply_reproduces_warped_seg(out, moving_seg, path):
    """``apply`` of the registration in ``out`` to the moving labels writes the
    voxels of ``out/warped_seg.nii.gz``."""
    from ofg_jax import apply
    status = apply.main(["apply", f"--registration={out}", "--interpolation=nearest",
                         f"--image={moving_seg}", f"--out={path}"])
    assert status == 0
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj),
                                  np.asarray(nib.load(out / "warped_seg.nii.gz").dataobj))


@pytest.fixture(scope="module")
def registered(workdir, files, tmp_path_factory):
    """One CLI run with segmentations and figures, with the trained network (the
    default checkpoint may be the untrained one): its output folder and stdout."""
    out_dir = tmp_path_factory.mktemp("out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = register.main([
            "register", f"--workdir={workdir}", f"--moving={files['moving']}",
            f"--fixed={files['fixed']}", f"--moving-seg={files['moving_seg']}",
            f"--fixed-seg={files['fixed_seg']}", f"--out={out_dir}", "--figures",
            f"--checkpoint={fixtures.TRAIN_STEPS}"])
    assert status == 0
    return str(out_dir), stdout.getvalue()


def sitk_resample(moving, fixed, registration_dir):
    """SimpleITK's resampling of ``moving`` onto ``fixed`` through the saved
    transform (``affine.mat`` after ``transform.nii.gz``, as ANTs composes them)."""
    sitk = pytest.importorskip("SimpleITK")
    transforms = [sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(
        os.path.join(registration_dir, "transform.nii.gz")), sitk.sitkVectorFloat64))]
    if os.path.exists(os.path.join(registration_dir, "affine.mat")):
        transforms.insert(0, sitk.ReadTransform(os.path.join(registration_dir,
                                                             "affine.mat")))
    out = sitk.Resample(sitk.ReadImage(moving, sitk.sitkFloat32), sitk.ReadImage(fixed),
                        sitk.CompositeTransform(transforms), sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def printed(stdout, key):
    return float(re.search(rf"^{key}: (\S+)", stdout, re.M).group(1))


def test_outputs_carry_the_fixed_grid_and_match_independent_checks(registered, files):
    out_dir, stdout = registered
    fixed = nib.load(files["fixed"])
    outputs = {key: nib.load(os.path.join(out_dir, name))
               for key, name in transforms.OUTPUT_FILES.items()}
    expected_shape = {"disp": fixtures.SIZE + (3,), "transform": fixtures.SIZE + (1, 3)}
    for key, image in outputs.items():
        assert image.shape == expected_shape.get(key, fixtures.SIZE), key
        np.testing.assert_allclose(image.affine, fixed.affine, atol=1e-6)
        for field in ("qform_code", "sform_code", "descrip", "xyzt_units"):
            assert image.header[field] == fixed.header[field], (key, field)
        np.testing.assert_allclose(image.header.get_zooms()[:3],
                                   fixed.header.get_zooms()[:3])
    assert outputs["warped"].get_data_dtype() == np.float32  # Not the fixed int16.
    assert np.issubdtype(outputs["warped_seg"].get_data_dtype(), np.integer)

    moving = nib.load(files["moving"]).get_fdata(dtype=np.float32)
    disp = outputs["disp"].get_fdata(dtype=np.float32)
    assert np.abs(disp).max() > 0
    np.testing.assert_allclose(outputs["warped"].get_fdata(),
                               np.asarray(warp(moving, disp)), atol=1e-5)
    moving_seg = np.asarray(nib.load(files["moving_seg"]).dataobj).astype(np.int32)
    warped_seg = np.asarray(outputs["warped_seg"].dataobj)
    np.testing.assert_array_equal(warped_seg, np.asarray(warp(moving_seg, disp,
                                                              order=0)))
    jacobian = np_jacobian_determinant(disp)
    np.testing.assert_allclose(outputs["jacobian"].get_fdata(), jacobian, atol=1e-4)
    # The ITK field holds the same mapping: SimpleITK reproduces warped.nii.gz.
    np.testing.assert_allclose(sitk_resample(files["moving"], files["fixed"], out_dir),
                               outputs["warped"].get_fdata(), atol=1e-5)

    fixed_seg = np.asarray(nib.load(files["fixed_seg"]).dataobj)
    labels = [l for l in np.unique(fixed_seg) if l != 0]
    assert printed(stdout, "dice") == pytest.approx(
        np.mean(np_dice(warped_seg, fixed_seg, labels)), abs=2e-6)
    assert f"over {len(labels)} labels" in stdout
    assert printed(stdout, "non_pos_jacobian_pct") == pytest.approx(
        100 * np.mean(jacobian <= 0), abs=1e-6)
    for name in ("slices.png", "grid.png", "jacobian.png", "labels.png"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0


def test_refinement_changes_the_field_and_lowers_the_energy(
        registered, workdir, files, tmp_path, capsys):
    status, stdout, stderr = run_main(
        capsys, f"--workdir={workdir}", f"--moving={files['moving']}",
        f"--fixed={files['fixed']}", "--refine-steps=5", f"--out={tmp_path}",
        f"--checkpoint={fixtures.TRAIN_STEPS}")
    assert status == 0, stderr
    read = lambda folder: nib.load(os.path.join(folder, "disp.nii.gz")).get_fdata(
        dtype=np.float32)
    network, refined = read(registered[0]), read(tmp_path)
    assert np.abs(refined - network).max() > 1e-3
    ofg = network_lib.read_config(workdir).ofg
    moving = nib.load(files["moving"]).get_fdata(dtype=np.float32)
    fixed = nib.load(files["fixed"]).get_fdata(dtype=np.float32)
    energy = lambda disp: float(registration_energy(
        moving, fixed, disp, reg_weight=ofg.reg_weight, similarity=ofg.similarity))
    assert energy(refined) < energy(network)
    match = re.search(r"energy: (\S+) \(network\) -> (\S+) \(refined\)", stdout)
    assert float(match.group(1)) == pytest.approx(energy(network), rel=1e-4)
    assert float(match.group(2)) == pytest.approx(energy(refined), rel=1e-4)


def test_default_checkpoint_is_the_best_on_disk_else_the_latest(
        registered, workdir, files, tmp_path, capsys):
    steps = sorted(int(name) for name in os.listdir(os.path.join(workdir,
                                                                 "checkpoints")))
    with open(os.path.join(workdir, "summary.json")) as f:
        best = json.load(f)["best"]["step"]
    expected = (f"step {best} of {os.path.join(workdir, 'checkpoints')} (best "
                "validation Dice)" if best in steps else
                f"step {steps[-1]} of {os.path.join(workdir, 'checkpoints')} (latest)")
    status, stdout, stderr = run_main(
        capsys, f"--workdir={workdir}", f"--moving={files['moving']}",
        f"--fixed={files['fixed']}", f"--out={tmp_path}")
    assert status == 0, stderr
    assert f"checkpoint: {expected}\n" in stdout
    assert f"checkpoint: step {fixtures.TRAIN_STEPS} of" in registered[1]
    assert "(as requested)" in registered[1]

    status, _, stderr = run_main(
        capsys, f"--workdir={workdir}", f"--moving={files['moving']}",
        f"--fixed={files['fixed']}", "--checkpoint=7", f"--out={tmp_path}")
    assert status == cli.EXIT_FAILURE
    assert f"no checkpoint 7 in {os.path.join(workdir, 'checkpoints')}" in stderr
    assert f"available steps: {steps}" in stderr


def test_batch_mode_writes_one_folder_and_row_per_pair(workdir, files, tmp_path,
                                                       capsys):
    folder = os.path.dirname(files["moving"])
    pairs = tmp_path / "pairs.csv"
    # Paths relative to the CSV's folder, and absolute ones; segmentations optional.
    relative = os.path.relpath(folder, tmp_path)
    pairs.write_text(
        "moving,fixed,moving_seg,fixed_seg,name\n"
        f"{relative}/moving.nii.gz,{relative}/fixed.nii.gz,"
        f"{relative}/moving_seg.nii.gz,{relative}/fixed_seg.nii.gz,with_labels\n"
        f"{files['fixed']},{files['moving']},,,\n")
    status, stdout, stderr = run_main(capsys, f"--workdir={workdir}",
                                      f"--pairs={pairs}", f"--out={tmp_path / 'out'}")
    assert status == 0, stderr
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["with_labels", "fixed_to_moving"]
    assert 0 <= float(rows[0]["dice"]) <= 1 and rows[1]["dice"] == ""
    for row in rows:
        assert 0 <= float(row["non_pos_jacobian_pct"]) <= 100
    assert sorted(os.listdir(tmp_path / "out" / "with_labels")) == sorted(
        transforms.OUTPUT_FILES.values())
    assert "warped_seg.nii.gz" not in os.listdir(tmp_path / "out" / "fixed_to_moving")
    assert "with_labels:\ndice:" in stdout


def test_errors_name_the_problem_and_exit_non_zero(workdir, files, tmp_path, capsys):
    affine = fixtures.oblique_affine()
    four_d = fixtures.write_nifti(tmp_path / "4d.nii.gz",
                                  np.zeros(fixtures.SIZE + (2,)), affine, np.float32)
    unreadable = tmp_path / "unreadable.nii.gz"
    unreadable.write_text("not a NIfTI file")
    nan = nib.load(files["moving"]).get_fdata()
    nan[3, 4, 5] = np.nan
    non_finite = fixtures.write_nifti(tmp_path / "nan.nii.gz", nan, affine, np.float32)
    small = fixtures.write_nifti(tmp_path / "small.nii.gz", np.zeros((16, 16, 16)),
                                 affine, np.uint8)
    shifted = fixtures.write_nifti(
        tmp_path / "shifted.nii.gz", np.asarray(nib.load(files["moving_seg"]).dataobj),
        fixtures.oblique_affine(offset=(0.0, 0.0, 0.0)), np.uint8)
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), no_checkpoint)
    missing = tmp_path / "missing.nii.gz"
    out_file = tmp_path / "out_file"
    out_file.write_text("")
    out = f"--out={tmp_path / 'out'}"
    cases = [
        # (arguments besides --workdir and --fixed, expected pieces of the message)
        ([f"--moving={missing}", out], [f"moving image {missing} not found"]),
        ([f"--moving={four_d}", out], [str(four_d), "(16, 16, 32, 2)", "2 volumes",
                                       "3D"]),
        ([f"--moving={unreadable}", out], ["could not read moving image",
                                           str(unreadable)]),
        ([f"--moving={non_finite}", out], [str(non_finite), "1 non-finite"]),
        ([f"--moving={files['moving']}", f"--moving-seg={small}", out],
         [str(small), "(16, 16, 16)", "(16, 16, 32)", "must share a grid"]),
        ([f"--moving={files['moving']}", f"--moving-seg={shifted}", out],
         [str(shifted), files["moving"], "different affines"]),
        ([f"--moving={files['moving']}", f"--out={out_file}"],
         [f"output folder {out_file} is a file"]),
    ]
    for args, pieces in cases:
        status, stdout, stderr = run_main(capsys, f"--workdir={workdir}",
                                          f"--fixed={files['fixed']}", *args)
        assert status == cli.EXIT_FAILURE, (args, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        for piece in pieces:
            assert piece in stderr, (piece, stderr)
    for work, pieces in [(tmp_path, [str(tmp_path / "config.json"), "not found"]),
                         (no_checkpoint, ["no checkpoint",
                                          str(no_checkpoint / "checkpoints")])]:
        status, stdout, stderr = run_main(
            capsys, f"--workdir={work}", f"--moving={files['moving']}",
            f"--fixed={files['fixed']}", out)
        assert status == cli.EXIT_FAILURE, stderr
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        for piece in pieces:
            assert piece in stderr, (piece, stderr)
    assert not (tmp_path / "out").exists() and out_file.read_text() == ""
    status, _, stderr = run_main(capsys, f"--workdir={workdir}", f"--out={tmp_path}",
                                 f"--moving={files['moving']}")
    assert status == cli.EXIT_USAGE
    assert "--moving and --fixed (or --pairs) are required" in stderr
    status, _, stderr = run_main(capsys, f"--workdir={workdir}", out,
                                 f"--moving={files['moving']}",
                                 f"--fixed={files['fixed']}", "--fov-center=1,2")
    assert status == cli.EXIT_USAGE and "--fov-center must be three numbers" in stderr


def test_module_entry_point_reports_errors_in_one_line(tmp_path):
    missing = tmp_path / "no_workdir"
    result = subprocess.run(
        [sys.executable, "-m", "ofg_jax.register", f"--workdir={missing}",
         "--moving=m.nii.gz", "--fixed=f.nii.gz", f"--out={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == cli.EXIT_FAILURE
    assert result.stderr == f"error: workdir {missing} not found\n"


@pytest.mark.parametrize("content, message", [
    ("moving,image\na,b\n", "expected moving,fixed"),
    ("moving,fixed\n", "lists no pairs"),
    ("moving,fixed\na.nii,b.nii\nc.nii,\n", "line 3: moving and fixed must be given"),
    ("moving,fixed,fixed_seg\na.nii,b.nii,s.nii\n", "fixed_seg needs moving_seg"),
    ("moving,fixed,name\na.nii,b.nii,x\nc.nii,d.nii,x\n", "named ['x']"),
    ("moving,fixed,name\na.nii,b.nii,../x\n", "'../x' is not a folder name"),
    ("moving,fixed\na.nii,b.nii,c.nii\n", "line 2: more cells than the columns"),
])
def test_bad_pairs_files_are_named(tmp_path, content, message):
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        pairs_lib.read_pairs_csv(str(path))


def test_scans_of_other_geometries_register_with_one_command(workdir, tmp_path,
                                                             capsys):
    """The README's example: two scans of different shapes, voxel sizes and
    orientations; the outputs lie on the fixed grid, SimpleITK applies the written
    transform to the same result, and apply carries the labels over."""
    scans = fixtures.write_scans(str(tmp_path / "scans"), seed=3)
    out = tmp_path / "out"
    status, stdout, stderr = run_main(
        capsys, f"--workdir={workdir}", f"--moving={scans['moving']}",
        f"--fixed={scans['fixed']}", f"--moving-seg={scans['moving_seg']}",
        f"--fixed-seg={scans['fixed_seg']}", f"--out={out}", "--affine", "--inverse",
        f"--checkpoint={fixtures.TRAIN_STEPS}")
    assert status == 0, stderr
    assert sorted(os.listdir(out)) == sorted(
        ["warped.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz", "transform.nii.gz",
         "affine.mat", "inverse.nii.gz"])
    fixed, moving = nib.load(scans["fixed"]), nib.load(scans["moving"])
    assert moving.shape != fixed.shape
    for name in ("warped", "warped_seg", "jacobian"):
        image = nib.load(out / f"{name}.nii.gz")
        assert image.shape == fixed.shape, name
        np.testing.assert_array_equal(image.affine, fixed.affine)
    # What was done is in the log.
    for line in ("moving: 34x40x36 at", "fixed: 36x38x34 at",
                 f"network grid {'x'.join(map(str, fixtures.SIZE))} at 6x6x6 mm, RAS",
                 "affine (fixed -> moving world): rotation", "inverse (fixed-point"):
        assert line in stdout, (line, stdout)
    assert 0 <= printed(stdout, "dice") <= 1
    warped = nib.load(out / "warped.nii.gz").get_fdata()
    assert np.count_nonzero(warped > 0.1) > 2000
    np.testing.assert_allclose(sitk_resample(scans["moving"], scans["fixed"], out),
                               warped, atol=1e-5)
    assert_apply_reproduces_warped_seg(out, scans["moving_seg"], tmp_path / "seg.nii.gz")


@pytest.mark.parametrize("seed", [0, 1])
def test_geometry_round_trip_with_an_identity_network(seed):
    """A scan in a random orientation (RAS, LPS, permuted, oblique), anisotropic
    voxels and a shifted origin, registered by a network that predicts a zero
    field, comes back as itself; another grid of the same anatomy comes back as
    that anatomy on the fixed grid, to interpolation accuracy."""
    trained = fixtures.smooth_trained(fixtures.SIZE, amplitude=0.0)
    rng = np.random.default_rng(seed)
    shapes = [(34, 40, 36), (36, 38, 34)]  # As write_scans: shared compilations.
    grids = [(shape, fixtures.random_affine(rng, shape, oblique=k != seed))
             for k, shape in enumerate(shapes)]
    volumes = []
    for shape, affine in grids:
        image, labels = fixtures.render_phantom(shape, affine)
        volumes.append((transforms.Volume(image, affine),
                        transforms.Volume(labels, affine)))
    (moving, moving_seg), (fixed, fixed_seg) = volumes
    itself = scans_lib.register_volumes(trained, fixed, fixed, fixed_seg, fixed_seg)
    assert not itself["direct"]  # Resampled onto the network's grid and back.
    np.testing.assert_allclose(itself["warped"], fixed.array, atol=1e-5)
    np.testing.assert_array_equal(itself["warped_seg"], fixed_seg.array)
    np.testing.assert_array_equal(itself["jacobian"], 1.0)
    np.testing.assert_array_equal(itself["transform"].field_lps, 0.0)

    other = scans_lib.register_volumes(trained, moving, fixed, moving_seg,
                                          fixed_seg, fov_center=(2.0, -3.0, 1.0))
    error = np.abs(other["warped"] - fixed.array)
    assert np.count_nonzero(fixed.array > 0.1) > 2000
    assert error.mean() < 0.02, error.mean()
    head = [other["warped_seg"] > 0, fixed_seg.array > 0]
    overlap = 2 * np.sum(head[0] & head[1]) / (np.sum(head[0]) + np.sum(head[1]))
    assert overlap > 0.95, overlap  # The labels: small structures at 4 mm voxels.
    assert any("(2.0, -3.0, 1.0) mm RAS (as given)" in line for line in other["log"])


# Registration with no network: optimisation alone (no --workdir).

# Few steps on the scans' own grids: enough to move, quick to compile and run.
QUICK = ("--levels=2,1", "--steps=10,5", "--learning-rate=0.1")


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    return fixtures.write_scans(str(tmp_path_factory.mktemp("scans")), seed=3)


def test_scans_of_other_geometries_register_with_no_network(scans, tmp_path, capsys):
    """Two scans of different shapes, voxel sizes and oblique orientations, in the
    displacement mode (its fixed-point inverse): the outputs lie on the fixed
    grid, SimpleITK applies affine.mat and transform.nii.gz to warped.nii.gz,
    apply reproduces warped_seg.nii.gz, the energy went down."""
    out = tmp_path / "out"
    status, stdout, stderr = run_main(
        capsys, f"--moving={scans['moving']}", f"--fixed={scans['fixed']}",
        f"--moving-seg={scans['moving_seg']}", f"--fixed-seg={scans['fixed_seg']}",
        f"--out={out}", "--affine", "--inverse", "--nodiffeomorphic", "--reg-weight=2",
        *QUICK)  # the displacement mode's own weight (the default, 1, is the velocity's)
    assert status == 0, stderr
    assert sorted(os.listdir(out)) == sorted(
        ["warped.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz", "transform.nii.gz",
         "affine.mat", "inverse.nii.gz"])
    fixed = nib.load(scans["fixed"])
    assert nib.load(scans["moving"]).shape != fixed.shape
    for name in ("warped", "warped_seg", "jacobian"):
        image = nib.load(out / f"{name}.nii.gz")
        assert image.shape == fixed.shape, name
        np.testing.assert_array_equal(image.affine, fixed.affine)
    for line in ("path: optimisation alone, no network (no --workdir): levels 2,1 x "
                 "steps 10,5", "working grid: the fixed grid",
                 "affine (fixed -> moving world): rotation", "optimiser: compiled",
                 "inverse (fixed-point"):
        assert line in stdout, (line, stdout)
    assert re.search(r"^optimisation: \S+ s \(the compiled program\)$", stdout, re.M)
    match = re.search(r"^energy: (\S+) \(identity\) -> (\S+) \(optimised\)$", stdout,
                      re.M)
    assert float(match.group(2)) < float(match.group(1)) - 1e-3
    warped = nib.load(out / "warped.nii.gz").get_fdata()
    assert np.count_nonzero(warped > 0.1) > 2000
    np.testing.assert_allclose(sitk_resample(scans["moving"], scans["fixed"], out),
                               warped, atol=1e-5)
    # The scans show one phantom in one place: registering must not lose the overlap
    # that the scanner's placement gives.
    fixed_seg = np.asarray(nib.load(scans["fixed_seg"]).dataobj)
    as_placed = np.asarray(geometry.sample_through(
        np.asarray(nib.load(scans["moving_seg"]).dataobj), nib.load(scans["moving"]).affine,
        np.zeros(fixed.shape + (3,), np.float32), fixed.affine, order=0))
    labels = [l for l in np.unique(fixed_seg) if l != 0]
    assert printed(stdout, "dice") > np.mean(np_dice(as_placed, fixed_seg, labels)) - 0.01
    assert_apply_reproduces_warped_seg(out, scans["moving_seg"], tmp_path / "seg.nii.gz")


def test_diffeomorphic_mode_recovers_a_known_deformation_and_a_second_process_reuses_it(
        tmp_path, capsys, cache_home):
    """A scan and the same scan deformed by a known smooth field, on one grid, in
    two processes sharing a cache folder: the field found (disp.nii.gz, voxels) is
    most of the known one with no det <= 0, and the second process loads the
    compiled optimiser from the persistent compilation cache."""
    shape = (28, 30, 26)
    affine = fixtures.random_affine(np.random.default_rng(4), shape)
    image, _ = fixtures.render_phantom(shape, affine)
    truth = fixtures.smooth_field(shape, 3.0)
    paths = {name: fixtures.write_nifti(tmp_path / f"{name}.nii.gz", array, affine,
                                        np.float32)
             for name, array in (("moving", image), ("fixed", np_warp(image, truth)))}
    out = tmp_path / "out"
    args = [f"--moving={paths['moving']}", f"--fixed={paths['fixed']}", f"--out={out}",
            "--diffeomorphic", "--inverse", "--levels=2,1", "--steps=40,20",
            "--learning-rate=0.2"]
    # This process first (the cache in cache_home, empty), then another one.
    status, stdout, stderr = run_main(capsys, *args)
    assert status == 0, stderr
    logs = [stdout]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache_home)}
    result = subprocess.run([sys.executable, "-m", "ofg_jax.register", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    logs.append(result.stdout)
    stdout = logs[1]
    assert ("diffeomorphic (velocity on grids 2,1 times coarser than the levels, "
            "7 squarings every 5 steps)") in stdout
    assert "inverse (exact: the negated velocity integrated" in stdout
    assert nib.load(out / "jacobian.nii.gz").get_fdata().min() > 0
    assert printed(stdout, "non_pos_jacobian_pct") == 0
    disp = nib.load(out / "disp.nii.gz").get_fdata()
    head = (image > 0.1) & (np.linalg.norm(truth, axis=-1) > 0.5)
    before = np.linalg.norm(truth[head], axis=-1).mean()
    after = np.linalg.norm((disp - truth)[head], axis=-1).mean()
    assert before > 1.0 and after < 0.5 * before, (before, after)
    cache = cache_home / "ofg_jax"
    for log in logs:
        assert f"compilation cache: {cache}\n" in log
        assert re.search(r"^time: \S+ s for this pair, \S+ s of it compiling", log, re.M)
    assert "optimiser: compiled (not in the persistent compilation cache yet)" in logs[0]
    assert "optimiser: loaded from the persistent compilation cache" in logs[1]
    assert len(os.listdir(cache)) > 1
    first, second = (float(re.search(r"^optimiser: .* in (\S+) s$", log, re.M).group(1))
                     for log in logs)
    assert second < first


def test_batch_mode_a_coarser_working_grid_and_no_compilation_cache(scans, tmp_path,
                                                                     capsys, cache_home):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("moving,fixed,moving_seg,fixed_seg,name\n"
                     f"{scans['moving']},{scans['fixed']},{scans['moving_seg']},"
                     f"{scans['fixed_seg']},first\n"
                     f"{scans['second']},{scans['fixed']},,,second\n")
    status, stdout, stderr = run_main(capsys, f"--pairs={pairs}", "--voxel-size=6",
                                      f"--out={tmp_path / 'out'}", "--nocompilation-cache",
                                      *QUICK)
    assert status == 0, stderr
    # A grid not compiled before in this process, with the cache off: compiled, and
    # nothing written to the cache folder.
    assert "compilation cache: off (--nocompilation-cache)" in stdout
    assert "optimiser: compiled (persistent compilation cache off)" in stdout
    assert not cache_home.exists()
    assert stdout.count("working grid ") == 2
    assert re.search(r"working grid \d+x\d+x\d+ at 6x6x6 mm, \w+, oblique over the "
                     "fixed field of view", stdout)
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == ["first", "second"]
    assert float(rows[0]["dice"]) > 0.5 and rows[1]["dice"] == ""
    fixed = nib.load(scans["fixed"])
    for name in ("first", "second"):
        for output in ("warped.nii.gz", "jacobian.nii.gz"):
            assert nib.load(tmp_path / "out" / name / output).shape == fixed.shape


def write_without_orientation(path, source):
    """``source``'s voxels and voxel sizes, with qform and sform codes 0."""
    image = nib.load(source)
    bare = nib.Nifti1Image(np.asarray(image.dataobj), None)
    bare.header.set_zooms(image.header.get_zooms()[:3])
    nib.save(bare, path)
    assert (bare.header["qform_code"], nib.load(path).header["sform_code"]) == (0, 0)
    return str(path)


def test_a_scan_without_orientation_is_named_in_one_warning_on_both_paths(
        workdir, scans, tmp_path, capsys):
    moving = write_without_orientation(tmp_path / "bare.nii.gz", scans["moving"])
    expected = (f"warning: moving image {moving} states no orientation (qform and sform "
                "codes 0): read as LAS with ")
    for path in ([f"--workdir={workdir}", f"--checkpoint={fixtures.TRAIN_STEPS}"],
                 list(QUICK)):
        status, stdout, stderr = run_main(capsys, f"--moving={moving}",
                                          f"--fixed={scans['fixed']}",
                                          f"--out={tmp_path / 'out'}", *path)
        assert status == 0, stderr
        warnings = [line for line in stdout.splitlines() if line.startswith("warning")]
        assert len(warnings) == 1 and warnings[0].startswith(expected), warnings
    assert nifti.orientation_warning(scans["moving"], "moving image") is None


def test_options_of_the_other_path_and_bad_settings_are_refused(workdir, scans,
                                                                 tmp_path, capsys):
    inputs = [f"--moving={scans['moving']}", f"--fixed={scans['fixed']}",
              f"--out={tmp_path / 'out'}"]
    cases = [
        (["--refine-steps=3"], "--refine-steps: only with a trained network (--workdir)"),
        (["--fov-center=1,2,3"], "--fov-center: only with a trained network"),
        ([f"--workdir={workdir}", "--levels=2,1"], "--levels: only for the optimisation "
                                                    "without a network"),
        (["--levels=2,3", "--steps=1,1"], "each a multiple of the next"),
        (["--levels=4,2,1", "--steps=1,1"], "of the same length"),
        (["--levels=a,1", "--steps=1,1"], "--levels must be integers"),
        (["--window=4"], "window must be a positive odd integer"),
        (["--voxel-size=-2"], "--voxel-size must be a positive number"),
    ]
    for args, message in cases:
        status, _, stderr = run_main(capsys, *inputs, *args)
        assert status == cli.EXIT_USAGE, (args, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        assert message in stderr, (message, stderr)
    status, _, stderr = run_main(capsys, f"--moving={tmp_path / 'missing.nii.gz'}",
                                 *inputs[1:])
    assert status == cli.EXIT_FAILURE
    assert f"moving image {tmp_path / 'missing.nii.gz'} not found" in stderr
    assert not (tmp_path / "out").exists()
