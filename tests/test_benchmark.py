"""experiments.benchmark runs end to end at a tiny size; the plot script reads it."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from experiments import bench_models, benchmark, plot_benchmark, profile_refine  # noqa: E402
from experiments import timing  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One benchmark run at 16^3, 2 inner steps, 1 repeat: (JSON record, stdout)."""
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark",
         "--shape", "16,16,16", "--inner-steps", "2", "--repeats", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_writes_every_key_for_both_frameworks(tiny_run):
    record, _ = tiny_run
    assert record["shape"] == [16, 16, 16]
    assert record["model"] == "voxelmorph" and record["inner_steps"] == 2
    assert isinstance(record["device"], str) and record["device"]
    for framework in ("jax", "torch"):
        result = record[framework]
        assert "error" not in result, result.get("error")
        for key in benchmark.TIMED_KEYS + ("peak_mb",):
            assert math.isfinite(result[key]) and result[key] > 0, (framework, key)
    assert record["jax"]["compile_s"] > 0
    assert record["torch"]["compile_s"] is None  # eager
    assert record["jax"]["ofg_over_unsupervised"] == pytest.approx(
        record["jax"]["ofg_step_s"] / record["jax"]["unsupervised_step_s"])


def test_prints_a_table_with_ratios(tiny_run):
    record, stdout = tiny_run
    assert "torch/jax" in stdout
    ratio = record["torch"]["ofg_step_s"] / record["jax"]["ofg_step_s"]
    line = next(l for l in stdout.splitlines() if l.strip().startswith("ofg_step_s"))
    assert f"{ratio:.2f}x" in line


