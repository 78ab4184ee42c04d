"""The authors' PyTorch checkpoints: ``models.from_torch`` / ``to_torch`` and the
``ofg-import`` / ``ofg-export`` commands.

The PyTorch reference is ``experiments/torch_networks.py``, whose state_dicts
carry the authors' names and shapes (``tests/models/test_torch_networks.py`` checks
them key by key against the published layouts). Every parameter and BatchNorm
statistic is drawn at random here, so that a wrong mapping cannot pass.
"""

import fractions
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments import torch_networks as tn  # noqa: E402
from ofg_jax.settings import config as config_lib  # noqa: E402
from ofg_jax import export_torch  # noqa: E402
from ofg_jax import import_torch  # noqa: E402
from ofg_jax.registration import network as network_lib  # noqa: E402
from ofg_jax import models  # noqa: E402
from ofg_jax import register  # noqa: E402
from ofg_jax.training import loop  # noqa: E402
from ofg_jax.models import torch_weights  # noqa: E402
from tests import registration_fixtures  # noqa: E402
from tests.training.test_loop import train_losses  # noqa: E402

# The five published layouts (``tn.PUBLISHED``) at small anisotropic grids, with
# the published widths (TransMorph-Large is TransMorph's options, with 10 more
# blocks to compile). TransMorph's stage grids (8, 16, 8) ... (1, 2, 1) with
# window (2, 3, 2): shifted windows, several windows per stage, and the last
# stages zero-padded as the authors' code pads them.
LAYOUTS = {"voxelmorph1": ((32, 48, 32), {}), "voxelmorph2": ((32, 48, 32), {}),
           "vitvnet": ((32, 64, 32), {}),
           "transmorph": ((32, 64, 32), dict(window_size=(2, 3, 2))),
           "transmorph_oasis": ((32, 64, 32), dict(window_size=(2, 3, 2)))}
VARIANTS = {"voxelmorph1": "VoxelMorph-1 (VxmDense_1)",
            "voxelmorph2": "VoxelMorph-2 (VxmDense_2)", "vitvnet": "ViT-V-Net",
            "transmorph": "TransMorph, the IXI release's layout",
            "transmorph_oasis": "TransMorph, the OASIS release's layout "
                                "(half-resolution flow)"}


def torch_case(layout, seed=0):
    """``(PyTorch network with random weights, our network's name, grid)``."""
    size, options = LAYOUTS[layout]
    torch.manual_seed(seed)
    net = tn.randomise(tn.published(layout, size, **options), seed)
    return net, tn.PUBLISHED[layout][0], size


def save_as_the_authors(net, path):
    """``torch.save`` as the authors' training scripts save their checkpoints."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, amsgrad=True)
    # A NumPy best_dsc, as a metric's .mean() gives it.
    torch.save({"epoch": 300, "state_dict": net.state_dict(),
                "best_dsc": np.float64(0.7531), "optimizer": optimizer.state_dict()}, path)
    return str(path)


def torch_flow(net, x):
    """The authors' forward: ``warped, flow = model(pair)``, flow channels-last."""
    with torch.no_grad():
        warped, flow = net(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
    assert warped.shape == (x.shape[0], 1, *x.shape[1:4])
    return np.moveaxis(flow.numpy(), 1, -1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_import_reproduces_the_pytorch_forward(layout, tmp_path):
    net, name, size = torch_case(layout)
    path = save_as_the_authors(net, tmp_path / "model.pth.tar")
    x = np.random.default_rng(1).standard_normal((1, *size, 2)).astype(np.float32)
    want = torch_flow(net, x)

    model, variables = models.from_torch(path, name, size)
    got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x)))
    assert torch_weights.variant(model) == VARIANTS[layout]
    assert got.shape == (1, *size, 3)
    assert np.abs(want).max() > 0.3  # displacements of voxels, not ~0
    assert np.abs(got - want).max() < 1e-3  # voxels
    # The grid comes from the checkpoint's spatial transformer when not given.
    assert models.from_torch(path, name)[0].img_size == size


