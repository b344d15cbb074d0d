"""Ingest sources: each input built with its own library (PIL, pyarrow, `datasets`, webdataset), planned and read
back through cluster.data.sources, locally and on S3 over HTTP."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.data.sources import IngestOptions, plan_source, read_item
from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_DIR, FASHION_MNIST_LABELS
from vae_core.errors import VaegenError

LOCAL = StorageConfig(root="/nonexistent-root-unused")      # sources name their own URIs; the root is not read


def read_all(plan, cfg=LOCAL, options=None):
    """Every image of a plan: {split: (pixels (N, C, H, W), labels, names)}."""
    out, options = {}, options or IngestOptions()
    for item in plan.items:
        for image in read_item(plan.kind, item, cfg, options):
            pixels, labels, names = out.setdefault(item.split, ([], [], []))
            pixels.append(image.pixels)
            labels.append(image.label)
            names.append(image.name)
    return {k: (np.stack(p), np.array(y), n) for k, (p, y, n) in out.items()}


def png(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def pattern(h, w, c, value):
    """A (H, W[, C]) uint8 test image whose pixels depend on `value`."""
    base = ((np.arange(h * w).reshape(h, w) + value * 37) % 256).astype(np.uint8)
    return base if c == 1 else np.stack([base, 255 - base, base // 2], -1)


# -- Fashion-MNIST -------------------------------------------------------------------------------------------
def test_fashion_mnist_plans_row_ranges_and_reads_the_same_images_as_the_idx_reader(fashion_mnist):
    plan = plan_source("fashion-mnist", None, LOCAL, IngestOptions())
    assert plan.label_names == FASHION_MNIST_LABELS
    assert [(i.split, i.start, i.stop) for i in plan.items][:2] == [("train", 0, 10_000), ("train", 10_000, 20_000)]
    assert sum(i.stop - i.start for i in plan.items) == 70_000
    last = plan.items[-1]
    images = list(read_item(plan.kind, last, LOCAL, IngestOptions()))
    expected = fashion_mnist.splits["test"]
    assert np.array_equal(np.stack([i.pixels for i in images]), expected.images[last.start:last.stop])
    assert [i.label for i in images] == expected.labels[last.start:last.stop].tolist()
    assert plan_source("fashion-mnist", FASHION_MNIST_DIR, LOCAL, IngestOptions()).fingerprint == plan.fingerprint


def test_fashion_mnist_resized_to_rgb_changes_the_fingerprint():
    options = IngestOptions(size=(32, 32), mode="RGB")
    plan = plan_source("fashion-mnist", None, LOCAL, options)
    image = next(read_item(plan.kind, plan.items[0], LOCAL, options))
    assert image.pixels.shape == (3, 32, 32) and image.pixels.dtype == np.uint8
    assert plan.fingerprint != plan_source("fashion-mnist", None, LOCAL, IngestOptions()).fingerprint


def test_fashion_mnist_missing_folder_or_file_is_one_line(tmp_path):
    with pytest.raises(VaegenError, match="Fashion-MNIST folder .* does not exist"):
        plan_source("fashion-mnist", str(tmp_path / "nope"), LOCAL, IngestOptions())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(VaegenError, match="missing dataset file: .*train-labels-idx1-ubyte.gz"):
        plan_source("fashion-mnist", str(tmp_path), LOCAL, IngestOptions())


# -- image folders ---------------------------------------------------------------------------------------------
def make_class_folder(root, classes=("cats", "dogs"), per_class=3, size=(12, 10), fmt="png"):
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(pattern(*size, 3, 10 * label + i)).save(root / cls / f"{i}.{fmt}")


def test_labelled_image_folder_reads_classes_from_subfolders(tmp_path):
    make_class_folder(tmp_path / "pets")
    plan = plan_source("image-folder", str(tmp_path / "pets"), LOCAL, IngestOptions())
    assert plan.kind == "image-folder" and plan.label_names == ("cats", "dogs")
    pixels, labels, names = read_all(plan)["train"]
    assert pixels.shape == (6, 3, 12, 10) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert names[0].endswith("pets/cats/0.png")
    assert np.array_equal(pixels[4], pattern(12, 10, 3, 11).transpose(2, 0, 1))


def test_image_folder_split_option_names_the_split(tmp_path):
    make_class_folder(tmp_path)
    plan = plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions(split="val"))
    assert {i.split for i in plan.items} == {"val"}


def test_empty_or_missing_image_folder_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(VaegenError, match="holds no images"):
        plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="does not exist"):
        plan_source("image-folder", str(tmp_path / "nope"), LOCAL, IngestOptions())


# -- Parquet ----------------------------------------------------------------------------------------------------
def test_parquet_with_pixels_and_shape_columns_reads_as_before(tmp_path):
    images = np.stack([pattern(4, 5, 1, i) for i in range(7)])[:, None]
    table = pa.table({"pixels": [im.tobytes() for im in images], "height": [4] * 7, "width": [5] * 7,
                      "channels": [1] * 7, "label": [0, 1, 2, 0, 1, 2, 2]})
    pq.write_table(table, tmp_path / "mine.parquet", row_group_size=3)
    plan = plan_source("parquet", str(tmp_path / "mine.parquet"), LOCAL, IngestOptions())
    assert plan.label_names == ("0", "1", "2")
    pixels, labels, names = read_all(plan)["train"]
    assert np.array_equal(pixels, images) and labels.tolist() == [0, 1, 2, 0, 1, 2, 2]
    assert names[3].endswith("mine.parquet row 3")


def test_parquet_with_png_image_column_reads_as_before(tmp_path):
    images = [pattern(6, 6, 3, i) for i in range(4)]
    pq.write_table(pa.table({"image": [png(im) for im in images], "label": [1, 0, 1, 0]}), tmp_path / "a.parquet")
    plan = plan_source("parquet", str(tmp_path), LOCAL, IngestOptions())
    pixels, labels, _ = read_all(plan)["train"]
    assert np.array_equal(pixels, np.stack(images).transpose(0, 3, 1, 2)) and labels.tolist() == [1, 0, 1, 0]


def test_parquet_row_ranges_split_a_big_file_into_items(tmp_path, monkeypatch):
    from cluster.data import source_parquet
    monkeypatch.setattr(source_parquet, "ROWS_PER_ITEM", 4)
    pq.write_table(pa.table({"image": [png(pattern(3, 3, 1, i)) for i in range(10)], "label": list(range(10))}),
                   tmp_path / "a.parquet", row_group_size=3)
    plan = plan_source("parquet", str(tmp_path), LOCAL, IngestOptions())
    assert [(i.start, i.stop) for i in plan.items] == [(0, 4), (4, 8), (8, 10)]
    assert read_all(plan)["train"][1].tolist() == list(range(10))


def test_parquet_without_an_image_column_names_the_columns(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "a.parquet")
    with pytest.raises(VaegenError, match="no image column.*columns: img, label"):
        plan_source("parquet", str(tmp_path), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="no column 'y' \\(--label-column\\); it has: img, label"):
        plan_source("parquet", str(tmp_path), LOCAL, IngestOptions(image_column="img", label_column="y"))
