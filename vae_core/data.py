"""Dataset readers → uint8 arrays (N, C, H, W) + int64 labels. Parquet lives in cluster/, not here."""
from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .config import IMAGE_MODES
from .errors import VaegenError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class ArraySplit:
    images: np.ndarray                 # uint8 (N, C, H, W)
    labels: np.ndarray                 # int64 (N,)


@dataclass
class ArrayDataset:
    splits: dict[str, ArraySplit]
    label_names: tuple[str, ...]
    source: str
    notes: tuple[str, ...] = ()        # what reading changed about the input, for the user (16-bit scaled)


WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def is_wide(im: Image.Image) -> bool:
    """A grey image with more than 8 bits per pixel (16-bit PNG), which pil_to_chw scales down."""
    return im.mode in WIDE_GREY_MODES


@contextmanager
def bombs_refused() -> Iterator[None]:
    """Pillow's decompression-bomb warning (a header that claims more pixels than Image.MAX_IMAGE_PIXELS) raised as
    an error while images from outside are opened: around one image (open_user_image), or once around a task's many
    (cluster/data/shard_tasks.py), where entering and leaving the filter for each image would be a visible part of
    a small image's cost."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def bomb_error(error: object) -> VaegenError:
    return VaegenError(f"image too large to decode safely: {str(error).splitlines()[0]}")


@contextmanager
def open_user_image(source) -> Iterator[Image.Image]:
    """Image.open for an image from outside (a path or a file object). One whose header claims more pixels than
    Pillow's decompression-bomb limit is a VaegenError (Pillow would warn, or raise an error of its own that is
    neither an OSError nor a ValueError), before its pixels are decoded."""
    with bombs_refused():
        try:
            with Image.open(source) as im:
                yield im
        except BOMB_ERRORS as e:
            raise bomb_error(e) from None


def pil_to_chw(im: Image.Image) -> np.ndarray:
    """Any PIL image → uint8 (C, H, W): grey stays 1 channel, everything else becomes RGB.

    16-bit grey is scaled to 8 bits as round(v / 257) (0 → 0, 65535 → 255), never clipped; 32-bit integer
    images must hold 0..65535 and are scaled the same. Alpha (LA, RGBA, PA, a palette's transparency) is
    composited onto black: a fully transparent pixel is 0. Float images are refused."""
    if im.mode in WIDE_GREY_MODES:
        wide = np.asarray(im).astype(np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise VaegenError(f"a {im.mode} image holds values {wide.min()}..{wide.max()}, outside the 16-bit "
                              "range 0..65535 that vaegen scales to 8 bits")
        return ((wide + 128) // 257).astype(np.uint8)[None]
    if im.mode == "F":
        raise VaegenError("floating-point images are not supported: save them as 8- or 16-bit PNG")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("PA", "RGBa", "La"):
        im = im.convert("RGBA" if im.mode != "La" else "LA")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")
    arr = np.asarray(im)
    if im.mode in ("LA", "RGBA"):
        colour, alpha = arr[..., :-1].astype(np.uint16), arr[..., -1:].astype(np.uint16)
        arr = ((colour * alpha + 127) // 255).astype(np.uint8)
        arr = arr[..., 0] if im.mode == "LA" else arr
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


# --size: the image is scaled so that it covers H×W (its shorter side, relative to the target's, fits) and the
# middle H×W is kept. One PIL resize of just the kept box does both; BICUBIC is antialiased when it shrinks
# (its support widens with the scale) and reducing_gap first box-reduces a much larger image by an integer
# factor, as Image.thumbnail does, which is fast and leaves the result within a grey level or so of a plain
# BICUBIC resize.
RESIZE_FILTER = Image.Resampling.BICUBIC
RESIZE_REDUCING_GAP = 3.0


def shape_image(im: Image.Image, size: tuple[int, int] | None = None, mode: str | None = None) -> np.ndarray:
    """A PIL image → uint8 (C, H, W) by pil_to_chw's rules, then `mode` ('L': one grey channel, by PIL's
    ITU-R 601-2 luma; 'RGB': three; None: as pil_to_chw gives) and `size` ((H, W): scaled to cover it, then
    centre-cropped, see RESIZE_FILTER). A JPEG to be shrunk is decoded at a reduced scale that keeps at least
    RESIZE_REDUCING_GAP times the pixels the resize needs (its DCT does the first halvings, as Image.thumbnail
    lets it), which is several times faster on large photos."""
    if size is not None and im.format == "JPEG":
        scale = max(size[0] / im.height, size[1] / im.width)
        if scale * RESIZE_REDUCING_GAP < 1:
            im.draft(None, (math.ceil(im.width * scale * RESIZE_REDUCING_GAP),
                            math.ceil(im.height * scale * RESIZE_REDUCING_GAP)))
    if im.mode in IMAGE_MODES and mode in (None, im.mode) and size is not None:
        # The common case, resized by PIL before its one copy into NumPy: the same pixels shape_chw gives.
        return _chw(pil_array(_resize_cover_pil(im, size)))
    return shape_chw(pil_to_chw(im), size, mode)


def pil_array(im: Image.Image) -> np.ndarray:
    """np.asarray(im) of an 'L' or 'RGB' image, read-only, by way of tobytes: NumPy's array interface of a PIL image
    costs more than the copy it makes."""
    shape = (im.height, im.width) if im.mode == "L" else (im.height, im.width, 3)
    return np.frombuffer(im.tobytes(), np.uint8).reshape(shape)


def _chw(arr: np.ndarray) -> np.ndarray:
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def shape_chw(image: np.ndarray, size: tuple[int, int] | None = None, mode: str | None = None) -> np.ndarray:
    """uint8 (C, H, W), C = 1 or 3 → the same image in `mode` and at `size` (see shape_image)."""
    if mode not in (None, *IMAGE_MODES):
        raise VaegenError(f"--mode {mode!r} is not one of {', '.join(IMAGE_MODES)}")
    c, h, w = image.shape
    if mode == "RGB" and c == 1:
        image = np.repeat(image, 3, axis=0)
    elif mode == "L" and c == 3:
        grey = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).convert("L")
        image = np.asarray(grey)[None]
    if size is None or (h, w) == tuple(size):
        return image
    return resize_cover(image, size)


def resize_cover(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (C, H, W) scaled (up or down) so that it covers `size` = (H, W), then centre-cropped to it."""
    c = image.shape[0]
    pil = Image.fromarray(image[0] if c == 1 else np.ascontiguousarray(image.transpose(1, 2, 0)))
    return _chw(np.asarray(_resize_cover_pil(pil, size)))


