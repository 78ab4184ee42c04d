"""Datasets: layouts, label mapping, plans, flips, bad input and the synthetic phantom."""

import concurrent.futures
import json
import os
import pickle
import random

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from ofg_jax import data
from ofg_jax.data import phantom
from tests import data_fixtures as fx


def config(**kwargs) -> ml_collections.ConfigDict:
    base = dict(name="synthetic", root="", num_val=0, augment=False)
    base.update(kwargs)
    return ml_collections.ConfigDict(base)


def dice_np(a: np.ndarray, b: np.ndarray, labels) -> np.ndarray:
    return np.array([2.0 * np.sum((a == l) & (b == l)) / (np.sum(a == l) + np.sum(b == l)
                                                         + 1e-5) for l in labels])


def check_pair_types(pair, shape):
    assert pair.moving.shape == pair.fixed.shape == shape
    assert pair.moving_seg.shape == pair.fixed_seg.shape == shape
    assert pair.moving.dtype == pair.fixed.dtype == np.float32
    assert pair.moving_seg.dtype == pair.fixed_seg.dtype == np.int32


# --- create() -------------------------------------------------------------------------

def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="synthetic.*ixi.*oasis.*lpba.*abdomen_ct"):
        data.create(config(name="brats"), seed=0)


@pytest.mark.parametrize("name", ["ixi", "oasis", "lpba", "abdomen_ct"])
def test_missing_root_names_path_and_demo(tmp_path, name):
    root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        data.create(config(name=name, root=root), seed=0)
    assert root in str(err.value) and "configs/demo.py" in str(err.value)


# --- IXI ------------------------------------------------------------------------------

def test_ixi_pairs_shapes_and_label_mapping(tmp_path):
    written = fx.write_ixi(str(tmp_path), np.random.default_rng(0))
    ds = data.create(config(name="ixi", root=str(tmp_path)), seed=0)
    assert ds.img_size == fx.SHAPE and len(ds.labels) == 30
    table = np.asarray(fx.IXI_CODES)  # sorted, so an index is a searchsorted position
    pairs = ds.val_pairs()
    assert len(pairs) == 3
    for pair, name in zip(pairs, sorted(n for n in written if n.startswith("Val/"))):
        check_pair_types(pair, fx.SHAPE)
        atlas_image, atlas_codes = written["atlas.pkl"]
        image, seg_codes = written[name]
        np.testing.assert_array_equal(pair.moving, atlas_image)
        np.testing.assert_array_equal(pair.fixed, image)
        np.testing.assert_array_equal(pair.moving_seg, np.searchsorted(table, atlas_codes))
        np.testing.assert_array_equal(pair.fixed_seg, np.searchsorted(table, seg_codes))
        assert pair.moving_seg.max() <= 45
    item = ds.train_plan(0)[0]
    sample = ds.load_train(item)
    assert item.moving == "atlas"
    np.testing.assert_array_equal(sample["moving"], written["atlas.pkl"][0])
    np.testing.assert_array_equal(sample["fixed"], written[item.fixed][0])
    assert sample["fixed"].dtype == np.float32


def test_ixi_plan_deterministic_and_shuffled(tmp_path):
    fx.write_ixi(str(tmp_path), np.random.default_rng(1), num_train=12)
    ds = data.create(config(name="ixi", root=str(tmp_path)), seed=3)
    again = data.create(config(name="ixi", root=str(tmp_path)), seed=3)
    plan = ds.train_plan(5)
    assert plan == again.train_plan(5) and ds.num_train_items(5) == 12
    assert len({hash(item) for item in plan}) == 12
    assert sorted(i.fixed for i in plan) == sorted(f"Train/subject_{i}.pkl" for i in range(12))
    assert [i.fixed for i in plan] != [i.fixed for i in ds.train_plan(6)]
    other_seed = data.create(config(name="ixi", root=str(tmp_path)), seed=4)
    assert [i.fixed for i in plan] != [i.fixed for i in other_seed.train_plan(5)]


def test_flips_are_applied_identically_to_both_images(tmp_path):
    written = fx.write_ixi(str(tmp_path), np.random.default_rng(2), num_train=16)
    ds = data.create(config(name="ixi", root=str(tmp_path), augment=True), seed=0)
    plan = ds.train_plan(0)
    flips = {item.flip for item in plan}
    assert len(flips) >= 4  # 16 draws of 8 equally likely flips
    for item in plan[:6]:
        axes = tuple(k for k in range(3) if item.flip[k])
        sample = ds.load_train(item)
        np.testing.assert_array_equal(sample["moving"],
                                      np.flip(written["atlas.pkl"][0], axes))
        np.testing.assert_array_equal(sample["fixed"], np.flip(written[item.fixed][0], axes))
    no_aug = data.create(config(name="ixi", root=str(tmp_path)), seed=0)
    assert all(item.flip == (False, False, False) for item in no_aug.train_plan(0))


def test_num_val_and_num_train_select_the_reference_subsets(tmp_path):
    fx.write_ixi(str(tmp_path), np.random.default_rng(3), num_train=9, num_val=7)
    assert len(data.create(config(name="ixi", root=str(tmp_path)), 0).val_pairs()) == 7
    ds = data.create(config(name="ixi", root=str(tmp_path), num_val=3, num_train=4), 0)
    # The reference: sort the paths, random.seed(42); random.sample(paths, n); sort.
    val = sorted(str(tmp_path / "Val" / f"subject_{100 + i}.pkl") for i in range(7))
    want_val = sorted(random.Random(42).sample(val, 3))
    assert ds.val_pairs().names == tuple(os.path.basename(p)[:-4] for p in want_val)
    train = sorted(str(tmp_path / "Train" / f"subject_{i}.pkl") for i in range(9))
    want_train = sorted(random.Random(42).sample(train, 4))
    assert sorted(i.fixed for i in ds.train_plan(0)) == [
        os.path.relpath(p, tmp_path) for p in want_train]
    assert want_train != sorted(train)[:4]  # A real draw, not the first four.
    other = data.create(config(name="ixi", root=str(tmp_path), num_val=3, split_seed=7), 0)
    assert other.val_pairs().names != ds.val_pairs().names
    assert ds.split_files() == {
        "train": ["atlas.pkl"] + [os.path.relpath(p, tmp_path) for p in want_train],
        "val": [os.path.relpath(p, tmp_path) for p in want_val], "test": []}
    more = data.create(config(name="ixi", root=str(tmp_path), num_train=50), 0)
    assert len(more.train_plan(0)) == 9  # Fewer files than asked: all of them.
    with pytest.raises(ValueError, match="num_val"):
        data.create(config(name="ixi", root=str(tmp_path), num_val=-1), 0)


def test_configured_grid_must_match_data(tmp_path):
    fx.write_ixi(str(tmp_path), np.random.default_rng(3))
    ok = data.create(config(name="ixi", root=str(tmp_path), img_size=fx.SHAPE), 0)
    assert ok.img_size == fx.SHAPE
    with pytest.raises(ValueError, match=r"\(8, 10, 13\).*\(8, 10, 12\).*atlas.pkl"):
        data.create(config(name="ixi", root=str(tmp_path), img_size=(8, 10, 13)), 0)


@pytest.mark.parametrize("missing", ["atlas.pkl", "Train", "Val"])
def test_ixi_missing_part_is_named(tmp_path, missing):
    fx.write_ixi(str(tmp_path), np.random.default_rng(4))
    path = tmp_path / missing
    if path.is_dir():
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError, match=missing) as err:
        data.create(config(name="ixi", root=str(tmp_path)), 0)
    assert "atlas.pkl" in str(err.value)  # the expected layout is shown


def test_empty_folder_is_an_error(tmp_path):
    fx.write_ixi(str(tmp_path), np.random.default_rng(5))
    for f in (tmp_path / "Val").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no '\\*.pkl' files"):
        data.create(config(name="ixi", root=str(tmp_path)), 0)


def test_ixi_bad_files_are_named(tmp_path):
    rng = np.random.default_rng(6)
    written = fx.write_ixi(str(tmp_path), rng)
    ds = data.create(config(name="ixi", root=str(tmp_path)), 0)
    corrupt = tmp_path / "Train" / "subject_0.pkl"
    corrupt.write_bytes(b"definitely not a pickle")
    with pytest.raises(ValueError, match="subject_0.pkl"):
        ds.load_train(data.TrainItem("atlas", "Train/subject_0.pkl"))

    fx.write_pkl(str(tmp_path / "Train" / "subject_1.pkl"),
                 fx.image(rng, (8, 10, 13)), fx.codes(rng, fx.IXI_CODES, (8, 10, 13)))
    with pytest.raises(ValueError) as err:
        ds.load_train(data.TrainItem("atlas", "Train/subject_1.pkl"))
    message = str(err.value)
    assert all(s in message for s in ("(8, 10, 13)", "subject_1.pkl", "(8, 10, 12)",
                                      "atlas.pkl"))

    nan_image = written["Train/subject_2.pkl"][0].copy()
    nan_image[1, 2, 3] = np.nan
    fx.write_pkl(str(tmp_path / "Train" / "subject_2.pkl"), nan_image,
                 written["Train/subject_2.pkl"][1])
    with pytest.raises(ValueError, match="subject_2.pkl.*non-finite"):
        ds.load_train(data.TrainItem("atlas", "Train/subject_2.pkl"))

    seg = written["Train/subject_3.pkl"][1].copy()
    seg[0, 0, 0] = 1000
    fx.write_pkl(str(tmp_path / "Val" / "subject_100.pkl"), written["Val/subject_100.pkl"][0],
                 seg)
    with pytest.raises(ValueError, match="subject_100.pkl.*1000"):
        ds.val_pairs()[0]

    with open(tmp_path / "atlas.pkl", "wb") as f:
        pickle.dump({"image": 1}, f)
    with pytest.raises(ValueError, match="atlas.pkl"):
        data.create(config(name="ixi", root=str(tmp_path)), 0)


# --- OASIS ----------------------------------------------------------------------------

def test_oasis_random_partner_both_directions(tmp_path):
    written = fx.write_oasis(str(tmp_path), np.random.default_rng(7), num_train=5)
    ds = data.create(config(name="oasis", root=str(tmp_path)), seed=0)
    assert ds.labels == tuple(range(1, 36))
    plan = ds.train_plan(0)
    assert len(plan) == 10 == ds.num_train_items(0)
    firsts = [plan[2 * k].moving for k in range(5)]
    assert sorted(firsts) == sorted(n for n in written if n.startswith("Train/"))
    for a_to_b, b_to_a in zip(plan[::2], plan[1::2]):
        assert a_to_b.moving != a_to_b.fixed
        assert (b_to_a.moving, b_to_a.fixed) == (a_to_b.fixed, a_to_b.moving)
    partners = [[i.fixed for i in ds.train_plan(e)[::2]] for e in range(4)]
    assert len({tuple(p) for p in partners}) > 1
    sample = ds.load_train(plan[1])
    np.testing.assert_array_equal(sample["moving"], written[plan[1].moving][0])
    np.testing.assert_array_equal(sample["fixed"], written[plan[1].fixed][0])


def test_oasis_val_pairs(tmp_path):
    written = fx.write_oasis(str(tmp_path), np.random.default_rng(8))
    pairs = data.create(config(name="oasis", root=str(tmp_path)), 0).val_pairs()
    assert len(pairs) == 2
    for pair, name in zip(pairs, sorted(n for n in written if n.startswith("Val/"))):
        check_pair_types(pair, fx.SHAPE)
        x, y, x_seg, y_seg = written[name]
        np.testing.assert_array_equal(pair.moving, x)
        np.testing.assert_array_equal(pair.fixed, y)
        np.testing.assert_array_equal(pair.moving_seg, x_seg)
        np.testing.assert_array_equal(pair.fixed_seg, y_seg)


def test_oasis_bad_val_file(tmp_path):
    rng = np.random.default_rng(9)
    fx.write_oasis(str(tmp_path), rng)
    fx.write_pkl(str(tmp_path / "Val" / "p_0_1.pkl"), fx.image(rng), fx.image(rng))
    with pytest.raises(ValueError, match="p_0_1.pkl.*tuple of 4"):
        data.create(config(name="oasis", root=str(tmp_path)), 0).val_pairs()[0]
    fx.write_pkl(str(tmp_path / "Val" / "p_0_1.pkl"), fx.image(rng), fx.image(rng, (8, 10, 9)),
                 np.zeros(fx.SHAPE, np.uint8), np.zeros(fx.SHAPE, np.uint8))
    with pytest.raises(ValueError, match=r"\(8, 10, 9\).*p_0_1.pkl.*\(8, 10, 12\)"):
        data.create(config(name="oasis", root=str(tmp_path)), 0).val_pairs()[0]