def test_oasis_layout_upsamples_a_half_resolution_flow_without_scaling():
    net, _, size = torch_case("transmorph_oasis")
    model, variables = models.from_torch(net.state_dict(), "transmorph")
    assert model.half_resolution_flow and "up4" not in variables["params"]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, *size, 2)), jnp.float32)
    flow, state = jax.jit(lambda v, x: model.apply(
        v, x, mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "flow"))(variables, x)
    half = np.asarray(state["intermediates"]["flow"]["__call__"][0])
    assert half.shape == (1, *(n // 2 for n in size), 3)
    # Trilinear x2 (half-pixel centres): the means over each axis are kept, values
    # are not doubled.
    np.testing.assert_allclose(np.asarray(flow).mean((1, 2, 3)), half.mean((1, 2, 3)),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["voxelmorph2", "vitvnet", "transmorph_oasis"])
def test_export_then_import_gives_back_the_variables(layout):
    net, name, size = torch_case(layout, seed=3)
    model, variables = models.from_torch(net.state_dict(), name, size)
    exported = models.to_torch(model, variables)
    # The authors' model loads it strictly, and holds exactly what was imported.
    fresh = tn.published(layout, size, **LAYOUTS[layout][1])
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                          strict=True)
    for key, value in net.state_dict().items():
        if not key.endswith("num_batches_tracked") and key != "c2.0.weight":
            np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(),
                                          err_msg=key)
    _, again = models.from_torch(exported, name, size)
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), again, variables)
    assert all(jax.tree.leaves(chex_equal))
    assert jax.tree.structure(again) == jax.tree.structure(variables)


@pytest.fixture(scope="module")
def vxm_state_dict():
    net, _, _ = torch_case("voxelmorph1", seed=4)
    return {key: value.numpy() for key, value in net.state_dict().items()}


def test_refuses_a_checkpoint_of_another_network(vxm_state_dict):
    with pytest.raises(ValueError, match="holds a voxelmorph.*not a transmorph"):
        models.from_torch(vxm_state_dict, "transmorph", (32, 48, 32))
    with pytest.raises(ValueError, match="none of the networks.*first keys conv.weight"):
        models.from_torch({"conv.weight": np.zeros((1, 1))}, "voxelmorph", (32, 32, 32))