def _resize_cover_pil(pil: Image.Image, size: tuple[int, int]) -> Image.Image:
    w, h = pil.size
    th, tw = size
    if (h, w) == (th, tw):
        return pil
    scale = max(th / h, tw / w)
    box_w, box_h = tw / scale, th / scale              # the part of the source that ends up in the output
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return pil.resize((tw, th), RESIZE_FILTER, box=(left, top, left + box_w, top + box_h),
                      reducing_gap=RESIZE_REDUCING_GAP)


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise VaegenError(f"missing dataset file: {path}")
    return gunzip_if_gzip(path.read_bytes(), path)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) of unsigned bytes: magic 0x0000 08 <ndim>."""
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), path)


def gunzip_if_gzip(raw: bytes, name: object) -> bytes:
    """The bytes of an IDX file as stored, gunzipped when they are gzip."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise VaegenError(f"corrupt gzip file {name}: {e}") from None


def parse_idx(data: bytes, path: object) -> np.ndarray:
    """IDX bytes (already gunzipped) → an array; `path` names the file in errors."""
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise VaegenError(f"{path} is not an IDX file of unsigned bytes (bad magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise VaegenError(f"{path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise VaegenError(f"{path} holds {len(data) - header} data bytes but its header {dims} needs {expected} "
                          "(truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_fashion_mnist(folder: str | os.PathLike = FASHION_MNIST_DIR) -> ArrayDataset:
    folder = Path(folder)
    if not folder.is_dir():
        raise VaegenError(f"Fashion-MNIST folder {folder} does not exist "
                          "(apt-get install dataset-fashion-mnist, or pass --source)")
    splits = {}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(folder / image_file), read_idx(folder / label_file)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise VaegenError(f"{split}: images {images.shape} and labels {labels.shape} do not match")
        if labels.max(initial=0) >= len(FASHION_MNIST_LABELS):
            raise VaegenError(f"{split}: label {labels.max()} is outside the 10 Fashion-MNIST classes")
        splits[split] = ArraySplit(images[:, None, :, :].copy(), labels.astype(np.int64))
    return ArrayDataset(splits, FASHION_MNIST_LABELS, str(folder))
