"""Pixels: float [0, 1] ↔ uint8, PNG bytes, image grids and a small loss-curve plot (Pillow only)."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data import pil_to_chw

CURVE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [0, 1] → uint8, rounded to nearest."""
    return images.detach().clamp(0, 1).mul(255).round_().to(torch.uint8).cpu().numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    """One uint8 (C, H, W) image; C is 1 (grey) or 3 (RGB)."""
    return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Deterministic PNG (no timestamps or text chunks) for one uint8 (C, H, W) image."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any image Pillow reads) bytes → uint8 (C, H, W), by pil_to_chw's rules."""
    with Image.open(io.BytesIO(data)) as im:
        return pil_to_chw(im)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) → one (C, H', W') image, row-major, with a white border between tiles."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def curves_png(series: Mapping[str, Sequence[float]], title: str = "loss per image (nats)",
               size: tuple[int, int] = (640, 400)) -> bytes:
    """A line plot of a few named series against epoch, with a legend and the y range labelled."""
    width, height = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [v for s in series.values() for v in s if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    longest = max((len(s) for s in series.values()), default=1)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = height - bottom - frac * (height - top - bottom)
        draw.text((4, y - 6), f"{lo + frac * (hi - lo):.1f}", fill="black")
    draw.text((width // 2 - 20, height - bottom + 12), f"epoch (1..{longest})", fill="black")

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (i / max(longest - 1, 1)) * (width - left - right)
        return x, height - bottom - (v - lo) / (hi - lo) * (height - top - bottom)

    for k, (name, s) in enumerate(series.items()):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        pts = [point(i, v) for i, v in enumerate(s) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        lx, ly = width - right - 150, top + 14 + 14 * k
        draw.line([(lx, ly), (lx + 16, ly)], fill=colour, width=2)                  # legend swatch
        draw.text((lx + 22, ly - 6), name, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
