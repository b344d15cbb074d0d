"""Pixels: float [0, 1] ↔ uint8, PNG and JPEG bytes, image grids. torch loads only where a function takes a tensor
or encodes a JPEG, so a reader of shards (`vaegen show`) runs without it."""
from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from importlib.metadata import version
from typing import TYPE_CHECKING

import deflate
import numpy as np
from PIL import Image

from .data import open_user_image, pil_to_chw

if TYPE_CHECKING:
    import torch

# PNG: rows unfiltered (filter type 0 on every row) and one zlib stream per image from libdeflate. Both are part
# of the bytes: changing the level, the filter or the deflate package's version changes every PNG. Level 4 and no
# filter give files about as small as Pillow's zlib level 6 with adaptive filters on these small images, at
# several times its speed (bench/generate.py measures both).
PNG_DEFLATE_LEVEL = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {1: 0, 3: 2}          # channels -> PNG colour type (grey, RGB), 8 bits each
JPEG_QUALITY = 95                        # img2dataset's default


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] → uint8, rounded to nearest."""
    import torch
    return images.detach().clamp(0, 1).mul(255).round_().to(torch.uint8).cpu().numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    """One uint8 (C, H, W) image; C is 1 (grey) or 3 (RGB)."""
    return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


PNG_END = png_chunk(b"IEND", b"")
IDAT_CRC = zlib.crc32(b"IDAT")


def png_files(images: np.ndarray, level: int = PNG_DEFLATE_LEVEL) -> list[bytes]:
    """One deterministic PNG per uint8 (B, C, H, W) image, C = 1 (grey) or 3 (RGB): signature, IHDR, one IDAT,
    IEND, nothing else (no timestamps or text). The filtered rows of the whole batch are laid out once with NumPy;
    only the deflate and the IDAT crc32 (libdeflate's: zlib's value, faster) and the chunk framing are per image."""
    n, c, h, w = images.shape
    if c not in PNG_COLOUR_TYPES:
        raise ValueError(f"PNG images need 1 or 3 channels, got {c}")
    rows = np.zeros((n, h, 1 + w * c), np.uint8)            # column 0: each row's filter type, 0 (none)
    rows[:, :, 1:] = np.asarray(images).transpose(0, 2, 3, 1).reshape(n, h, w * c)
    head = PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, PNG_COLOUR_TYPES[c], 0, 0, 0))
    files = []
    for image_rows in rows:
        body = deflate.zlib_compress(image_rows.data, level)
        files.append(b"".join((head, struct.pack(">I", len(body)), b"IDAT", body,
                               struct.pack(">I", deflate.crc32(body, IDAT_CRC)), PNG_END)))
    return files


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 (C, H, W) image as PNG (png_files' encoder)."""
    return png_files(image[None])[0]


def png_encoder(level: int = PNG_DEFLATE_LEVEL) -> dict:
    """What makes png_files' bytes: recorded with the output so that its bytes can be explained and redone."""
    return {"format": "png", "deflate": "libdeflate", "package": f"deflate {version('deflate')}", "level": level,
            "filter": "none"}


def jpeg_files(images, quality: int = JPEG_QUALITY) -> list[bytes]:
    """One JPEG per uint8 (B, C, H, W) image (C = 1: a one-channel greyscale JPEG; C = 3: a colour JPEG) with
    torchvision's libjpeg-turbo encoder, on the host."""
    import torch
    batch = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"JPEG images must be uint8 (B, 1 or 3, H, W), got {batch.dtype} {tuple(batch.shape)}")
    _quiet_torchvision_codecs()
    from torchvision.io import encode_jpeg  # torchvision's image ops load on first use
    return [e.numpy().tobytes() for e in encode_jpeg(list(batch.cpu()), quality=quality)]


def _quiet_torchvision_codecs() -> None:
    """torchvision 0.29 marks its image codecs deprecated (in favour of torchcodec) and warns on every call; the
    encoder is still the one the project pins. Silenced by its message only, so other warnings still show, and
    only once a JPEG is encoded, so importing vaegen changes no warning filter."""
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)


def jpeg_encoder(quality: int = JPEG_QUALITY) -> dict:
    """What makes jpeg_files' bytes: the library, its package version and the quality."""
    import torchvision
    return {"format": "jpeg", "encoder": "libjpeg-turbo", "package": f"torchvision {torchvision.__version__}",
            "quality": quality}


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any image Pillow reads) bytes → uint8 (C, H, W), by pil_to_chw's rules."""
    with open_user_image(io.BytesIO(data)) as im:
        return pil_to_chw(im)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) → one (C, H', W') image, row-major, with a white border between tiles (make_grid's
    layout with pad_value=1: artifacts.grid_png says why white)."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid
