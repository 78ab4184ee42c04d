"""experiments.registration_peers without the peer tools: the conversion of
transforms to the scoring form, the whole path from a tool's process to the
scores (the identity adapter with a known shift, ofg_jax.register as it is, on a
tiny pair), and the command line's errors."""

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from experiments import brain_pairs
from experiments import registration_peers as peers
from ofg_jax.registration import geometry

SHAPE = (20, 24, 18)
SPACING = 2.0
SHIFT_RAS = np.array([4.0, -2.0, 6.0])  # the known answer (whole voxels): p -> p + it


def tiny_pair(folder: str) -> np.ndarray:
    """A pair on one 2 mm LIA grid whose answer is the shift ``SHIFT_RAS``: the
    moving image is the fixed one moved by it. Returns the fixed affine."""
    affine = geometry.centred_grid(SHAPE, (SPACING,) * 3, "LIA", (4.0, -3.0, 2.0)).affine
    voxels = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    points = geometry.apply_affine(affine, voxels)
    centre = geometry.apply_affine(affine, (np.array(SHAPE) - 1) / 2)
    blob = lambda p: np.exp(-np.sum(((p - centre) / np.array([9.0, 12.0, 8.0])) ** 2, -1))
    labels = lambda image: np.where(image > 0.6, 2, np.where(image > 0.25, 1, 0))
    fixed, moving = blob(points), blob(points - SHIFT_RAS)
    brain_pairs.write(folder, {"fixed": fixed, "fixed_seg": labels(fixed),
                               "fixed_affine": affine, "moving": moving,
                               "moving_seg": labels(moving), "moving_affine": affine,
                               "truth": (points + SHIFT_RAS).astype(np.float32)})
    return affine


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pairs") / "tiny")
    tiny_pair(folder)
    return folder


def test_known_shift_scores_no_error_in_every_form(pair_dir, tmp_path):
    fixed = nib.load(os.path.join(pair_dir, "fixed.nii.gz"))
    truth = np.load(os.path.join(pair_dir, "truth.npy"))
    # The dense map (moving world point of each fixed voxel) -> the ITK field.
    field = peers.points_to_field(truth, fixed.affine)
    np.testing.assert_allclose(field, np.broadcast_to(SHIFT_RAS * geometry.RAS_TO_LPS,
                                                      field.shape), atol=1e-4)
    # A peer's output: its whole transform as field.nii.gz.
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    geometry.write_itk_displacement(str(peer_dir / peers.FIELD_FILE), field, fixed)
    loaded, matrix = peers.load_transform(peers.TOOLS["fireants"], str(peer_dir), pair_dir)
    assert matrix is None
    scores = brain_pairs.score(pair_dir, loaded, matrix)
    assert scores["error_mm"] < 1e-3 and scores["dice"] > 0.99
    assert scores["det_le0_brain_pct"] == 0.0
    # ofg_jax's output: a zero field and the shift as its ITK affine.
    ofg_dir = tmp_path / "ofg"
    ofg_dir.mkdir()
    geometry.write_itk_displacement(str(ofg_dir / "transform.nii.gz"),
                                    np.zeros_like(field), fixed)
    shift = np.eye(4)
    shift[:3, 3] = SHIFT_RAS
    geometry.write_itk_affine(str(ofg_dir / "affine.mat"), shift)
    loaded, matrix = peers.load_transform(peers.TOOLS["ofg_jax"], str(ofg_dir), pair_dir)
    np.testing.assert_allclose(matrix, shift, atol=1e-6)
    assert brain_pairs.score(pair_dir, loaded, matrix)["error_mm"] < 1e-3
    # No registration is off by the shift.
    no_registration = brain_pairs.score(pair_dir, None, None)
    assert no_registration["error_mm"] == pytest.approx(np.linalg.norm(SHIFT_RAS), abs=1e-3)


def test_a_field_off_the_fixed_grid_is_refused(pair_dir, tmp_path):
    fixed = nib.load(os.path.join(pair_dir, "fixed.nii.gz"))
    moved = fixed.affine.copy()
    moved[0, 3] += 1.0
    other = nib.Nifti1Image(np.zeros(SHAPE, np.float32), moved)
    geometry.write_itk_displacement(str(tmp_path / peers.FIELD_FILE),
                                    np.zeros(SHAPE + (3,), np.float32), other)
    with pytest.raises(peers.ToolFailed, match="not on the fixed grid"):
        peers.load_transform(peers.TOOLS["syntx"], str(tmp_path), pair_dir)


