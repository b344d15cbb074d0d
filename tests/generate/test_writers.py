"""Shard writers: one per format, same interface, deterministic bytes, validated before anyone publishes."""
import fnmatch
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import rng_images
from generate_support import read_rows

from cluster.generate.writers import (
    WRITERS,
    DecodedBatch,
    ParquetShardWriter,
    PngTarShardWriter,
    ShardInfo,
    latent_texts,
    parquet_image_bytes,
    tar_member_count,
)
from cluster.generate.writers.parquet import IMAGE_TYPE, decode_image_column, png_images
from cluster.store.layout import (
    DATA_DIR,
    JobKeys,
    job_split,
    receipt_name,
    shard_braces,
    shard_glob,
    shard_index,
    shard_name,
)

INFO = ShardInfo(index=3, seed=12345, model="tiny@v0001", weights_sha256="ab" * 32, job_id="samples-0123")


def batches(n: int = 10, size: int = 4, labels: bool = True) -> list[DecodedBatch]:
    images = rng_images(n)
    latents = np.random.default_rng(1).standard_normal((n, 4)).astype(np.float32)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    return [DecodedBatch(ids[s:s + size], (ids[s:s + size] % 3) if labels else None, latents[s:s + size],
                         images[s:s + size]) for s in range(0, n, size)]


def write(writer_cls, parts: list[DecodedBatch]) -> bytes:
    writer = writer_cls(INFO)
    for part in parts:
        writer.write(part)
    return writer.close()


@pytest.mark.parametrize("fmt", ["parquet", "png"])           # lossless (JPEG: tests/test_image_codecs.py)
def test_rows_round_trip_in_id_order(fmt):
    parts = batches()
    rows = read_rows(write(WRITERS[fmt], parts), fmt)
    assert rows["id"] == list(range(100, 110))
    assert rows["label"] == [i % 3 for i in range(100, 110)]
    np.testing.assert_array_equal(np.stack(rows["image"]), np.concatenate([p.images for p in parts]))
    np.testing.assert_allclose(np.array(rows["latent"]), np.concatenate([p.latents for p in parts]))


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_same_rows_give_the_same_bytes_whatever_the_batching(fmt):
    assert write(WRITERS[fmt], batches(size=4)) == write(WRITERS[fmt], batches(size=3))


def test_parquet_schema_and_file_metadata():
    data = write(ParquetShardWriter, batches(labels=False))
    table = pq.read_table(io.BytesIO(data))
    # rows without labels (an unconditional model's samples) have no label column, and no label feature
    assert table.column_names == ["id", "shard", "seed", "latent", "image", "height", "width", "channels"]
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features == {"id": {"dtype": "int64", "_type": "Value"}, "image": {"_type": "Image"}}
    latent = table.schema.field("latent").type
    assert (latent.list_size, str(latent.value_type)) == (4, "float")
    assert set(table.column("shard").to_pylist()) == {3} and set(table.column("seed").to_pylist()) == {12345}
    meta = pq.read_metadata(io.BytesIO(data))
    assert meta.row_group(0).column(0).compression == "ZSTD"
    kv = {k.decode(): v.decode() for k, v in meta.metadata.items()}
    assert kv["vaegen.model"] == "tiny@v0001" and kv["vaegen.code_version"] and kv["vaegen.job_id"] == "samples-0123"


def test_png_tar_is_webdataset_with_fixed_member_metadata():
    data = write(PngTarShardWriter, batches())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        meta = json.loads(tar.extractfile(members[2]).read())
        classes = [tar.extractfile(m).read() for m in members if m.name.endswith(".cls")]
    assert [m.name for m in members[:4]] == ["0000000100.png", "0000000100.cls", "0000000100.json", "0000000101.png"]
    assert classes == [b"%d" % (i % 3) for i in range(100, 110)]          # WebDataset's .cls: the label in ASCII
    assert all(m.name.count(".") == 1 for m in members)                      # WebDataset key = name before the dot
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    assert meta == {"id": 100, "shard": 3, "seed": 12345, "label": 1, "latent": meta["latent"], "height": 28,
                    "width": 28, "channels": 1, "model": "tiny@v0001"}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_an_empty_shard_is_refused(fmt):
    with pytest.raises(ValueError, match="no rows"):
        WRITERS[fmt](INFO).close()


def test_shard_names_come_from_one_place():
    assert shard_name(7, "parquet", 10, "train") == "data/train-00007-of-00010.parquet"
    assert shard_name(7, "png", 10, "train") == "data/train-00007-of-00010.tar"
    assert shard_index(shard_name(12345, "png", 20000, "train")) == 12345
    assert shard_braces("png", 4, "train") == "data/train-{00000..00003}-of-00004.tar"
    assert shard_braces("parquet", 1, "test") == "data/test-{00000..00000}-of-00001.parquet"
    assert fnmatch.fnmatch(shard_name(3, "parquet", 4, "train"), shard_glob("parquet", "train")) and not any(
        fnmatch.fnmatch(shard_name(3, fmt, 4, split), shard_glob("parquet", "train"))
        for fmt, split in (("png", "train"), ("parquet", "test")))
    assert receipt_name(shard_name(3, "parquet", 4, "train")) == "_receipts/train-00003-of-00004.parquet.json"


def test_a_job_is_the_split_it_holds():
    """Samples are a `train` split; a reconstruction of a split is named for it, as `datasets` takes a split."""
    assert job_split("samples", "test") == "train"
    assert job_split("reconstructions", "test") == "test"
    assert job_split("reconstructions", "val-2.b") == "val_2_b"
    assert shard_index(shard_name(3, "png", 4, "val_2_b")) == 3