# --- LPBA40 ---------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [False, True])
def test_lpba_subject_to_atlas(tmp_path, normalize):
    written = fx.write_lpba(str(tmp_path), np.random.default_rng(10))
    ds = data.create(config(name="lpba", root=str(tmp_path), augment=True,
                            normalize=normalize), seed=1)
    assert len(ds.labels) == 54 and ds.img_size == fx.SHAPE

    def scaled(x):  # The reference reads raw intensities; min-max is the option.
        return (x - x.min()) / (x.max() - x.min()) if normalize else x

    plan = ds.train_plan(0)
    assert {i.fixed for i in plan} == {"atlas"} and len(plan) == 3
    item = plan[0]
    sid = os.path.basename(item.moving).split(".")[0]
    axes = tuple(k for k in range(3) if item.flip[k])
    sample = ds.load_train(item)
    np.testing.assert_allclose(sample["moving"], np.flip(scaled(written[sid][0]), axes),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sample["fixed"], np.flip(scaled(written["S01"][0]), axes),
                               rtol=1e-6, atol=1e-6)
    pairs = ds.val_pairs()
    assert pairs.names == ("S05", "S06")
    pair = pairs[1]
    check_pair_types(pair, fx.SHAPE)
    np.testing.assert_allclose(pair.moving, scaled(written["S06"][0]), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_array_equal(pair.moving_seg, written["S06"][1])
    np.testing.assert_array_equal(pair.fixed_seg, written["S01"][1])


def test_lpba_atlas_copy_in_train_is_skipped(tmp_path):
    fx.write_lpba(str(tmp_path), np.random.default_rng(11), train=("S01", "S02", "S03"))
    ds = data.create(config(name="lpba", root=str(tmp_path)), 0)
    assert sorted(os.path.basename(i.moving)[:3] for i in ds.train_plan(0)) == ["S02", "S03"]


def test_lpba_bad_files_are_named(tmp_path):
    rng = np.random.default_rng(12)
    fx.write_lpba(str(tmp_path), rng)
    (tmp_path / "Val" / ("S06" + fx.LPBA_LABEL)).unlink()
    with pytest.raises(FileNotFoundError, match="S06.delineation.structure.label"):
        data.create(config(name="lpba", root=str(tmp_path)), 0)

    fx.write_lpba(str(tmp_path), rng)
    fx.write_nifti(str(tmp_path / "Train" / ("S03" + fx.LPBA_IMAGE)),
                   fx.image(rng, (8, 11, 12)))
    with pytest.raises(ValueError, match=r"\(8, 11, 12\).*S03.*\(8, 10, 12\).*S01"):
        data.create(config(name="lpba", root=str(tmp_path)), 0)

    fx.write_lpba(str(tmp_path), rng)
    (tmp_path / "Train" / ("S04" + fx.LPBA_IMAGE)).write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(ValueError, match="S04.delineation.skullstripped"):
        data.create(config(name="lpba", root=str(tmp_path)), 0)

    fx.write_lpba(str(tmp_path), rng)
    bad = fx.image(rng) * 100
    bad[0, 0, 0] = np.inf
    fx.write_nifti(str(tmp_path / "Train" / ("S02" + fx.LPBA_IMAGE)), bad)
    ds = data.create(config(name="lpba", root=str(tmp_path)), 0)
    item = next(i for i in ds.train_plan(0) if "S02" in i.moving)
    with pytest.raises(ValueError, match="S02.*non-finite"):
        ds.load_train(item)


# --- Abdomen CT -----------------------------------------------------------------------

def test_abdomen_pairs_from_learn2reg_json(tmp_path):
    written = fx.write_abdomen(str(tmp_path), np.random.default_rng(13))
    ds = data.create(config(name="abdomen_ct", root=str(tmp_path)), seed=0)
    assert ds.labels == tuple(range(1, 14)) and ds.img_size == fx.SHAPE
    plan = ds.train_plan(0)
    train_names = {f"imagesTr/{fx.abdomen_name(i)}" for i in range(1, 5)}
    # Each subject with a random partner, both directions (val images 5, 6 left out).
    assert len(plan) == 8 and sorted(i.moving for i in plan[::2]) == sorted(train_names)
    for forward, backward in zip(plan[::2], plan[1::2]):
        assert (backward.moving, backward.fixed) == (forward.fixed, forward.moving)
    assert all(i.fixed in train_names and i.fixed != i.moving for i in plan)
    sample = ds.load_train(plan[0])
    index = int(os.path.basename(plan[0].moving).split("_")[1])
    np.testing.assert_allclose(sample["moving"], written[index][0] / 500.0, rtol=1e-6)
    pairs = ds.val_pairs()
    assert len(pairs) == 2 and pairs.names == ("0005_0006", "0006_0005")  # fixed_moving
    check_pair_types(pairs[0], fx.SHAPE)
    np.testing.assert_allclose(pairs[0].moving, written[6][0] / 500.0, rtol=1e-6)
    np.testing.assert_allclose(pairs[0].fixed, written[5][0] / 500.0, rtol=1e-6)
    np.testing.assert_array_equal(pairs[0].moving_seg, written[6][1])
    np.testing.assert_array_equal(pairs[0].fixed_seg, written[5][1])


def test_abdomen_training_paired_images_and_custom_json(tmp_path):
    paired = [{"fixed": f"./imagesTr/{fx.abdomen_name(1)}",
               "moving": f"./imagesTr/{fx.abdomen_name(2)}"},
              {"fixed": f"./imagesTr/{fx.abdomen_name(3)}",
               "moving": f"./imagesTr/{fx.abdomen_name(4)}"}]
    fx.write_abdomen(str(tmp_path), np.random.default_rng(14),
                     json_extra={"training_paired_images": paired})
    moved = tmp_path / "elsewhere.json"
    os.rename(tmp_path / "AbdomenCTCT_dataset.json", moved)
    ds = data.create(config(name="abdomen_ct", root=str(tmp_path), pairs_json=str(moved)), 0)
    pairs = {(i.moving, i.fixed) for i in ds.train_plan(0)}
    one_way = {(f"imagesTr/{fx.abdomen_name(2)}", f"imagesTr/{fx.abdomen_name(1)}"),
               (f"imagesTr/{fx.abdomen_name(4)}", f"imagesTr/{fx.abdomen_name(3)}")}
    assert pairs == one_way | {(f, m) for m, f in one_way}  # Both directions.
    with pytest.raises(FileNotFoundError, match="no test split"):
        ds.test_pairs()


def test_abdomen_reference_pairs_files(tmp_path):
    written = fx.write_abdomen(str(tmp_path), np.random.default_rng(16))
    (tmp_path / "pairs_train.json").write_text(json.dumps({"pairs": [[1, 2], [3, 4]]}))
    (tmp_path / "pairs_test.json").write_text(json.dumps({"pairs": [[5, 6]]}))
    ds = data.create(config(name="abdomen_ct", root=str(tmp_path),
                            pairs_json=str(tmp_path / "pairs_train.json"),
                            test_pairs_json=str(tmp_path / "pairs_test.json")), 0)
    plan = [(os.path.basename(i.moving), os.path.basename(i.fixed))
            for i in ds.train_plan(0)]
    name = fx.abdomen_name
    assert sorted(plan) == sorted([(name(1), name(2)), (name(2), name(1)),
                                   (name(3), name(4)), (name(4), name(3))])
    # The reference validates on the test pairs: moving i, fixed j, named fixed_moving.
    for pairs in (ds.val_pairs(), ds.test_pairs()):
        assert pairs.names == ("0006_0005",)
        np.testing.assert_allclose(pairs[0].moving, written[5][0] / 500.0, rtol=1e-6)
    with pytest.raises(ValueError, match="test_pairs_json"):
        data.create(config(name="abdomen_ct", root=str(tmp_path),
                           pairs_json=str(tmp_path / "pairs_train.json")), 0)


def test_abdomen_bad_json(tmp_path):
    fx.write_abdomen(str(tmp_path), np.random.default_rng(15))
    json_path = tmp_path / "AbdomenCTCT_dataset.json"
    json_path.write_text("{not json")
    with pytest.raises(ValueError, match="AbdomenCTCT_dataset.json"):
        data.create(config(name="abdomen_ct", root=str(tmp_path)), 0)
    json_path.write_text('{"training": []}')
    with pytest.raises(ValueError, match="registration_val"):
        data.create(config(name="abdomen_ct", root=str(tmp_path)), 0)
    json_path.unlink()
    with pytest.raises(FileNotFoundError, match="AbdomenCTCT_dataset.json"):
        data.create(config(name="abdomen_ct", root=str(tmp_path)), 0)


# --- synthetic phantom ------------------------------------------------------------------

def test_synthetic_deterministic_and_typed():
    cfg = config(img_size=(16, 20, 24), num_train=3, val_subjects=2)
    a, b = data.create(cfg, seed=0), data.create(cfg, seed=1)
    assert a.labels == tuple(range(1, 27)) and a.img_size == (16, 20, 24)
    pair_a, pair_b = a.val_pairs()[1], b.val_pairs()[1]
    check_pair_types(pair_a, (16, 20, 24))
    for field in ("moving", "fixed", "moving_seg", "fixed_seg"):
        np.testing.assert_array_equal(getattr(pair_a, field), getattr(pair_b, field))
    assert a.train_plan(0) != b.train_plan(0) or a.train_plan(1) != b.train_plan(1)
    sample = a.load_train(a.train_plan(0)[0])
    assert sample["fixed"].dtype == np.float32 and sample["fixed"].shape == (16, 20, 24)
    assert 0.0 <= sample["fixed"].min() and sample["fixed"].max() <= 1.0
    other = data.create(config(img_size=(16, 20, 24), num_train=3, phantom_seed=1), 0)
    assert not np.array_equal(other.val_pairs()[1].fixed, pair_a.fixed)


def test_synthetic_identity_dice_like_affine_aligned_brains():
    ds = data.create(config(img_size=(40, 44, 48), num_train=1, val_subjects=3), seed=0)
    _, atlas_seg = ds.atlas()
    # Every structure is visible but the 3rd ventricle, thinner than a voxel at this size.
    assert set(range(27)) - set(np.unique(atlas_seg).tolist()) <= {24}
    identity = [dice_np(p.moving_seg, p.fixed_seg, ds.labels).mean() for p in ds.val_pairs()]
    assert 0.25 < np.mean(identity) < 0.7, identity


def test_synthetic_subject_is_recoverable_by_a_smooth_field():
    # The subject is the atlas through a smooth map: warping the atlas labels with the
    # true displacement (in voxels) recovers the subject's labels far better than the
    # identity, up to the resampling error of small structures.
    shape = (64, 64, 64)
    ds = data.create(config(img_size=shape, num_train=1, val_subjects=1), seed=0)
    _, atlas_seg = ds.atlas()
    pair = ds.val_pairs()[0]
    rng = np.random.default_rng([0, 2, 0])  # the stream of validation subject 0
    points = phantom.transform(rng, shape, ds.deformation)
    voxel = [(p + 1.0) * (n - 1) / 2.0 for p, n in zip(points, shape)]  # atlas voxel coords
    warped = ndimage.map_coordinates(atlas_seg, np.stack(voxel), order=0, mode="constant")
    identity = dice_np(pair.moving_seg, pair.fixed_seg, ds.labels).mean()
    recovered = dice_np(warped, pair.fixed_seg, ds.labels).mean()
    assert recovered > 0.8 and recovered > identity + 0.15, (recovered, identity)
    disp = np.stack([v - g for v, g in zip(voxel, np.indices(shape))], axis=-1)
    jac = np.stack([np.stack(np.gradient(disp[..., k]), -1) for k in range(3)], -2)
    assert np.linalg.det(jac + np.eye(3)).min() > 0.2  # invertible, far from folding


def test_loading_is_thread_safe():
    ds = data.create(config(img_size=(16, 16, 16), num_train=6, augment=True), seed=0)
    plan = ds.train_plan(2)
    expected = [ds.load_train(item) for item in plan]
    fresh = data.create(config(img_size=(16, 16, 16), num_train=6, augment=True), seed=0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(fresh.load_train, plan))
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e["moving"], g["moving"])
        np.testing.assert_array_equal(e["fixed"], g["fixed"])


def test_synthetic_bad_config():
    with pytest.raises(ValueError, match="img_size"):
        data.create(config(num_train=2), 0)
    with pytest.raises(ValueError, match="img_size"):
        data.create(config(img_size=(4, 16, 16), num_train=2), 0)