def test_plot_from_several_files(tiny_run, tmp_path):
    record, _ = tiny_run
    bigger = dict(record, shape=[32, 32, 32])
    paths = []
    for i, r in enumerate([record, [bigger]]):
        paths.append(str(tmp_path / f"run{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    out = tmp_path / "plot.png"
    plot_benchmark.main(paths + ["--out", str(out)])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    voxels, seconds = plot_benchmark.series(plot_benchmark.load_records(paths), "jax",
                                            "ofg_step_s")
    assert voxels == (16 ** 3, 32 ** 3) and len(seconds) == 2


def test_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="64,64"):
        timing.parse_shape("64,64")
    with pytest.raises(ValueError, match="x"):
        timing.parse_shape("64,x,64")


@pytest.mark.parametrize("argv, name", [
    (["--torch-repeats", "0"], "--torch-repeats"),
    (["--torch-warmup", "-1"], "--torch-warmup"),
    (["--torch-functions", "ofg"], "--torch-functions"),
])
def test_rejects_bad_counts(argv, name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code != 0 and name in capsys.readouterr().err


def test_profile_refine_rejects_fewer_than_two_steps(capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_refine.main(["--steps", "1"])
    assert exit_info.value.code != 0 and "--steps" in capsys.readouterr().err


def test_interleaved_seconds_warms_up_then_times_rounds_in_turn():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    medians, times, first = timing.interleaved_seconds(fns, repeats=3, warmup=2)
    assert calls == ["a", "b"] * 5
    assert [len(t) for t in times.values()] == [3, 3]
    assert medians["a"] == sorted(times["a"])[1] and set(first) == {"a", "b"}
    # Without warm-up the first calls are timed.
    _, times, first = timing.interleaved_seconds(fns, repeats=1, warmup=0)
    assert times["a"] == [first["a"]]


def test_compile_time_inside_calls_is_taken_out():
    clock = {"compiled": 0.0}

    def compiles(seconds):
        def call():
            clock["compiled"] += seconds
        return call

    calls, spent = benchmark.counting_compile_time(
        {"a": compiles(5.0), "b": compiles(0.0)}, lambda: clock["compiled"])
    calls["a"](), calls["b"](), calls["a"]()
    assert spent == {"a": [5.0, 5.0], "b": [0.0]}
    # One warm-up call of each (compiling 5 s and 0 s), then one timed call
    # each: 7 s that compiled 5 s more, 3 s that compiled 0.5 s.
    result = benchmark.without_compile_time({"a": [7.0], "b": [3.0]},
                                            {"a": [5.0, 5.0], "b": [0.0, 0.5]}, warmup=1)
    assert result["a_s"] == pytest.approx(2.0) and result["b_s"] == pytest.approx(2.5)
    assert result["compile_s"] == pytest.approx(10.5)
    result = benchmark.without_compile_time({"b": [3.0, 2.0, 4.0]},
                                            {"b": [1.0, 0.0, 0.0]}, warmup=0)
    assert result["b_s"] == pytest.approx(2.0)
    assert result["compile_in_timed_calls_s"] == {"b": [1.0, 0.0, 0.0]}


def test_torch_functions_choose_what_pytorch_times(tmp_path):
    out = tmp_path / "split.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--shape", "16,16,16",
         "--inner-steps", "1", "--repeats", "1", "--functions", "forward",
         "--torch-functions", "refine,forward", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        record = json.load(f)
    assert [k for k in benchmark.TIMED_KEYS if k in record["jax"]] == ["forward_s"]
    assert [k for k in benchmark.TIMED_KEYS if k in record["torch"]] == [
        "refine_s", "forward_s"]
    refine_row = next(l for l in proc.stdout.splitlines()
                      if l.strip().startswith("refine_s"))
    assert refine_row.split()[1] == "-"  # not timed for JAX


def test_each_framework_is_saved_as_it_finishes(tmp_path, monkeypatch):
    """A run stopped during its second framework keeps the first one's result."""
    out = tmp_path / "partial.json"

    def worker(framework, *args, **kwargs):
        if framework == "torch":
            raise KeyboardInterrupt
        return {"ofg_step_s": 1.5, "peak_mb": 10.0}

    monkeypatch.setattr(benchmark, "spawn_worker", worker)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--shape", "16,16,16", "--functions", "ofg_step",
                        "--out", str(out)])
    with open(out) as f:
        record = json.load(f)
    assert record["jax"]["ofg_step_s"] == 1.5 and "torch" not in record


def test_refine_is_shared_only_when_measured(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "spawn_worker",
                        lambda *args, **kwargs: {"ofg_step_s": 1.5, "peak_mb": 10.0})
    vm, vit = benchmark.main(["--shape", "16,16,16", "--functions", "ofg_step",
                              "--models", "voxelmorph,vitvnet"])
    assert "refine_from" not in vit["jax"] and "refine_s" not in vit["jax"]
    assert "network-independent" not in capsys.readouterr().out


def test_a_failing_framework_is_reported_not_fatal(tmp_path):
    out = tmp_path / "bad.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark",
         "--shape", "16,16,16", "--models", "no_such_net", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        record = json.load(f)
    assert "no_such_net" in record["jax"]["error"]
    assert "no_such_net" in record["torch"]["error"]
    assert "jax failed" in proc.stdout


def test_profile_refine_times_every_part(tmp_path):
    out = tmp_path / "roofline.json"
    times = profile_refine.main(["--shape", "8,8,8", "--steps", "2", "--repeats", "1",
                                 "--roofline", "--json", str(out)])
    assert set(times) == {"warp", "ncc", "grad_loss", "optimizer", "refine_step",
                          "refine_per_step"}
    assert all(cpu > 0 for _, cpu in times.values())
    with open(out) as f:
        record = json.load(f)
    assert record["bytes"]["refine_step"] > profile_refine.FLOOR_BYTES_PER_VOXEL * 8 ** 3
    assert all(gbs > 0 for gbs in record["bandwidth_gbs"].values())


def test_bench_models_times_each_entry(tmp_path):
    out = tmp_path / "models.json"
    bench_models.main(["--entries", "jax:voxelmorph,torch:voxelmorph", "--size",
                       "16x16x16", "--repeats", "2", "--json", str(out)])
    with open(out) as f:
        results = json.load(f)["results"]
    assert [r["entry"] for r in results] == ["jax:voxelmorph", "torch:voxelmorph"]
    for r in results:
        assert r["params"] == 274387
        assert len(r["forward_s"]) == len(r["forward_backward_s"]) == 2
        assert all(t > 0 for t in r["forward_s"] + r["forward_backward_s"])


def test_isolated_functions_and_two_networks(tmp_path):
    """--isolate: one process per function, a peak for each; refine measured once."""
    out = tmp_path / "two.json"
    measured = ("refine", "forward")  # the two cheapest: a process each is what is tested
    tiny_vit = ["--set", "vitvnet:model.encoder_channels=(4,4,4)",
                "--set", "vitvnet:model.hidden_size=8", "--set", "vitvnet:model.num_layers=1",
                "--set", "vitvnet:model.num_heads=2", "--set", "vitvnet:model.mlp_dim=8",
                "--set", "vitvnet:model.conv_first_channel=8",
                "--set", "vitvnet:model.decoder_channels=(8,8,4,4,4)"]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--shape", "64,32,32",
         "--inner-steps", "1", "--repeats", "1", "--models", "voxelmorph,vitvnet",
         "--functions", ",".join(measured), "--isolate", "--out", str(out), *tiny_vit],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        vm, vit = json.load(f)
    assert vit["options"]["hidden_size"] == 8 and vm["options"]["enc_features"] == [8, 32, 32, 32]
    for record in (vm, vit):
        for framework in ("jax", "torch"):
            result = record[framework]
            assert "error" not in result, result.get("error")
            keys = [f"{f}_{what}" for f in measured for what in ("s", "peak_mb")]
            for key in keys:
                assert math.isfinite(result[key]) and result[key] > 0, (framework, key)
            assert "ofg_step_s" not in result
            assert result["peak_mb"] == max(result[f"{f}_peak_mb"] for f in measured)
    # refine does not depend on the network: measured with the first, copied.
    assert vit["jax"]["refine_s"] == vm["jax"]["refine_s"]
    assert vit["torch"]["refine_from"] == "voxelmorph"
    assert vit["torch"]["parameters"] > 0
    assert "forward_peak_mb" in proc.stdout


def test_set_names_a_network_or_all():
    per_model = benchmark.parse_sets(["train.remat=True", "vitvnet:model.num_layers=2"],
                                     ["voxelmorph", "vitvnet"])
    assert per_model == {"voxelmorph": ["train.remat=True"],
                         "vitvnet": ["train.remat=True", "model.num_layers=2"]}
    with pytest.raises(ValueError, match="transmorph"):
        benchmark.parse_sets(["transmorph:model.embed_dim=8"], ["voxelmorph"])


def test_memory_report_prints_xla_buffer_sizes(capsys):
    from experiments import memory_report
    results = memory_report.main(["--shape", "16,16,16", "--functions", "ofg_step",
                                  "--inner-steps", "1"])
    stats = results[("voxelmorph", "ofg_step")]
    assert stats["temp_mb"] > 0 and stats["alias_mb"] > 0  # the state is donated
    assert "voxelmorph ofg_step 16x16x16" in capsys.readouterr().out
