"""--size and --mode as pure functions on images: cover then centre crop, antialiased, grey/RGB conversions."""
import io

import numpy as np
import pytest
from PIL import Image

from vae_core.data import pil_to_chw, resize_cover, shape_chw, shape_image
from vae_core.errors import VaegenError


def halves(h: int, w: int) -> np.ndarray:
    """A (1, H, W) image: black on the left half of its columns, white on the right."""
    image = np.zeros((1, h, w), np.uint8)
    image[:, :, w // 2:] = 255
    return image


def test_a_wide_image_is_scaled_to_the_height_and_its_middle_kept():
    out = resize_cover(halves(20, 80), (10, 10))           # 20x80 → 10x40, the middle 10 columns kept
    assert out.shape == (1, 10, 10)
    assert (out[:, :, :4] < 20).all() and (out[:, :, 6:] > 235).all()   # the boundary stays in the middle


def test_a_tall_image_is_scaled_to_the_width_and_its_middle_rows_kept():
    image = np.zeros((1, 90, 30), np.uint8)
    image[:, 30:60] = 200                                    # only the middle third of the rows is lit
    out = resize_cover(image, (30, 30))
    assert out.shape == (1, 30, 30) and (np.abs(out.astype(int) - 200) <= 1).all()


def test_shrinking_is_antialiased_and_enlarging_works():
    stripes = np.tile(np.array([0, 255], np.uint8), (64, 32))[None]    # one-pixel vertical stripes
    small = resize_cover(stripes, (8, 8))
    assert np.abs(small.astype(int) - 128).max() <= 2                    # averaged, not aliased to 0 or 255
    big = resize_cover(np.full((3, 4, 4), 77, np.uint8), (9, 13))
    assert big.shape == (3, 9, 13) and (big == 77).all()


def test_mode_makes_grey_rgb_and_rgb_grey_by_pil_luma():
    rgb = np.zeros((3, 2, 2), np.uint8)
    rgb[0] = 255                                                          # pure red
    assert shape_chw(rgb, mode="L").tolist() == [[[76, 76], [76, 76]]]   # PIL: L = R * 299/1000 + ...
    grey = np.full((1, 2, 2), 9, np.uint8)
    assert shape_chw(grey, mode="RGB").shape == (3, 2, 2) and (shape_chw(grey, mode="RGB") == 9).all()
    assert shape_chw(grey) is grey                                        # nothing asked, nothing done
    with pytest.raises(VaegenError, match="--mode 'P' is not one of L, RGB"):
        shape_chw(grey, mode="P")


def test_a_16_bit_image_with_alpha_rules_then_size():
    wide = Image.fromarray(np.full((40, 40), 65535, np.uint16))
    assert (shape_image(wide, (10, 10)) == 255).all() and shape_image(wide, (10, 10)).shape == (1, 10, 10)


def test_a_large_jpeg_decoded_at_a_reduced_scale_stays_within_a_grey_level_or_two():
    y, x = np.mgrid[0:1200, 0:1600]
    photo = np.stack([(x // 7) % 256, (y // 5) % 256, ((x + y) // 11) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=95)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        fast = shape_image(im, (64, 64))
        assert im.size != (1600, 1200)                                    # the draft took effect
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        full = resize_cover(pil_to_chw(im), (64, 64))
    assert fast.shape == full.shape == (3, 64, 64)
    assert np.abs(fast.astype(int) - full).mean() < 2