def test_only_shards_sit_where_pyarrow_looks_for_data():
    """pyarrow's dataset discovery (pandas.read_parquet, Ray Data) skips names starting with _ or .: every
    record of a Parquet job must start with one, and the shards must not."""
    keys = JobKeys.of("samples-00ab")
    records = [keys.manifest, keys.success, keys.run_record, keys.lease, keys.receipts, keys.gallery]
    assert all(key.removeprefix(keys.prefix + "/").startswith("_") for key in records)
    assert keys.card == f"{keys.prefix}/README.md"          # the card, where the Hub and `datasets` read it
    assert shard_name(0, "parquet", 1, "train").startswith(f"{DATA_DIR}/")      # the shards alone in data/


def test_png_tar_bytes_equal_what_tarfile_writes_with_the_same_fixed_metadata():
    ours = write(PngTarShardWriter, batches(n=7))
    theirs = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(ours)) as src, \
            tarfile.open(fileobj=theirs, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
    assert ours == theirs.getvalue()


def test_a_truncated_or_damaged_tar_is_refused():
    data = write(PngTarShardWriter, batches())
    assert tar_member_count(data) == 30                          # .png, .cls, .json per sample
    assert tar_member_count(write(PngTarShardWriter, batches(labels=False))) == 20       # no .cls without labels
    for cut in (len(data) // 2, len(data) // 2 + 100, 512 * 3 + 7):
        with pytest.raises(ValueError, match="truncated|checksum"):
            tar_member_count(data[:cut])
    damaged = bytearray(data)
    damaged[5] ^= 0x01                                           # inside the first member's name
    with pytest.raises(ValueError, match="fails its checksum"):
        tar_member_count(bytes(damaged))


def test_png_tar_json_is_exactly_what_json_dumps_writes():
    with tarfile.open(fileobj=io.BytesIO(write(PngTarShardWriter, batches(labels=False)))) as tar:
        names = [m.name for m in tar.getmembers()]
        texts = [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".json")]
    assert not [name for name in names if name.endswith(".cls")]     # an unconditional model's samples: no label
    assert all(text == json.dumps(json.loads(text), sort_keys=True) for text in texts)
    assert json.loads(texts[0])["label"] is None and len(json.loads(texts[0])["latent"]) == 4


def test_png_tar_json_latents_give_back_the_exact_float32_and_stay_what_json_dumps_writes():
    ordinary = np.random.default_rng(2).standard_normal((200, 20)).astype(np.float32) * np.float32(3e-3)
    unusual = np.array([[0.0, -0.0, 2.0, 1.5e-5], [np.nan, np.inf, -np.inf, 0.25], [3e9, -1.25e8, 123456.78, 1e-30]],
                       np.float32)
    for latents in (ordinary, unusual):
        texts = latent_texts(latents)
        read = [json.loads(f"[{text}]") for text in texts]
        assert all(f"[{text}]" == json.dumps(values) for text, values in zip(texts, read))
        np.testing.assert_array_equal(np.array(read, np.float32), latents)        # bit-exact, NaN in place
    assert len(latent_texts(ordinary)[0]) < len(json.dumps(ordinary[0].tolist()))   # shorter than repr's 17 digits


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 7, 300)])
def test_the_planned_bytes_per_parquet_image_are_what_the_writer_stores(shape):
    """cluster.generate.plan sizes its 2 GiB check on parquet_image_bytes: it must equal the real cell size."""
    cells = png_images(rng_images(3, shape))
    assert [len(cell.as_py()) for cell in cells] == [parquet_image_bytes(shape)] * 3


def test_labelled_parquet_rows_carry_a_class_label_with_names():
    info = ShardInfo(index=0, seed=1, model="tiny@v0001", weights_sha256="ab" * 32, job_id="samples-0123",
                     label_names=("zero", "one", "two"))
    writer = ParquetShardWriter(info)
    for part in batches():
        writer.write(part)
    table = pq.read_table(io.BytesIO(writer.close()))
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": ["zero", "one", "two"], "_type": "ClassLabel"}
    assert table.column("label").to_pylist() == [i % 3 for i in range(100, 110)]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 160, 150)])   # the last needs two stored blocks
def test_parquet_images_are_png_files_that_pil_and_torchvision_decode(shape):
    import PIL.Image
    import torch
    from torchvision.io import decode_image
    images = rng_images(4, shape)
    cells = [cell.as_py() for cell in png_images(images)]
    for image, cell in zip(images, cells):
        assert cell.startswith(b"\x89PNG\r\n\x1a\n")
        with PIL.Image.open(io.BytesIO(cell)) as im:
            assert im.format == "PNG"
            pixels = np.asarray(im).reshape(shape[1], shape[2], shape[0]).transpose(2, 0, 1)
        np.testing.assert_array_equal(pixels, image)
        decoded = decode_image(torch.frombuffer(bytearray(cell), dtype=torch.uint8))   # checks CRCs and adler32
        np.testing.assert_array_equal(decoded.numpy(), image)


def test_decode_image_column_reads_whole_and_sliced_tables():
    import pyarrow as pa
    images = rng_images(6, (1, 28, 28))
    for cells in (png_images(images),):
        column = pa.StructArray.from_arrays([cells, pa.nulls(6, pa.string())], fields=list(IMAGE_TYPE))
        table = pa.table({"image": column, "channels": [1] * 6, "height": [28] * 6, "width": [28] * 6})
        np.testing.assert_array_equal(decode_image_column(table), images)
        np.testing.assert_array_equal(decode_image_column(table.slice(2, 3)), images[2:5])
    shard = pq.read_table(io.BytesIO(write(ParquetShardWriter, batches())))
    np.testing.assert_array_equal(decode_image_column(shard), np.concatenate([p.images for p in batches()]))
