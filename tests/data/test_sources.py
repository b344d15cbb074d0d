"""Ingest sources: each input built with its own library (PIL, pyarrow, `datasets`, webdataset), planned and read
back through cluster.data.sources, locally and on S3 over HTTP."""
import io
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.data.shard_tasks import CheckedImages, IngestJob
from cluster.data.sources import IngestOptions, SourceItem, plan_source, read_item
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


def test_the_fingerprint_changes_with_a_file_and_only_then(tmp_path):
    make_class_folder(tmp_path)
    first = plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions()).fingerprint
    assert plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions()).fingerprint == first
    Image.fromarray(pattern(12, 10, 3, 99)).save(tmp_path / "dogs" / "1.png")      # rewritten in place
    os.utime(tmp_path / "dogs" / "1.png", ns=(1, 1))
    assert plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions()).fingerprint != first


def test_image_folder_split_option_names_the_split(tmp_path):
    make_class_folder(tmp_path)
    plan = plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions(split="val"))
    assert {i.split for i in plan.items} == {"val"}


def test_top_level_train_test_validation_folders_are_splits_with_classes_below(tmp_path):
    """As `datasets`' imagefolder reads them: split folders (val/ is validation), class folders below them, class
    names from every split; without classes below, the splits are unlabelled."""
    make_class_folder(tmp_path / "pets" / "train")
    make_class_folder(tmp_path / "pets" / "test", classes=("cats", "dogs"), per_class=2)
    make_class_folder(tmp_path / "pets" / "val", classes=("birds", "dogs"), per_class=1)
    plan = plan_source("image-folder", str(tmp_path / "pets"), LOCAL, IngestOptions(split="ignored"))
    assert plan.label_names == ("birds", "cats", "dogs")
    got = read_all(plan)
    assert list(got) == ["train", "validation", "test"]
    assert got["train"][1].tolist() == [1, 1, 1, 2, 2, 2] and got["test"][1].tolist() == [1, 1, 2, 2]
    assert got["validation"][1].tolist() == [0, 2] and got["test"][2][2].endswith("pets/test/dogs/0.png")
    assert np.array_equal(got["test"][0][3], pattern(12, 10, 3, 11).transpose(2, 0, 1))
    for split in ("train", "test"):
        (tmp_path / "flat" / split).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(pattern(8, 8, 1, i)).save(tmp_path / "flat" / split / f"{i}.png")
    flat = plan_source("image-folder", str(tmp_path / "flat"), LOCAL, IngestOptions())
    assert flat.label_names is None and {k: v[1].tolist() for k, v in read_all(flat).items()} == {
        "train": [-1, -1], "test": [-1, -1]}
    make_class_folder(tmp_path / "pets" / "extra")
    with pytest.raises(VaegenError, match="has a split folder \\(test/\\) and extra/cats/0.png outside any"):
        plan_source("image-folder", str(tmp_path / "pets"), LOCAL, IngestOptions())


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


def test_an_image_folder_takes_a_file_by_its_own_suffix_in_any_case(tmp_path):
    """A name's suffix is what follows its last '.', in any case; a '.' in a folder's name is no file's suffix."""
    (tmp_path / "v1.png").mkdir()
    Image.fromarray(pattern(8, 8, 3, 1)).save(tmp_path / "v1.png" / "SHOUT.PNG", format="PNG")
    (tmp_path / "v1.png" / "LICENSE").write_text("not an image: skipped")
    (tmp_path / "v1.png" / "scan.png.txt").write_text("not an image: skipped")
    plan = plan_source("image-folder", str(tmp_path), LOCAL, IngestOptions())
    assert [item.uri.rsplit("/", 1)[-1] for item in plan.items] == ["SHOUT.PNG"]
    assert plan.label_names == ("v1.png",)


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