def test_ofg_report_reads_the_register_log():
    log = ("compilation cache: /c/ofg_jax\npath: optimisation alone, no network\n"
           "affine (fixed -> moving world): rotation 0.29 deg; 4.30 s, and 6.37 s "
           "compiling\noptimisation: 4.58 s (the compiled program)\n"
           "time: 35.42 s for this pair, 21.32 s of it compiling programs\n")
    report = peers.ofg_report(log)
    assert report["registration_seconds"] == pytest.approx(8.88)
    assert report["compile_seconds"] == pytest.approx(21.32)
    assert report["recipe"] == "optimisation alone, no network"
    fallback = peers.ofg_report("time: 10.0 s for this pair, 4.0 s of it compiling\n")
    assert fallback["registration_seconds"] == pytest.approx(6.0)
    assert peers.ofg_report("nothing")["registration_seconds"] is None


def test_tools_end_to_end(pair_dir, tmp_path, monkeypatch):
    """ofg_jax.register as it is, the identity adapter with the known shift (LPS)
    through a tool's process, and a tool that fails: one run each."""
    lps = ",".join(str(v) for v in SHIFT_RAS * geometry.RAS_TO_LPS)
    monkeypatch.setitem(peers.EXTRA_TOOLS, "shift", peers.Tool(
        "shift", "shift", None, "experiments.peers.run_identity", (f"--shift={lps}",)))
    monkeypatch.setitem(peers.EXTRA_TOOLS, "broken", peers.Tool(
        "broken", "broken", None, "experiments.peers.run_identity", ("--shift=1,2",)))
    out = str(tmp_path / "out")
    argv = ["--pairs-dir", os.path.dirname(pair_dir), "--pairs", "tiny", "--tools",
            "shift,broken,ofg_jax", "--runs", "1", "--out", out]
    payload = peers.run(argv)
    assert payload["failed"] == ["tiny: broken"]
    records = {r["label"]: r for r in payload["records"]}
    assert list(records) == ["no registration", "ofg_jax affine only", "the known answer",
                             "shift", "broken", "ofg_jax (default)"]
    assert records["the known answer"]["error_mm"] < 1e-3
    shift = records["shift"]
    assert shift["error_mm"] < 1e-3 and shift["dice"] > 0.99
    assert shift["registration_seconds"] >= 0 and shift["process_seconds_cold"] > 0
    assert shift["process_seconds_warm"] is None and shift["peak_rss_mb"] > 10
    threads = len(os.sched_getaffinity(0))  # the default --threads
    assert shift["runs"][0]["report"]["threads"]["cpus"] == threads
    assert shift["runs"][0]["report"]["threads"]["OMP_NUM_THREADS"] == str(threads)
    assert "--shift must be three numbers" in records["broken"]["error"]
    ofg = records["ofg_jax (default)"]
    for key in ("dice", "hd95_mm", "det_le0_brain_pct", "error_mm", "process_seconds_cold",
                "peak_rss_mb"):
        assert np.isfinite(ofg[key]), key
    assert ofg["registration_seconds"] is not None and ofg["recipe"]
    assert ofg["warped_agreement"] > 0.999 and shift["warped_agreement"] is None
    assert ofg["error_mm"] < records["no registration"]["error_mm"]
    assert os.listdir(os.path.join(out, "runs", "tiny", "ofg_jax", "cache"))  # filled
    for name in ("shift", "broken", "ofg_jax"):
        assert os.path.isfile(os.path.join(out, "json", f"tiny__{name}.json"))
    with open(os.path.join(out, "registration_peers.md")) as f:
        text = f.read()
    assert "#### tiny" in text and "failed: " in text and "ofg_jax (default)" in text
    with open(os.path.join(out, "registration_peers.json")) as f:
        assert json.load(f)["threads"] == threads
    # A second run reuses what is done (--force would run it again).
    again = peers.run(argv[:5] + ["shift,ofg_jax"] + argv[6:])
    assert [r["process_seconds_cold"] for r in again["records"] if r["tool"] == "shift"] \
        == [shift["process_seconds_cold"]]
    # --tables-only runs nothing: a tool with no record is left out.
    tables = peers.run(argv[:5] + ["shift,identity"] + argv[6:] + ["--tables-only"])
    assert [r["tool"] for r in tables["records"] if r["tool"] != "reference"] == ["shift"]
    assert not os.path.exists(os.path.join(out, "runs", "tiny", "identity"))


