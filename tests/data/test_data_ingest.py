"""Readers (IDX, image folder) and ingest into Parquet shards, locally and on S3 over HTTP."""
import gzip
import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from cluster.data.datasets import bind_model_to_dataset, read_manifest, read_split
from cluster.data.ingest import ingest_source
from cluster.store.storage import open_storage
from vae_core.config import ModelConfig, StorageConfig
from vae_core.data import FASHION_MNIST_DIR, read_idx
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


def read_image_folder(folder):
    """An image folder as ingest stores it: (class names, images, labels)."""
    cfg = StorageConfig(root=f"{folder}-root")
    manifest = ingest_source("image-folder", str(folder), cfg, name="folder", progress=False)
    split = read_split(open_storage(cfg), "folder", "train")
    return tuple(manifest["label_names"]), split.images, split.labels


def test_image_folder_reads_classes_from_subfolders(tmp_path):
    make_folder(tmp_path / "imgs", {"cats": (32, 32), "dogs": (32, 32)})
    names, images, labels = read_image_folder(tmp_path / "imgs")
    assert names == ("cats", "dogs")
    assert images.shape == (6, 3, 32, 32)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_dataset_names_its_input_by_name_not_by_the_place_it_was_read_from(tmp_path):
    """A root is portable: the manifest and the card say where the images came from by the folder's own name,
    never by a path on the machine that ingested them."""
    make_folder(tmp_path / "inputs" / "imgs", {"cats": (8, 8), "dogs": (8, 8)})
    root = tmp_path / "root"
    manifest = ingest_source("image-folder", str(tmp_path / "inputs" / "imgs"), StorageConfig(root=str(root)),
                             name="pets", progress=False)
    assert manifest["source"] == "imgs"
    assert [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and str(tmp_path).encode() in p.read_bytes()] == []


def test_image_folder_of_mixed_shapes_is_refused(tmp_path):
    make_folder(tmp_path / "imgs", {"a": (32, 32), "b": (16, 16)})
    with pytest.raises(VaegenError, match="images differ in size"):
        read_image_folder(tmp_path / "imgs")


def test_missing_dataset_path_is_refused(tmp_path):
    with pytest.raises(VaegenError, match="does not exist"):
        ingest_source("fashion-mnist", str(tmp_path / "nope"), open_storage_cfg(tmp_path))


def open_storage_cfg(tmp_path):
    from vae_core.config import StorageConfig
    return StorageConfig(root=str(tmp_path / "root"))


def test_ingest_writes_shards_matching_the_manifest(storage_config, ray_local):
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


def test_ingested_pixels_equal_the_source(local_storage_config, fashion_mnist, ray_local):
    ingest_source("fashion-mnist", None, local_storage_config, progress=False)
    test = read_split(open_storage(local_storage_config), "fashion-mnist", "test")
    assert np.array_equal(test.images, fashion_mnist.splits["test"].images)
    assert np.array_equal(test.labels, fashion_mnist.splits["test"].labels)


def test_corrupt_shard_is_detected_on_read(local_storage_config, ray_local):
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


# -- hostile names, odd images and odd Parquet: one line, nothing written (issue 17, items 1 and 5) --------
def cli_error(capsys, *argv) -> str:
    """Run `vaegen` in-process; assert exit 2 and one `vaegen: error:` line; return that line."""
    from jobs.cli import main
    rc = main(list(argv))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("vaegen: error:"), (rc, err)
    return err[0]


def tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags, fragment", [
    (["--name", "../../escaped"], "--name='../../escaped' is not a valid name"),
    (["--name", ".."], "--name='..' is not a valid name"),
    (["--name", "a/b"], "--name='a/b' is not a valid name"),
    (["--split", ".."], "--split='..' is not a valid name"),
    (["--split", "../x"], "--split='../x' is not a valid name"),
])
def test_hostile_dataset_and_split_names_are_refused(tmp_path, capsys, flags, fragment):
    make_folder(tmp_path / "imgs", {"a": (8, 8)})
    root = tmp_path / "sandbox" / "root"
    root.mkdir(parents=True)
    before = tree(tmp_path)
    line = cli_error(capsys, "ingest", "image-folder", str(tmp_path / "imgs"), "--root", str(root), *flags)
    assert fragment in line
    assert tree(tmp_path) == before                      # nothing written, inside the root or outside it