def test_an_image_past_pillows_pixel_limit_is_refused_in_a_task_without_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)    # Pillow warns past it and raises only past twice it
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")     # 1,600 pixels: the warning's range
    checked = CheckedImages(IngestJob("image-folder", "ds", "g", LOCAL, IngestOptions(skip_bad=True), None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(checked.read([SourceItem("train", str(tmp_path / "big.png"))])) == []
    assert checked.bad == 1 and checked.examples[0]["error"].startswith("image too large to decode safely")
    assert caught == []                                       # the task made Pillow's warning its error


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
    assert np.array_equal(got[0], pixels)
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


# -- WebDataset tars ------------------------------------------------------------------------------------------
def write_shards(pattern_path: str, n: int, per_shard: int, image_ext="png", label=True, json_label=False,
                 channels=3):
    """n samples through webdataset.ShardWriter: {'__key__', image_ext, 'cls' and/or 'json'}."""
    import webdataset as wds
    pixels = np.stack([pattern(6, 7, channels, i) for i in range(n)])
    with wds.ShardWriter(pattern_path, maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            sample = {"__key__": f"sample{i:04d}", image_ext: png(pixels[i], "PNG" if image_ext == "png" else "PPM")}
            if label:
                sample["cls"] = i % 3
            if json_label:
                sample["json"] = {"label": (i + 1) % 3, "note": "x"}
            sink.write(sample)
    return pixels if channels == 1 else pixels.transpose(0, 3, 1, 2), [i % 3 for i in range(n)]


def test_webdataset_folder_file_and_brace_pattern_read_the_same_samples(tmp_path):
    pixels, labels = write_shards(str(tmp_path / "shards-%04d.tar"), 10, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards-0000.tar", "shards-0001.tar", "shards-0002.tar"]
    folder = plan_source("webdataset", str(tmp_path), LOCAL, IngestOptions())
    braces = plan_source("webdataset", str(tmp_path / "shards-{0000..0002}.tar"), LOCAL, IngestOptions())
    assert [i.uri for i in folder.items] == [i.uri for i in braces.items] and len(folder.items) == 3
    assert folder.label_names == ("0", "1", "2")
    got = read_all(folder)["train"]
    assert np.array_equal(got[0], pixels) and got[1].tolist() == labels
    assert got[2][5].endswith("shards-0001.tar:sample0005.png")
    one = read_all(plan_source("webdataset", str(tmp_path / "shards-0001.tar"), LOCAL, IngestOptions()))["train"]
    assert one[1].tolist() == labels[4:8]


def test_webdataset_keys_chosen_like_to_tuple(tmp_path):
    """--image-key 'png;ppm' takes the first extension a sample has; --label-key json reads its .json's label;
    '' leaves the data unlabelled, and tars without cls are unlabelled by default."""
    import webdataset as wds
    pixels, _ = write_shards(str(tmp_path / "a-%d.tar"), 4, 10, image_ext="ppm", label=False, json_label=True)
    options = IngestOptions(image_key="png;ppm", label_key="json")
    plan = plan_source("webdataset", str(tmp_path), LOCAL, options)
    got = read_all(plan, options=options)["train"]
    theirs = list(wds.WebDataset(str(tmp_path / "a-0.tar"), shardshuffle=False).decode("rgb8").to_tuple("png;ppm",
                                                                                                        "json"))
    assert [t[1]["label"] for t in theirs] == got[1].tolist() == [1, 2, 0, 1]
    assert np.array_equal(got[0], pixels) and np.array_equal(got[0][0], theirs[0][0].transpose(2, 0, 1))
    assert plan_source("webdataset", str(tmp_path), LOCAL, IngestOptions(image_key="ppm")).label_names is None
    unlabelled = IngestOptions(image_key="ppm", label_key="")
    assert read_all(plan_source("webdataset", str(tmp_path), LOCAL, unlabelled), options=unlabelled)["train"][1]\
        .tolist() == [-1] * 4


def test_a_labelled_dataset_is_labelled_in_every_tar_as_to_tuple_reads_it(tmp_path):
    """The first sample decides (or --label-key): a later tar whose samples have no cls is one line naming its
    sample and --label-key, as to_tuple("png", "cls") fails on it; --label-key '' reads every sample unlabelled,
    as to_tuple("png") does; --skip-bad skips the unlabelled ones. Labels found by the planning scan (no card)."""
    import webdataset as wds
    write_shards(str(tmp_path / "a-%d.tar"), 4, 10)
    write_shards(str(tmp_path / "b-%d.tar"), 2, 10, label=False)
    for name in ("a-0.tar", "b-0.tar"):
        os.rename(tmp_path / name, tmp_path / name.replace("-0", ""))
    plan = plan_source("webdataset", str(tmp_path), LOCAL, IngestOptions())
    assert plan.label_names == ("0", "1", "2") and {i.label_key for i in plan.items} == {"cls"}
    first_line = f"{tmp_path}/b.tar: sample sample0000 has no cls member \\(the first sample has a cls, so the " \
                 "dataset is labelled: --label-key cls\\); its keys: png. Give every sample one, or pass " \
                 "--label-key '' to ingest all of them unlabelled$"
    with pytest.raises(VaegenError, match=first_line):
        read_all(plan)
    with pytest.raises(ValueError, match="didn't find"):
        list(wds.WebDataset(str(tmp_path / "b.tar"), shardshuffle=False).to_tuple("png", "cls"))
    with pytest.raises(VaegenError, match="b.tar: sample sample0000 has no cls member \\(--label-key cls\\)"):
        read_all(plan, options=IngestOptions(label_key="cls"))
    unlabelled = IngestOptions(label_key="")
    plan = plan_source("webdataset", str(tmp_path), LOCAL, unlabelled)
    assert plan.label_names is None and read_all(plan, options=unlabelled)["train"][1].tolist() == [-1] * 6
    skip = IngestOptions(skip_bad=True)
    plan = plan_source("webdataset", str(tmp_path), LOCAL, skip)
    got = [list(read_item(plan.kind, item, LOCAL, skip)) for item in plan.items]
    assert [i.label for i in got[0]] == [0, 1, 2, 0] and [i.pixels is None for i in got[1]] == [True, True]
    assert got[1][0].error.startswith("no cls member (the first sample has a cls")
    os.rename(tmp_path / "a.tar", tmp_path / "c.tar")               # an unlabelled first sample: all unlabelled
    plan = plan_source("webdataset", str(tmp_path), LOCAL, IngestOptions())
    assert plan.label_names is None and read_all(plan)["train"][1].tolist() == [-1] * 6


def test_webdataset_errors_are_one_line(tmp_path):
    write_shards(str(tmp_path / "s-%d.tar"), 2, 10, image_ext="ppm")
    with pytest.raises(VaegenError, match="sample sample0000 has no png or jpg or jpeg member \\(--image-key\\); "
                                          "its keys: cls, ppm"):
        plan_source("webdataset", str(tmp_path), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="has no lbl member \\(--label-key\\); its keys: cls, ppm"):
        plan_source("webdataset", str(tmp_path), LOCAL, IngestOptions(image_key="ppm", label_key="lbl"))
    with pytest.raises(VaegenError, match="bad brace pattern .*unbalanced"):
        plan_source("webdataset", str(tmp_path / "s-{0..1.tar"), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="not a range of integers"):
        plan_source("webdataset", str(tmp_path / "s-{a..b}.tar"), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="s-1.tar \\(from the pattern .*\\) does not exist"):
        plan_source("webdataset", str(tmp_path / "s-{0..1}.tar"), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="missing does not exist"):
        plan_source("webdataset", str(tmp_path / "missing"), LOCAL, IngestOptions())
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaegenError, match="no WebDataset tars at"):
        plan_source("webdataset", str(tmp_path / "empty"), LOCAL, IngestOptions())


@pytest.mark.s3
def test_webdataset_brace_pattern_on_s3(tmp_path, s3_storage_config):
    import boto3
    pixels, labels = write_shards(str(tmp_path / "shards-%04d.tar"), 6, 3)
    client = boto3.client("s3", endpoint_url=s3_storage_config.s3_endpoint, region_name="us-east-1")
    prefix = s3_storage_config.root.removeprefix("s3://vaegen-test/") + "/wds"
    for path in tmp_path.glob("*.tar"):
        client.put_object(Bucket="vaegen-test", Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    uri = f"s3://vaegen-test/{prefix}/shards-{{0000..0001}}.tar"
    plan = plan_source("webdataset", uri, s3_storage_config, IngestOptions())
    got = read_all(plan, s3_storage_config)["train"]
    assert np.array_equal(got[0], pixels) and got[1].tolist() == labels and plan.label_names == ("0", "1", "2")


# -- vaegen's own outputs ingest back ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_jobs(starts_ray, small_fashion, tmp_path_factory):
    """Reconstructions of 8 real Fashion-MNIST test images (labelled, with the class names) in each output
    format, 2 shards each: {format: (job folder, manifest)}."""
    from conftest import start_local_ray
    from generate_support import publish_tiny_model

    from cluster.data.datasets import ingest
    from cluster.generate.driver import run_reconstruction
    from cluster.store.storage import open_storage
    from vae_core.data import ArrayDataset, ArraySplit
    from vae_core.use_configs import GenerateConfig
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("own-jobs") / "root"))
    storage = open_storage(cfg, for_writing=True)
    _, (images, labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(images[:8], labels[:8])}, FASHION_MNIST_LABELS, "t"),
           shard_rows=4, progress=False)
    model = publish_tiny_model(storage, "cond", num_classes=10)
    jobs = {}
    for fmt in ("parquet", "png", "jpeg"):
        spec = GenerateConfig(model=model, kind="reconstructions", dataset="fm", format=fmt)
        manifest = run_reconstruction(spec, cfg, workers=1, progress=False)
        jobs[fmt] = (os.path.join(cfg.root, manifest["prefix"]), manifest)
    return jobs, labels[:8].tolist()