def test_refuses_missing_and_unexpected_keys(vxm_state_dict):
    incomplete = dict(vxm_state_dict)
    del incomplete["unet_model.uparm.2.main.bias"]
    with pytest.raises(ValueError, match=r"missing keys unet_model\.uparm\.2\.main\.bias$"):
        models.from_torch(incomplete, "voxelmorph", (32, 48, 32))
    extra = dict(vxm_state_dict, **{"flow.scale": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys flow\.scale"):
        models.from_torch(extra, "voxelmorph", (32, 48, 32))


def test_refuses_shapes_that_do_not_fit_the_grid_or_options():
    vit, _, _ = torch_case("vitvnet", seed=5)
    with pytest.raises(ValueError, match=r"position_embeddings is \(1, 2, 252\), "
                                         r"expected \(1, 4, 252\)"):
        models.from_torch(vit.state_dict(), "vitvnet", (32, 64, 64))
    tm, _, _ = torch_case("transmorph", seed=5)
    with pytest.raises(ValueError, match=r"relative_position_bias_table is \(45, 4\), "
                                         r"expected \(27, 4\)"):
        models.from_torch(tm.state_dict(), "transmorph", window_size=(2, 2, 2))
    # A window with the same table and token count, transposed: only the derived
    # index tells them apart.
    with pytest.raises(ValueError, match="relative_position_index.*another grid or "
                                         "window"):
        models.from_torch(tm.state_dict(), "transmorph", window_size=(2, 2, 3))
    moved = dict(tm.state_dict())
    moved["spatial_trans.grid"] = moved["spatial_trans.grid"] + 1
    with pytest.raises(ValueError, match="spatial_trans.grid differ"):
        models.from_torch(moved, "transmorph")


def test_refuses_files_that_are_no_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pth not found"):
        models.from_torch(str(tmp_path / "nope.pth"), "voxelmorph")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.pth is not a PyTorch file"):
        models.from_torch(str(garbage), "voxelmorph")
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="holds no state_dict"):
        models.from_torch(str(tmp_path / "empty.pth"), "voxelmorph")
    torch.save({"state_dict": {}, "ratio": fractions.Fraction(1, 3)}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match=r"refuses \(fractions.Fraction\); if you trust"):
        models.from_torch(str(tmp_path / "code.pth"), "voxelmorph")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(ImportError, match=r"pip install 'ofg_jax\[torch\]'"):
        models.from_torch(str(garbage), "voxelmorph")


def test_to_torch_refuses_variables_of_another_network(vxm_state_dict):
    model, variables = models.from_torch(vxm_state_dict, "voxelmorph")
    wider = models.create("voxelmorph", (32, 48, 32), final_features=(32, 16, 16))
    with pytest.raises(ValueError, match="do not fit voxelmorph.*final_1/bias"):
        models.to_torch(wider, variables)


# ---------------------------------------------------------------------------
# The commands: import, register, fine-tune with exact resume, export.

TINY = dict(enc_features=(4, 8), dec_features=(8, 8), final_features=(4,))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """An ``ofg-import`` workdir of a random PyTorch VoxelMorph at the tiny grid."""
    folder = tmp_path_factory.mktemp("import")
    torch.manual_seed(6)
    net = tn.randomise(tn.VoxelMorph(registration_fixtures.SIZE, **TINY), seed=6)
    path = save_as_the_authors(net, folder / "vxm.pth.tar")
    workdir = str(folder / "imported")
    status = import_torch.main(["ofg-import", f"--checkpoint={path}", "--config=demo",
                                f"--config.data.img_size={registration_fixtures.SIZE}",
                                f"--workdir={workdir}"])
    assert status == 0
    return workdir, path, net


def test_import_writes_a_workdir_of_the_network(imported, capsys):
    workdir, path, net = imported
    with open(os.path.join(workdir, "imported.json")) as f:
        provenance = json.load(f)
    assert provenance["model"] == "voxelmorph" and provenance["epoch"] == 300
    assert provenance["best_dsc"] == pytest.approx(0.7531)
    assert provenance["checkpoint"] == os.path.abspath(path)
    trained = network_lib.load_trained(workdir)
    assert trained.model.enc_features == TINY["enc_features"]  # read from the shapes
    assert trained.img_size == registration_fixtures.SIZE
    x = np.random.default_rng(7).standard_normal((1, *trained.img_size, 2))
    x = x.astype(np.float32)
    got = np.asarray(trained.model.apply(trained.variables, jnp.asarray(x)))
    want = torch_flow(net, x)
    assert np.abs(want).max() > 0.3 and np.abs(got - want).max() < 1e-3
    # A workdir is never overwritten, and a network is checked against the checkpoint.
    capsys.readouterr()
    assert import_torch.main(["ofg-import", f"--checkpoint={path}",
                              f"--workdir={workdir}"]) == 1
    assert "exists and is not an empty folder" in capsys.readouterr().err
    other = os.path.join(os.path.dirname(workdir), "other")
    assert import_torch.main(["ofg-import", f"--checkpoint={path}", f"--workdir={other}",
                              "--config.model.name=vitvnet"]) == 1
    assert "holds a voxelmorph (keys unet_model.*), not a vitvnet" in capsys.readouterr().err
    assert not os.path.exists(other)


def test_register_with_the_imported_network(imported, tmp_path, capsys):
    workdir, _, _ = imported
    files = registration_fixtures.write_pair(tmp_path / "scans")
    out = str(tmp_path / "out")
    status = register.main(["ofg-register", f"--workdir={workdir}",
                            f"--moving={files['moving']}", f"--fixed={files['fixed']}",
                            f"--moving-seg={files['moving_seg']}",
                            f"--fixed-seg={files['fixed_seg']}", f"--out={out}"])
    assert status == 0, capsys.readouterr().err
    assert {"warped.nii.gz", "warped_seg.nii.gz", "transform.nii.gz"} <= set(os.listdir(out))


def finetune_config(workdir, **train):
    """The tiny config (``TINY``'s network), one epoch of 4 steps from ``workdir``."""
    config = registration_fixtures.tiny_config()
    config.data.num_train = 4
    config.checkpoint.keep_best = 2  # the two evaluated steps: 0 and the last
    config.train.update({**dict(init_from=workdir, figures=False, epochs=1, max_steps=4,
                                eval_every_epochs=0), **train})
    return config


def test_fine_tuning_from_the_import_starts_there_and_resumes_exactly(imported, tmp_path):
    workdir, _, _ = imported
    # The command line takes the network (model.*) from the workdir it starts from.
    loaded = config_lib.load("demo", [f"train.init_from={workdir}"])
    assert loaded.model.enc_features == TINY["enc_features"]

    full = str(tmp_path / "full")
    loop.train_and_evaluate(finetune_config(workdir), full)
    start = network_lib.load_trained(full, step=0)
    start_params = jax.tree.leaves(start.variables)
    imported_params = jax.tree.leaves(network_lib.load_trained(workdir).variables)
    assert all(np.array_equal(a, b) for a, b in zip(start_params, imported_params))
    with open(os.path.join(full, "config.json")) as f:
        assert json.load(f)["train"]["init_from"] == workdir

    # Stopped after 2 steps, then resumed without the imported workdir: the run's
    # own checkpoints are all it needs, and the losses are those of the full run.
    part = str(tmp_path / "part")
    loop.train_and_evaluate(finetune_config(workdir, max_steps=2), part)
    moved = workdir + ".moved"
    os.rename(workdir, moved)
    try:
        loop.train_and_evaluate(finetune_config(workdir), part)
    finally:
        os.rename(moved, workdir)
    losses = train_losses(part)
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[s] for s in range(1, 5)],
                               [train_losses(full)[s] for s in range(1, 5)], rtol=1e-6)

    with pytest.raises(ValueError, match="holds imported weights.*init_from"):
        loop.train_and_evaluate(finetune_config(workdir), workdir)
    wrong = finetune_config(workdir)
    wrong.model.final_features = (8,)
    with pytest.raises(ValueError, match="final_0/kernel"):
        loop.train_and_evaluate(wrong, str(tmp_path / "wrong"))
    assert not os.path.exists(tmp_path / "wrong")


