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


def test_flat_image_folder_is_unlabelled(tmp_path):
    for i in range(3):
        Image.fromarray(pattern(8, 8, 1, i)).save(tmp_path / f"img{i}.png")
    plan = plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions())
    assert plan.label_names is None
    pixels, labels, _ = read_all(plan)["train"]
    assert pixels.shape == (3, 1, 8, 8) and labels.tolist() == [-1, -1, -1]


def test_image_folder_with_images_at_top_and_in_subfolders_is_one_line(tmp_path):
    make_class_folder(tmp_path)
    Image.fromarray(pattern(12, 10, 3, 0)).save(tmp_path / "stray.png")
    with pytest.raises(VaegenError, match="both at its top .*stray.png.* and in subfolders"):
        plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions())


def test_image_folder_reads_any_pillow_format_by_pil_to_chw_rules(tmp_path):
    """JPEG, BMP, WebP, TIFF, GIF; 16-bit grey scaled by round(v / 257); alpha composited onto black."""
    (tmp_path / "a").mkdir()
    rgb = pattern(8, 8, 3, 1)
    for fmt in ("bmp", "webp", "tiff", "gif"):
        Image.fromarray(rgb[..., 0]).save(tmp_path / "a" / f"grey.{fmt}")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "a" / "wide.png")
    rgba = np.dstack([np.full((8, 8, 3), 200, np.uint8), np.full((8, 8), 0, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a" / "clear.png")
    Image.fromarray(rgb).save(tmp_path / "a" / "photo.jpg", quality=95)
    (tmp_path / "a" / "notes.txt").write_text("not an image: skipped")
    plan = plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions())
    images = {i.name.rsplit("/", 1)[-1]: i.pixels for item in plan.items for i in read_item(plan.kind, item, LOCAL,
                                                                                              IngestOptions())}
    assert sorted(images) == ["clear.png", "grey.bmp", "grey.gif", "grey.tiff", "grey.webp", "photo.jpg", "wide.png"]
    assert np.array_equal(images["grey.bmp"], rgb[None, ..., 0]) and np.array_equal(images["grey.tiff"],
                                                                                      rgb[None, ..., 0])
    assert images["wide.png"].shape == (1, 8, 8) and (images["wide.png"] == 255).all()
    assert images["clear.png"].shape == (3, 8, 8) and (images["clear.png"] == 0).all()
    assert images["photo.jpg"].shape == (3, 8, 8)
    assert np.abs(images["photo.jpg"].astype(int) - rgb.transpose(2, 0, 1)).mean() < 8


def test_size_and_mode_shape_every_image_and_mixed_sizes_come_out_one_shape(tmp_path):
    (tmp_path / "x").mkdir()
    Image.fromarray(np.full((40, 20, 3), 90, np.uint8)).save(tmp_path / "x" / "tall.png")
    Image.fromarray(np.full((10, 30), 90, np.uint8)).save(tmp_path / "x" / "wide.png")
    options = IngestOptions(size=(16, 16), mode="L")
    plan = plan_source("image-folder", str(tmp_path), LOCAL, options)
    pixels, _, _ = read_all(plan, options=options)["train"]
    assert pixels.shape == (2, 1, 16, 16) and (np.abs(pixels.astype(int) - 90) <= 1).all()


def test_a_corrupt_image_is_one_line_or_skipped_with_skip_bad(tmp_path):
    make_class_folder(tmp_path, per_class=2)
    (tmp_path / "cats" / "broken.png").write_bytes(png(pattern(12, 10, 3, 0))[:60])
    plan = plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="cannot read image .*cats/broken.png: "):
        read_all(plan)
    options = IngestOptions(skip_bad=True)
    images = [i for item in plan.items for i in read_item(plan.kind, item, LOCAL, options)]
    bad = [i for i in images if i.pixels is None]
    assert len(images) == 5 and len(bad) == 1 and bad[0].name.endswith("broken.png") and bad[0].error
    assert "\n" not in bad[0].error and bad[0].label == 0


@pytest.mark.s3
def test_image_folder_under_an_s3_prefix_reads_like_a_local_one(tmp_path, s3_storage_config):
    import boto3
    make_class_folder(tmp_path / "pets")
    client = boto3.client("s3", endpoint_url=s3_storage_config.s3_endpoint, region_name="us-east-1")
    prefix = s3_storage_config.root.removeprefix("s3://vaegen-test/") + "/pets"
    for path in sorted((tmp_path / "pets").rglob("*.png")):
        client.put_object(Bucket="vaegen-test", Key=f"{prefix}/{path.parent.name}/{path.name}",
                          Body=path.read_bytes())
    uri = f"s3://vaegen-test/{prefix}"
    plan = plan_source("image-folder", uri, s3_storage_config, IngestOptions())
    local = plan_source("image-folder", str(tmp_path / "pets"), LOCAL, IngestOptions())
    assert plan.label_names == ("cats", "dogs") and plan.items[0].uri == f"{uri}/cats/0.png"
    got, want = read_all(plan, s3_storage_config)["train"], read_all(local)["train"]
    assert np.array_equal(got[0], want[0]) and got[1].tolist() == want[1].tolist()
    with pytest.raises(VaegenError, match="holds no images"):
        plan_source("image-folder", f"{uri}-nothing-here", s3_storage_config, IngestOptions())


# -- Hugging Face datasets on disk -----------------------------------------------------------------------------
def hf_split(n: int, seed: int, labelled=True, image="image", label="label", names=("shirt", "shoe", "bag")):
    """A `datasets` Dataset of n RGB images (Image feature) and, if labelled, ClassLabel labels."""
    import datasets
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
    columns = {image: [Image.fromarray(p) for p in pixels]}
    if labelled:
        columns[label] = rng.integers(0, len(names), n).tolist()
    ds = datasets.Dataset.from_dict(columns).cast_column(image, datasets.Image())
    if labelled:
        ds = ds.cast_column(label, datasets.ClassLabel(names=list(names)))
    return ds, pixels.transpose(0, 3, 1, 2), columns.get(label)


def test_hub_layout_splits_come_from_file_names_as_datasets_finds_them(tmp_path):
    import datasets
    (train, train_px, train_y), (test, test_px, test_y) = hf_split(50, 0), hf_split(10, 1)
    train.to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    test.to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    theirs = datasets.load_dataset(str(tmp_path))
    for kind in ("hf", "parquet"):              # a Hub-style folder no longer merges test into train
        plan = plan_source(kind, str(tmp_path), LOCAL, IngestOptions())
        assert plan.label_names == ("shirt", "shoe", "bag") == tuple(theirs["train"].features["label"].names)
        got = read_all(plan)
        assert sorted(got) == sorted(theirs) == ["test", "train"]
        assert np.array_equal(got["train"][0], train_px) and got["train"][1].tolist() == train_y
        assert np.array_equal(got["test"][0], test_px) and got["test"][1].tolist() == test_y == theirs["test"]["label"]


def test_hub_layout_split_names_beyond_train_and_test(tmp_path):
    for split, n in (("train", 3), ("validation", 2), ("extra", 1)):
        hf_split(n, n)[0].to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    plan = plan_source("hf", str(tmp_path), LOCAL, IngestOptions())
    assert [i.split for i in plan.items] == ["train", "validation", "extra"]


def test_keyword_folders_name_splits_when_there_is_no_sharded_layout(tmp_path):
    hf_split(4, 0)[0].to_parquet(tmp_path / "training" / "part.parquet")
    hf_split(2, 1)[0].to_parquet(tmp_path / "eval" / "part.parquet")
    plan = plan_source("hf", str(tmp_path), LOCAL, IngestOptions())
    assert [(i.split, i.stop) for i in plan.items] == [("train", 4), ("test", 2)]


def test_hf_image_and_label_columns_by_name_and_unlabelled_data(tmp_path):
    ds, pixels, labels = hf_split(5, 2, image="picture", label="kind")
    ds.to_parquet(tmp_path / "named.parquet")
    options = IngestOptions(image_column="picture", label_column="kind")
    plan = plan_source("hf", str(tmp_path / "named.parquet"), LOCAL, options)
    got = read_all(plan, options=options)["train"]
    assert plan.label_names == ("shirt", "shoe", "bag") and got[1].tolist() == labels
    unlabelled = IngestOptions(image_column="picture", label_column="")
    plan = plan_source("hf", str(tmp_path / "named.parquet"), LOCAL, unlabelled)
    assert plan.label_names is None and read_all(plan, options=unlabelled)["train"][1].tolist() == [-1] * 5
    hf_split(4, 3, labelled=False)[0].to_parquet(tmp_path / "bare" / "train.parquet")
    plan = plan_source("hf", str(tmp_path / "bare"), LOCAL, IngestOptions())
    assert plan.label_names is None and np.array_equal(read_all(plan)["train"][0], hf_split(4, 3, False)[1])
    with pytest.raises(VaegenError, match="no column 'pic' \\(--image-column\\); it has: picture, kind"):
        plan_source("hf", str(tmp_path / "named.parquet"), LOCAL, IngestOptions(image_column="pic"))


def test_save_to_disk_folders_read_as_their_dataset(tmp_path):
    import datasets
    (train, train_px, train_y), (test, _, test_y) = hf_split(6, 0), hf_split(3, 1)
    train.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    plan = plan_source("hf", str(tmp_path / "one"), LOCAL, IngestOptions())
    got = read_all(plan)
    assert plan.label_names == ("shirt", "shoe", "bag") and np.array_equal(got["train"][0], train_px)
    got = read_all(plan_source("hf", str(tmp_path / "both"), LOCAL, IngestOptions()))
    assert got["train"][1].tolist() == train_y and got["test"][1].tolist() == test_y


@pytest.mark.s3
def test_hub_layout_on_s3(tmp_path, s3_storage_config):
    import boto3
    (train, train_px, train_y), (test, _, test_y) = hf_split(8, 0), hf_split(4, 1)
    train.to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    test.to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    client = boto3.client("s3", endpoint_url=s3_storage_config.s3_endpoint, region_name="us-east-1")
    prefix = s3_storage_config.root.removeprefix("s3://vaegen-test/") + "/hub"
    for path in (tmp_path / "data").iterdir():
        client.put_object(Bucket="vaegen-test", Key=f"{prefix}/data/{path.name}", Body=path.read_bytes())
    plan = plan_source("hf", f"s3://vaegen-test/{prefix}", s3_storage_config, IngestOptions())
    got = read_all(plan, s3_storage_config)
    assert plan.label_names == ("shirt", "shoe", "bag") and np.array_equal(got["train"][0], train_px)
    assert got["train"][1].tolist() == train_y and got["test"][1].tolist() == test_y