@pytest.mark.parametrize("fmt, kind", [("parquet", "parquet"), ("parquet", "hf"), ("png", "webdataset"),
                                       ("jpeg", "webdataset")])
def test_vaegen_outputs_ingest_back_with_their_labels_and_class_names(own_jobs, fmt, kind):
    from generate_support import all_rows

    from cluster.store.storage import Storage
    jobs, labels = own_jobs
    folder, manifest = jobs[fmt]
    plan = plan_source(kind, folder, LOCAL, IngestOptions(image_key="png;jpg"))
    assert plan.label_names == FASHION_MNIST_LABELS and len(plan.items) == 2
    got = read_all(plan, options=IngestOptions(image_key="png;jpg"))
    assert list(got) == ["test"]                           # reconstructions of test: data/test-0000N-of-00002.*
    written = all_rows(Storage(StorageConfig(root=folder.rsplit("/outputs/", 1)[0])), manifest)
    assert got["test"][1].tolist() == labels == written["label"]
    assert np.array_equal(got["test"][0], np.stack(written["image"]))


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_rows_and_samples_are_named_or_skipped(tmp_path):
    good = png(pattern(4, 4, 3, 0))
    pq.write_table(pa.table({"image": [good, b"not an image", good], "label": [0, 1, 2]}), tmp_path / "t.parquet")
    plan = plan_source("parquet", str(tmp_path / "t.parquet"), LOCAL, IngestOptions())
    with pytest.raises(VaegenError, match="cannot read image .*t.parquet row 1: cannot identify image file"):
        read_all(plan)
    pq.write_table(pa.table({"image": [good, b"not an image", good], "label": [0, 1, None]}), tmp_path / "t.parquet")
    with pytest.raises(VaegenError, match="t.parquet: label column 'label' has 1 empty value"):   # the footer says so
        plan_source("parquet", str(tmp_path / "t.parquet"), LOCAL, IngestOptions())
    plan = plan_source("parquet", str(tmp_path / "t.parquet"), LOCAL, IngestOptions(skip_bad=True))
    skipped = list(read_item(plan.kind, plan.items[0], LOCAL, IngestOptions(skip_bad=True)))
    assert [i.pixels is None for i in skipped] == [False, True, True]
    assert skipped[2].error == "label None is not an integer >= 0"
    import webdataset as wds
    with wds.ShardWriter(str(tmp_path / "w-%d.tar"), maxcount=10, verbose=0) as sink:
        sink.write({"__key__": "a", "png": good, "cls": 0})
        sink.write({"__key__": "b", "png": good[:30], "cls": 1})
        sink.write({"__key__": "c", "jpg": b"\xff\xd8 broken", "cls": 1})
        sink.write({"__key__": "d", "txt": b"no image", "cls": 2})
    plan = plan_source("webdataset", str(tmp_path / "w-0.tar"), LOCAL, IngestOptions())
    skipped = list(read_item(plan.kind, plan.items[0], LOCAL, IngestOptions(skip_bad=True)))
    assert [(i.name.rsplit(":", 1)[1], i.pixels is None) for i in skipped] == [
        ("a.png", False), ("b.png", True), ("c.jpg", True), ("d", True)]
    assert skipped[3].error == "no png or jpg or jpeg member; its keys: cls, txt"
    with pytest.raises(VaegenError, match="cannot read image .*w-0.tar:b.png"):
        list(read_item(plan.kind, plan.items[0], LOCAL, IngestOptions()))