def test_a_process_runs_on_the_cpus_it_is_given(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[:1]
    before = os.sched_getaffinity(0)
    result = peers.run_process(
        [sys.executable, "-c", "import os; print(len(os.sched_getaffinity(0)), "
         "os.environ['OMP_NUM_THREADS']); bytearray(50 << 20)"],
        dict(os.environ, OMP_NUM_THREADS="1"), str(tmp_path / "log.txt"), cpus)
    assert os.sched_getaffinity(0) == before
    assert result["returncode"] == 0 and result["wall_seconds"] > 0
    assert result["peak_rss_mb"] > 50
    assert (tmp_path / "log.txt").read_text().split() == ["1", "1"]


@pytest.mark.parametrize("adapter", ["run_ants", "run_fireants", "run_syntx"])
def test_adapters_without_their_tool_say_so_in_one_line(adapter, pair_dir, tmp_path,
                                                        monkeypatch, capsys):
    import importlib
    module = importlib.import_module(f"experiments.peers.{adapter}")
    for name in ("ants", "torch", "fireants", "syntx", "jax"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
    files = [f"--fixed={pair_dir}/fixed.nii.gz", f"--moving={pair_dir}/moving.nii.gz",
             f"--out={tmp_path}"]
    for argv, message in (([*files, "--threads=2"], "virtualenv"),
                          ([*files, "--threads=0"], "--threads must be >= 1"),
                          ([*files[1:], "--fixed=/nonexistent.nii.gz", "--threads=1"],
                           "/nonexistent.nii.gz not found")):
        with pytest.raises(SystemExit) as exit_info:
            from experiments.peers import protocol
            protocol.run(lambda: module.main(argv))  # noqa: B023
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not os.path.exists(tmp_path / "peer.json")


@pytest.mark.parametrize("argv, message", [
    (["--tools", "ofg_jax,nope"], "--tools: unknown nope"),
    (["--tools", "ofg_jax,ofg_jax"], "--tools names ofg_jax twice"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--force", "--tables-only"], "not both"),
    (["--threads", "0"], "--threads must be between 1"),
    (["--threads", "x"], "argument --threads: invalid int value"),
    (["--tools", "fireants", "--venvs", "/nonexistent"],
     "fireants needs /nonexistent/fireants/bin/python"),
    (["--pairs", "elsewhere"], "no pair elsewhere in"),
    (["--pairs", "known_200", "--pairs-dir", "/nonexistent"], "--pairs-dir /nonexistent"),
])
def test_bad_command_lines_are_one_error_line(pair_dir, argv, message, capsys):
    argv = ["--pairs-dir", os.path.dirname(pair_dir), "--tools", "ofg_jax"] + argv
    with pytest.raises(SystemExit) as exit_info:
        peers.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_the_tuning_sweep_scores_each_setting(pair_dir, tmp_path, capsys):
    """experiments.registration_tuning on the tiny pair: a library setting and a
    prototype, each scored against the known answer, and its refusals."""
    from experiments import registration_tuning as tuning
    out = str(tmp_path / "tuning.json")
    names = ["former default (displacement, Grad 2)",
             "compositive updates (FireANTs' greedy, sigma 1 and 1, no Grad)"]
    tuning.main(["--pairs-dir", os.path.dirname(pair_dir), "--pairs", "tiny",
                 "--settings", "|".join(names), "--timing", "--out", out])
    with open(out) as f:
        rows = json.load(f)["rows"]
    assert [row["setting"] for row in rows] == names
    identity = brain_pairs.score(pair_dir, None, None)
    for row in rows:
        assert row["error_mm"] < identity["error_mm"], row
        assert row["optimisation_seconds"] > 0
    for argv, message in ((["--pairs", "subject_to_mni_2mm"], "reported"),
                          (["--pairs", "tiny", "--settings", "nope"], "unknown settings"),
                          (["--pairs", "absent", "--steps", "0,x"],
                           "--steps must be integers separated by commas")):
        with pytest.raises(SystemExit):
            tuning.main(["--pairs-dir", os.path.dirname(pair_dir), "--out", out, *argv])
        assert message in capsys.readouterr().err