def test_export_loads_strictly_into_the_pytorch_network(imported, tmp_path, capsys):
    workdir, _, net = imported
    out = str(tmp_path / "exported.pth.tar")
    assert export_torch.main(["ofg-export", f"--workdir={workdir}", f"--out={out}"]) == 0
    assert "VoxelMorph" in capsys.readouterr().out
    fresh = tn.VoxelMorph(registration_fixtures.SIZE, **TINY)
    fresh.load_state_dict(torch.load(out)["state_dict"], strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert export_torch.main(["ofg-export", f"--workdir={workdir}", f"--out={out}"]) == 1
    assert f"--out {out} exists" in capsys.readouterr().err


def test_the_parity_experiment_compares_a_repository_of_models(tmp_path):
    """``experiments/authors_parity.py`` on a stand-in of the authors' layout of
    files, whose VoxelMorph classes are ours: the plumbing, and its report."""
    from experiments import authors_parity
    folder = tmp_path / "repo" / "IXI" / "Baseline_registration_methods" / "VoxelMorph"
    folder.mkdir(parents=True)
    (tmp_path / "repo" / "IXI" / "TransMorph").mkdir()
    (folder / "models.py").write_text(
        "from experiments import torch_networks as tn\n"
        "VxmDense_1 = tn.VoxelMorph\n"
        "VxmDense_2 = lambda size: tn.published('voxelmorph2', size)\n")
    out = tmp_path / "parity.json"
    authors_parity.main([f"--repo={tmp_path / 'repo'}", "--size=32,48,32",
                         "--layouts=voxelmorph1,voxelmorph2", f"--out={out}"])
    rows = json.loads(out.read_text())
    assert [row["layout"] for row in rows] == ["voxelmorph1", "voxelmorph2"]
    for row in rows:
        assert row["flow_max_abs"] > 0.3 and row["max_abs_error_voxels"] < 1e-3
        assert row["export_equals_their_state_dict"] and row["keys"] == 25