def test_dot_names_the_dataset_after_the_current_folder(tmp_path, monkeypatch, local_storage_config):
    make_folder(tmp_path / "imgs", {"a": (8, 8), "b": (8, 8)})
    monkeypatch.chdir(tmp_path / "imgs")
    manifest = ingest_source("image-folder", ".", local_storage_config, progress=False)
    assert manifest["name"] == "imgs"
    storage = open_storage(local_storage_config)
    assert storage.list_dirs("datasets") == ["imgs"]
    assert [e.key for e in storage.list("datasets")] == []          # no shards loose in datasets/


def test_a_folder_without_a_valid_name_asks_for_name(capsys):
    line = cli_error(capsys, "ingest", "image-folder", "/", "--root", "/nonexistent-root-never-created")
    assert "pass --name" in line


def test_16_bit_grey_png_is_scaled_to_8_bits_not_clipped(tmp_path, local_storage_config):
    values = np.array([[0, 128, 129, 257, 1000], [30000, 32768, 63000, 65280, 65535]], np.uint16)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(values).save(tmp_path / "imgs" / "a" / "deep.png")
    with Image.open(tmp_path / "imgs" / "a" / "deep.png") as im:
        assert im.mode.startswith("I")                   # Pillow really reads it as a 16-bit image
    ingest_source("image-folder", str(tmp_path / "imgs"), local_storage_config, progress=False)
    pixels = read_split(open_storage(local_storage_config), "imgs", "train").images[0, 0]
    assert pixels.tolist() == np.round(values / 257).astype(int).tolist()
    assert len(set(pixels.ravel().tolist())) > 2        # the old code kept only {0, 255}


def test_other_image_modes_read_sanely(tmp_path):
    folder = tmp_path / "modes"
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 7)], axis=-1)
    alpha = np.full((4, 4, 1), 255, np.uint8)
    alpha[0, 0] = 0                                      # one fully transparent pixel
    (folder / "grey").mkdir(parents=True)
    (folder / "colour").mkdir()
    Image.fromarray(grey).convert("1").save(folder / "grey" / "bits.png")
    Image.fromarray(np.concatenate([grey[..., None], alpha], -1), "LA").save(folder / "grey" / "la.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "colour" / "palette.png")
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(folder / "colour" / "rgba.png")
    by_name = {}
    for cls in ("grey", "colour"):
        sub = tmp_path / f"only-{cls}"
        (sub / cls).mkdir(parents=True)
        for f in (folder / cls).iterdir():
            (sub / cls / f.name).write_bytes(f.read_bytes())
        by_name[cls] = read_image_folder(sub)[1]
    assert by_name["grey"].shape == (2, 1, 4, 4) and by_name["colour"].shape == (2, 3, 4, 4)
    one_bit, la = by_name["grey"][0, 0], by_name["grey"][1, 0]                # sorted: bits.png, la.png
    assert set(np.unique(one_bit).tolist()) <= {0, 255}
    assert la[0, 0] == 0 and la[1:].tolist() == grey[1:].tolist()            # alpha composited onto black
    palette, rgba = by_name["colour"][0], by_name["colour"][1]                 # palette.png, rgba.png
    assert rgba[:, 0, 0].tolist() == [0, 0, 0] and rgba[:, 1:].tolist() == rgb.transpose(2, 0, 1)[:, 1:].tolist()
    assert np.abs(palette.astype(int) - rgb.transpose(2, 0, 1)).max() <= 16    # an adaptive palette is close
    with pytest.raises(VaegenError, match="images differ in channels"):        # grey and colour do not mix
        read_image_folder(folder)


def write_parquet(path, labels, pixels=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = len(labels)
    pixels = pixels if pixels is not None else [bytes([i % 256] * 16) for i in range(n)]
    pq.write_table(pa.table({"label": pa.array(labels, pa.int64()), "pixels": pa.array(pixels, pa.binary()),
                             "height": pa.array([4] * n, pa.int32()), "width": pa.array([4] * n, pa.int32()),
                             "channels": pa.array([1] * n, pa.int32())}), path)


def test_parquet_single_file_ingests(tmp_path, local_storage_config, capsys):
    write_parquet(tmp_path / "one.parquet", [0, 1, 2, 1])
    from jobs.cli import main
    assert main(["ingest", "parquet", str(tmp_path / "one.parquet"), "--name", "one",
                 "--root", local_storage_config.root, "--no-progress"]) == 0
    data = read_split(open_storage(local_storage_config), "one", "train")
    assert data.labels.tolist() == [0, 1, 2, 1] and data.images.shape == (4, 1, 4, 4)
    assert data.images[3].ravel().tolist() == [3] * 16


@pytest.mark.parametrize("labels, fragment", [
    ([], "holds no rows"), ([0, -1, 2], "label -1"),
    ([0, 10**9], "label 1000000000: at most 100,000 classes"),          # once 10.8 GB of class names
    ([2**63 - 1, 1], "at most 100,000 classes"),                          # once a hang
])
def test_bad_parquet_input_is_one_line(tmp_path, capsys, labels, fragment):
    write_parquet(tmp_path / "bad.parquet", labels)
    root = tmp_path / "root"
    assert fragment in cli_error(capsys, "ingest", "parquet", str(tmp_path / "bad.parquet"), "--root", str(root))
    assert not root.exists() or tree(root) == {}


@pytest.mark.parametrize("column, values", [("height", [4.0, 4.0]), ("height", [8.5, 8.5]), ("width", ["4", "4"]),
                                            ("channels", [1, None])])
def test_parquet_image_sizes_must_be_integers(tmp_path, capsys, column, values):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = {"label": pa.array([0, 1]), "pixels": pa.array([bytes(16)] * 2, pa.binary()),
             "height": pa.array([4, 4]), "width": pa.array([4, 4]), "channels": pa.array([1, 1])}
    table[column] = pa.array(values)
    pq.write_table(pa.table(table), tmp_path / "sizes.parquet")
    root = tmp_path / "root"
    line = cli_error(capsys, "ingest", "parquet", str(tmp_path / "sizes.parquet"), "--root", str(root))
    assert f"'{column}' must be an integer column" in line
    assert not root.exists() or tree(root) == {}


def test_a_negative_label_is_refused_from_any_source(local_storage_config):
    from cluster.data.datasets import ingest
    from vae_core.data import ArrayDataset, ArraySplit
    bad = ArrayDataset({"train": ArraySplit(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, -1]))}, ("a",), "x")
    with pytest.raises(VaegenError, match="label -1"):
        ingest(open_storage(local_storage_config, for_writing=True), "neg", bad, progress=False)
    assert open_storage(local_storage_config).list("datasets", recursive=True) == []


