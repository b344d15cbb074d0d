"""Readers (IDX, image folder) and ingest into Parquet shards, locally and on S3 over HTTP."""
import gzip
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from cluster.datasets import bind_model_to_dataset, read_manifest, read_split
from cluster.ingest import ingest_source
from cluster.storage import open_storage
from vae_core.config import ModelConfig
from vae_core.data import FASHION_MNIST_DIR, read_idx, read_image_folder
from vae_core.errors import VaegenError


def test_fashion_mnist_reads_as_uint8_images_and_labels(fashion_mnist):
    train, test = fashion_mnist.splits["train"], fashion_mnist.splits["test"]
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == np.uint8 and set(np.unique(train.labels)) == set(range(10))
    assert fashion_mnist.label_names[9] == "Ankle boot"


def write_idx(path, magic_dims: int, dims, payload: bytes, gz: bool = True):
    header = bytes([0, 0, 8, magic_dims]) + b"".join(d.to_bytes(4, "big") for d in dims)
    raw = header + payload
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_round_trip_plain_and_gzipped(tmp_path):
    write_idx(tmp_path / "a.gz", 3, (2, 2, 3), bytes(range(12)))
    write_idx(tmp_path / "b", 1, (4,), bytes([1, 2, 3, 4]), gz=False)
    assert read_idx(tmp_path / "a.gz").tolist() == np.arange(12).reshape(2, 2, 3).tolist()
    assert read_idx(tmp_path / "b").tolist() == [1, 2, 3, 4]


def test_idx_with_bad_magic_is_refused(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(VaegenError, match="bad magic 00000d03"):
        read_idx(tmp_path / "bad")


def test_truncated_idx_is_refused(tmp_path):
    write_idx(tmp_path / "short.gz", 3, (10, 28, 28), bytes(100))
    with pytest.raises(VaegenError, match="truncated or corrupt"):
        read_idx(tmp_path / "short.gz")


def test_truncated_gzip_is_refused(tmp_path):
    real = open(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz", "rb").read()
    (tmp_path / "cut.gz").write_bytes(real[: len(real) // 2])
    with pytest.raises(VaegenError, match="corrupt gzip"):
        read_idx(tmp_path / "cut.gz")


def make_folder(root, sizes):
    for cls, size in sizes.items():
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")


def test_image_folder_reads_classes_from_subfolders(tmp_path):
    make_folder(tmp_path, {"cats": (32, 32), "dogs": (32, 32)})
    data = read_image_folder(tmp_path)
    assert data.label_names == ("cats", "dogs")
    assert data.splits["train"].images.shape == (6, 3, 32, 32)
    assert data.splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_of_mixed_shapes_is_refused(tmp_path):
    make_folder(tmp_path, {"a": (32, 32), "b": (16, 16)})
    with pytest.raises(VaegenError, match="images differ in shape"):
        read_image_folder(tmp_path)


def test_missing_dataset_path_is_refused(tmp_path):
    with pytest.raises(VaegenError, match="does not exist"):
        ingest_source("fashion-mnist", str(tmp_path / "nope"), open_storage_cfg(tmp_path))


def open_storage_cfg(tmp_path):
    from vae_core.config import StorageConfig
    return StorageConfig(root=str(tmp_path / "root"))


def test_ingest_writes_shards_matching_the_manifest(storage_config):
    manifest = ingest_source("fashion-mnist", None, storage_config, shard_rows=25_000, progress=False)
    storage = open_storage(storage_config)
    assert read_manifest(storage, "fashion-mnist") == json.loads(json.dumps(manifest))
    train = manifest["splits"]["train"]
    assert train["rows"] == 60000 and [s["rows"] for s in train["shards"]] == [25000, 25000, 10000]
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            body = storage.read_bytes(f"datasets/fashion-mnist/{split}/{shard['name']}")
            assert hashlib.sha256(body).hexdigest() == shard["sha256"] and len(body) == shard["bytes"]
    test = read_split(storage, "fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.ids.tolist() == list(range(10000))


def test_ingested_pixels_equal_the_source(local_storage_config, fashion_mnist):
    ingest_source("fashion-mnist", None, local_storage_config, progress=False)
    test = read_split(open_storage(local_storage_config), "fashion-mnist", "test")
    assert np.array_equal(test.images, fashion_mnist.splits["test"].images)
    assert np.array_equal(test.labels, fashion_mnist.splits["test"].labels)


def test_corrupt_shard_is_detected_on_read(local_storage_config):
    manifest = ingest_source("fashion-mnist", None, local_storage_config, shard_rows=50_000, progress=False)
    storage = open_storage(local_storage_config)
    storage.publish(f"datasets/fashion-mnist/test/{manifest['splits']['test']['shards'][0]['name']}", b"garbage")
    with pytest.raises(VaegenError, match="fails its sha256"):
        read_split(storage, "fashion-mnist", "test")


def test_colour_image_folder_ingests_and_binds_a_conv_model(tmp_path, local_storage_config):
    make_folder(tmp_path / "imgs", {"red": (32, 32), "blue": (32, 32)})
    manifest = ingest_source("image-folder", str(tmp_path / "imgs"), local_storage_config, progress=False)
    assert manifest["name"] == "imgs" and manifest["image_shape"] == [3, 32, 32]
    cfg = bind_model_to_dataset(ModelConfig(arch="conv"), manifest, conditional=True)
    assert cfg.image_shape == (3, 32, 32) and cfg.num_classes == 2
    with pytest.raises(VaegenError, match="holds images of shape \\(3, 32, 32\\)"):
        bind_model_to_dataset(ModelConfig(image_shape=(1, 28, 28)), manifest, conditional=False)


def test_missing_bucket_publishes_nothing(s3_server, tmp_path):
    from vae_core.config import StorageConfig
    cfg = StorageConfig(root="s3://no-such-bucket/data", s3_endpoint=s3_server)
    with pytest.raises(VaegenError, match="bucket 'no-such-bucket' does not exist"):
        ingest_source("fashion-mnist", None, cfg, progress=False)
