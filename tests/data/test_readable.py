"""A dataset folder as other readers see it (cluster/data/readable.py): shards written a row group at a time read
back whole, what an update of the view killed midway leaves is collected, and on S3 the view is made by
server-side copies."""
import io
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.data import readable
from cluster.data.datasets import table_arrays
from cluster.data.generations import KEEP_SUPERSEDED_S, current_manifest
from cluster.data.ingest import ingest_source
from cluster.data.readable import VIEW_RECORD, ShardWriter, publish_view, shard_bytes
from cluster.store.layout import dataset_key
from cluster.store.storage import open_storage


def image_folder(path, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = path / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return str(path)


def test_a_shard_added_image_by_image_is_written_in_row_groups_and_reads_back_whole(monkeypatch):
    monkeypatch.setattr(readable, "ROW_GROUP_BYTES", 4 * 3 * 8 * 8)          # four 3x8x8 images a group
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(10) % 3
    writer = ShardWriter((3, 8, 8), ("a", "b", "c"), first_id=100)
    for image, label in zip(images, labels, strict=True):
        writer.add(image, label)
    body = writer.finish()

    assert writer.rows == 10
    assert shard_bytes(images, labels, 100, ("a", "b", "c")) == body        # from arrays: the same shard
    meta = pq.ParquetFile(io.BytesIO(body)).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 2]
    table = pq.read_table(io.BytesIO(body))
    assert table.schema.metadata[b"vaegen.image_shape"] == b"[3, 8, 8]"
    ids, read_labels, read_images = table_arrays(table, (3, 8, 8))
    assert ids.tolist() == list(range(100, 110))
    assert read_labels.tolist() == labels.tolist()
    assert np.array_equal(read_images, images)


def test_temp_links_of_a_killed_view_update_are_collected_by_the_next_once_past_the_grace(tmp_path,
                                                                                       local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    first = ingest_source("image-folder", image_folder(tmp_path / "v1", 12), local_storage_config, name="ds",
                          shard_rows=4, progress=False)
    split = storage.path(dataset_key("ds", "train"))
    os.link(storage.path(dataset_key("ds", "train", first["splits"]["train"]["shards"][0]["name"])),
            f"{split}/_tmp-killed")                          # what place() leaves when killed before its rename
    os.utime(f"{split}/_tmp-killed", (0, 0))                 # a link's mtime is its shard's: not its age
    ingest_source("image-folder", image_folder(tmp_path / "v2", 10, seed=1), local_storage_config, name="ds",
                  shard_rows=4, progress=False)
    assert "_tmp-killed" in os.listdir(split)                # within the grace: it may be a live update's
    storage.delete(dataset_key("ds", VIEW_RECORD))           # the next update
    publish_view(storage, current_manifest(storage, "ds"), now=time.time() + KEEP_SUPERSEDED_S + 60)
    left = sorted(os.listdir(split))
    assert [n for n in left if not n.startswith("__g-")] == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]


@pytest.mark.s3
def test_the_view_on_s3_holds_the_current_generation_s_bytes(tmp_path, s3_storage_config):
    storage = open_storage(s3_storage_config, for_writing=True)
    manifest = ingest_source("image-folder", image_folder(tmp_path / "v1", 10), s3_storage_config, name="ds",
                             shard_rows=4, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    for i, shard in enumerate(shards):
        assert storage.read_bytes(dataset_key("ds", "train", f"part-{i:05d}-of-{len(shards):05d}.parquet")) == \
            storage.read_bytes(dataset_key("ds", "train", shard["name"]))