def test_a_truncated_tar_and_a_bad_split_name_are_one_line(tmp_path):
    write_shards(str(tmp_path / "t-%d.tar"), 3, 10)
    data = (tmp_path / "t-0.tar").read_bytes()
    (tmp_path / "t-0.tar").write_bytes(data[:700])
    with pytest.raises(VaegenError, match="cannot read tar .*t-0.tar: "):
        plan = plan_source("webdataset", str(tmp_path / "t-0.tar"), LOCAL, IngestOptions())
        read_all(plan)
    hf_split(2, 0)[0].to_parquet(tmp_path / "hub" / "data" / "my split-00000-of-00001.parquet")
    with pytest.raises(VaegenError, match="its files name a split 'my split', which is not a valid name"):
        plan_source("hf", str(tmp_path / "hub"), LOCAL, IngestOptions())


@pytest.mark.s3
def test_fashion_mnist_layout_on_s3(tmp_path, s3_storage_config):
    """IDX files (gzipped, as distributed) under an S3 prefix read like the local folder."""
    import gzip

    import boto3
    images = np.stack([pattern(28, 28, 1, i) for i in range(5)])
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    client = boto3.client("s3", endpoint_url=s3_storage_config.s3_endpoint, region_name="us-east-1")
    prefix = s3_storage_config.root.removeprefix("s3://vaegen-test/") + "/fm"
    for image_file, label_file in (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                                   ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")):
        idx_images = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes()
        idx_labels = bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels.tobytes()
        client.put_object(Bucket="vaegen-test", Key=f"{prefix}/{image_file}", Body=gzip.compress(idx_images))
        client.put_object(Bucket="vaegen-test", Key=f"{prefix}/{label_file}", Body=gzip.compress(idx_labels))
    plan = plan_source("fashion-mnist", f"s3://vaegen-test/{prefix}", s3_storage_config, IngestOptions())
    got = read_all(plan, s3_storage_config)
    assert np.array_equal(got["test"][0][:, 0], images) and got["train"][1].tolist() == [3, 1, 4, 1, 5]


def test_a_vaegen_dataset_folder_ingests_back_as_it_is(tmp_path):
    """A dataset ingest wrote (its readable view: pixels + the image shape and ClassLabel names in the metadata)
    is itself a Parquet source with the same splits, rows, labels and class names."""
    from cluster.data.ingest import ingest_source
    make_class_folder(tmp_path / "pets")
    root = StorageConfig(root=str(tmp_path / "root"))
    ingest_source("image-folder", str(tmp_path / "pets"), root, name="pets", progress=False)
    original = read_all(plan_source("image-folder", str(tmp_path / "pets"), LOCAL, IngestOptions()))["train"]
    plan = plan_source("parquet", str(tmp_path / "root" / "datasets" / "pets"), LOCAL, IngestOptions())
    assert plan.label_names == ("cats", "dogs")
    again = read_all(plan)["train"]
    assert np.array_equal(again[0], original[0]) and again[1].tolist() == original[1].tolist()
    for i in range(2):
        Image.fromarray(pattern(5, 5, 1, i)).save(tmp_path / f"flat{i}.png")
    (tmp_path / "flat").mkdir()
    for p in tmp_path.glob("flat?.png"):
        p.rename(tmp_path / "flat" / p.name)
    ingest_source("image-folder", str(tmp_path / "flat"), root, name="flat", progress=False)
    folder = str(tmp_path / "root" / "datasets" / "flat")
    with pytest.raises(VaegenError, match="label -1 in column 'label'.*unlabelled data: --label-column ''"):
        plan_source("parquet", folder, LOCAL, IngestOptions())
    unlabelled = IngestOptions(label_column="")
    plan = plan_source("parquet", folder, LOCAL, unlabelled)
    assert plan.label_names is None and read_all(plan, options=unlabelled)["train"][0].shape == (2, 1, 5, 5)


@pytest.mark.s3
def test_vaegen_ingest_of_images_under_an_s3_prefix_into_an_s3_root(tmp_path, s3_storage_config, capsys):
    """The CLI end to end: a prefix of images on S3, resized and made grey, into a dataset on S3."""
    import boto3

    from cluster.data.datasets import read_manifest, read_split
    from cluster.store.storage import open_storage
    from jobs.cli import main as vaegen
    make_class_folder(tmp_path / "pets", size=(20, 30))
    client = boto3.client("s3", endpoint_url=s3_storage_config.s3_endpoint, region_name="us-east-1")
    prefix = s3_storage_config.root.removeprefix("s3://vaegen-test/") + "-input/pets"
    for path in sorted((tmp_path / "pets").rglob("*.png")):
        client.put_object(Bucket="vaegen-test", Key=f"{prefix}/{path.parent.name}/{path.name}",
                          Body=path.read_bytes())
    code = vaegen(["ingest", "image-folder", f"s3://vaegen-test/{prefix}", "--size", "16x16", "--mode", "L",
                   "--split", "val", "--root", s3_storage_config.root, "--s3-endpoint", s3_storage_config.s3_endpoint,
                   "--no-progress"])
    assert code == 0, capsys.readouterr().err
    storage = open_storage(s3_storage_config)
    manifest = read_manifest(storage, "pets")
    assert manifest["label_names"] == ["cats", "dogs"] and list(manifest["splits"]) == ["val"]
    rows = read_split(storage, "pets", "val")
    assert rows.images.shape == (6, 1, 16, 16) and rows.labels.tolist() == [0, 0, 0, 1, 1, 1]