def test_a_huge_label_is_refused_from_any_source(local_storage_config):
    from cluster.data.datasets import ingest
    from vae_core.data import ArrayDataset, ArraySplit
    huge = ArrayDataset({"train": ArraySplit(np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 10**9]))}, (), "x")
    with pytest.raises(VaegenError, match="at most 100,000 classes"):
        ingest(open_storage(local_storage_config, for_writing=True), "huge", huge, progress=False)
    assert open_storage(local_storage_config).list("datasets", recursive=True) == []


def test_parquet_single_file_on_s3_ingests(tmp_path, s3_storage_config):
    write_parquet(tmp_path / "one.parquet", [2, 0])
    storage = open_storage(s3_storage_config, for_writing=True)
    storage.publish("in/one.parquet", (tmp_path / "one.parquet").read_bytes())
    manifest = ingest_source("parquet", storage.uri_of("in/one.parquet"), s3_storage_config, name="s3one",
                             progress=False)
    assert manifest["label_names"] == ["0", "1", "2"]
    assert read_split(storage, "s3one", "train").labels.tolist() == [2, 0]


def test_a_link_planted_in_a_dataset_never_lets_an_ingest_delete_outside_the_root(tmp_path, capsys):
    """The re-ingest's garbage collection must not follow `datasets/<name>/<split>` out of the root: it stops on
    the link, in one line, before it writes, and the other user's files behind it stay."""
    victim = tmp_path / "outside" / "victim" / "g-deadbeefdeadbeef"
    victim.mkdir(parents=True)
    (victim / "important.txt").write_text("another user's data")
    make_folder(tmp_path / "first", {"a": (8, 8), "b": (8, 8)})
    make_folder(tmp_path / "second", {"a": (8, 8), "c": (8, 8)})
    root = tmp_path / "root"
    ingest_source("image-folder", str(tmp_path / "first"), StorageConfig(root=str(root)), name="small1",
                  progress=False)
    (root / "datasets" / "small1" / "evilsplit").symlink_to(tmp_path / "outside" / "victim")
    outside, inside = tree(tmp_path / "outside"), tree(root)
    line = cli_error(capsys, "ingest", "image-folder", str(tmp_path / "second"), "--name", "small1",
                     "--root", str(root))
    assert "refusing to follow the symbolic link" in line and "evilsplit" in line
    assert tree(tmp_path / "outside") == outside and tree(root) == inside
