"""Re-ingesting a dataset replaces it atomically (issue 17, items 2 and 8): a re-ingest is invisible until its one
manifest write; readers see the old dataset or the new one, never a mix; a failed or killed ingest leaves the old
one readable; superseded data goes only after its grace period, and a reader that outlives it gets one line."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import root_args
from PIL import Image

from cluster.data.datasets import (
    generation_of,
    ingest,
    read_manifest,
    read_shard,
    read_split,
    shard_keys,
    table_arrays,
)
from cluster.data.generations import PENDING_TIMEOUT_S, collect_garbage
from cluster.data.ingest import ingest_source
from cluster.store.layout import dataset_key, dataset_manifest_key
from cluster.store.storage import Storage, open_storage
from vae_core.config import StorageConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.errors import VaegenError

NAME = "ds"


def content(seed: int, n: int = 60) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset({"train": ArraySplit(rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8),
                                             rng.integers(0, 3, n).astype(np.int64))},
                        ("a", "b", "c"), f"content-{seed}")


class FailingStorage(Storage):
    """A real storage root whose shard publishes fail after `shards_ok` of them: an ingest dying mid-way."""

    def __init__(self, cfg, shards_ok: int):
        super().__init__(cfg)
        self.shards_ok = shards_ok

    def publish(self, key, data, **kwargs):
        if key.endswith(".parquet"):
            if self.shards_ok <= 0:
                raise RuntimeError("injected failure mid-ingest")
            self.shards_ok -= 1
        return super().publish(key, data, **kwargs)


def snapshot(storage: Storage) -> dict[str, bytes]:
    return {e.key: storage.read_bytes(e.key) for e in storage.list("", recursive=True)}


def generation_files(storage: Storage) -> set[str]:
    """Every generation's shard files (the readable view's links or copies aside)."""
    return {e.key for e in storage.list(dataset_key(NAME), recursive=True) if "/__g-" in e.key}


def assert_reads_as(storage: Storage, data: ArrayDataset) -> None:
    loaded = read_split(storage, NAME, "train")
    assert np.array_equal(loaded.images, data.splits["train"].images)
    assert np.array_equal(loaded.labels, data.splits["train"].labels)


def test_a_failed_reingest_leaves_the_old_dataset_readable(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    old = content(1)
    ingest(storage, NAME, old, shard_rows=10, progress=False)
    with pytest.raises(RuntimeError, match="injected"):
        ingest(FailingStorage(storage_config, shards_ok=3), NAME, content(2), shard_rows=10, progress=False)
    assert_reads_as(storage, old)                       # every shard still passes its sha256 check


def test_an_identical_reingest_writes_nothing(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    first = ingest(storage, NAME, content(1), shard_rows=10, progress=False)
    before = snapshot(storage)
    again = ingest(storage, NAME, content(1), shard_rows=10, progress=False)
    assert snapshot(storage) == before and again == first


def test_a_reader_holding_the_old_manifest_keeps_reading_the_old_dataset(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    old, new = content(1), content(2)
    ingest(storage, NAME, old, shard_rows=10, progress=False)
    held = read_manifest(storage, NAME)
    ingest(storage, NAME, new, shard_rows=10, progress=False)
    parts = [table_arrays(pq.read_table(pa.BufferReader(read_shard(storage, NAME, "train", s))), (1, 8, 8))
             for s in held["splits"]["train"]["shards"]]
    assert np.array_equal(np.concatenate([images for _, _, images in parts]), old.splits["train"].images)
    pinned = read_split(storage, NAME, "train", manifest=held)               # a job that read the manifest once
    assert np.array_equal(pinned.images, old.splits["train"].images) and pinned.manifest is held
    assert shard_keys(storage, NAME, "train", manifest=held) == \
        [dataset_key(NAME, "train", s["name"]) for s in held["splits"]["train"]["shards"]]
    assert_reads_as(storage, new)
    assert [e["generation"] for e in read_manifest(storage, NAME)["superseded"]] == [held["generation"]]


def test_past_the_grace_period_old_data_goes_and_a_late_reader_gets_one_line(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    ingest(storage, NAME, content(1), shard_rows=10, progress=False)
    held = read_manifest(storage, NAME)
    new = content(2)
    current = ingest(storage, NAME, new, shard_rows=10, progress=False, keep_superseded_s=0)
    assert generation_files(storage) == {dataset_key(NAME, "train", s["name"])
                                         for s in current["splits"]["train"]["shards"]}
    with pytest.raises(VaegenError, match=f"^dataset '{NAME}' was replaced while reading: rerun$"):
        read_shard(storage, NAME, "train", held["splits"]["train"]["shards"][0])
    assert_reads_as(storage, new)


def test_a_killed_ingests_leftovers_go_only_after_the_pending_timeout(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    old = content(1)
    ingest(storage, NAME, old, shard_rows=10, progress=False)
    with pytest.raises(RuntimeError):
        ingest(FailingStorage(local_storage_config, shards_ok=2), NAME, content(2), shard_rows=10, progress=False)
    leftovers = generation_files(storage) - \
        {dataset_key(NAME, "train", s["name"]) for s in read_manifest(storage, NAME)["splits"]["train"]["shards"]}
    assert len([k for k in leftovers if k.endswith(".parquet")]) == 2
    assert collect_garbage(storage, NAME) == []              # an ingest may still be running: keep its shards
    later = time.time() + PENDING_TIMEOUT_S + 1
    deleted = collect_garbage(storage, NAME, now=later)
    assert {k for k in leftovers if k.endswith(".parquet")} == set(deleted)
    assert storage.list(dataset_key(NAME, "_pending")) == []
    assert_reads_as(storage, old)


def test_a_dataset_of_another_layout_is_one_line_and_a_reingest_replaces_it(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    ingest(storage, NAME, content(1), shard_rows=10, progress=False)
    key = dataset_manifest_key(NAME)
    storage.publish(key, json.dumps({**json.loads(storage.read_bytes(key)), "layout": "vaegen-dataset-2"}).encode())
    with pytest.raises(VaegenError, match=r"_manifest\.json is in another format \(layout 'vaegen-dataset-2'.*\): re-ingest"):
        read_manifest(storage, NAME)
    newest = content(3)
    ingest(storage, NAME, newest, shard_rows=10, progress=False)
    assert_reads_as(storage, newest)


def test_a_corrupt_manifest_is_one_line_and_a_reingest_repairs_it(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    data = content(1)
    ingest(storage, NAME, data, shard_rows=10, progress=False)
    key = dataset_manifest_key(NAME)
    storage.publish(key, storage.read_bytes(key)[:40])
    with pytest.raises(VaegenError, match=r"_manifest\.json is corrupt \(.*\): re-ingest"):
        read_manifest(storage, NAME)
    with pytest.raises(VaegenError, match="is corrupt"):
        shard_keys(storage, NAME, "train")
    ingest(storage, NAME, data, shard_rows=10, progress=False)
    assert_reads_as(storage, data)


def test_concurrent_commits_keep_every_replaced_generation(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    contents = [content(seed) for seed in range(1, 6)]
    errors = []

    def run(data):
        try:
            ingest(open_storage(local_storage_config), NAME, data, shard_rows=10, progress=False)
        except Exception as e:                               # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = read_manifest(storage, NAME)
    generations = {generation_of(c, 10) for c in contents}
    assert {final["generation"]} | {e["generation"] for e in final["superseded"]} == generations
    for data in contents:                                    # every generation is whole and readable
        g = generation_of(data, 10)
        files = storage.list(dataset_key(NAME, "train", f"__g-{g}"))
        assert len(files) == 6
    winner = next(c for c in contents if generation_of(c, 10) == final["generation"])
    assert_reads_as(storage, winner)


# -- chaos: re-ingests (completed, SIGKILLed, failing) under concurrent readers ---------------------------------
def image_folder(path, seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = path / f"c{i % 3}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(cls / f"{i:04d}.png")


class Readers:
    """Threads reading the dataset the way training does, checking every read against its manifest's content."""

    def __init__(self, cfg, expected: dict):
        self.cfg, self.expected, self.stop = cfg, expected, threading.Event()
        self.seen, self.replaced, self.failures, self.reads = set(), 0, [], 0
        self.threads = [threading.Thread(target=self.loop, args=(kind,), daemon=True)
                        for kind in ("read_split", "read_split", "shard_paths")]

    def check(self, generation: str, images: np.ndarray, labels: np.ndarray) -> None:
        want = self.expected.get(generation)
        if want is None:
            self.failures.append(f"manifest names an unknown generation {generation}")
        elif not (np.array_equal(images, want[0]) and np.array_equal(labels, want[1])):
            self.failures.append(f"a read of generation {generation} returned other content (a mix)")
        else:
            self.seen.add(generation)

    def loop(self, kind: str) -> None:
        storage = open_storage(self.cfg)
        while not self.stop.is_set():
            try:
                if kind == "read_split":
                    loaded = read_split(storage, NAME, "train")
                    self.check(loaded.manifest["generation"], loaded.images, loaded.labels)
                else:                                 # the trainer's path: the manifest's keys, read by pyarrow
                    manifest = read_manifest(storage, NAME)
                    tables = []
                    for shard in manifest["splits"]["train"]["shards"]:
                        try:
                            tables.append(pq.read_table(storage.path(dataset_key(NAME, "train", shard["name"])),
                                                        filesystem=storage.fs))
                        except OSError:
                            if read_manifest(storage, NAME)["created_at"] == manifest["created_at"]:
                                raise
                            raise VaegenError(f"dataset '{NAME}' was replaced while reading: rerun") from None
                    pixels = b"".join(b for t in tables for b in t.column("pixels").to_pylist())
                    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
                    self.check(manifest["generation"], np.frombuffer(pixels, np.uint8).reshape(-1, 1, 8, 8),
                               labels)
                self.reads += 1
            except VaegenError as e:
                if str(e) == f"dataset '{NAME}' was replaced while reading: rerun":
                    self.replaced += 1
                else:
                    self.failures.append(f"{kind}: {e}")
            except Exception as e:                   # noqa: BLE001 - any other error is a failure of the test
                self.failures.append(f"{kind}: {type(e).__name__}: {e}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def folder_content(folder, shard_rows: int, scratch) -> tuple[str, ArrayDataset]:
    """What ingesting `folder` commits: its generation (the same wherever it is ingested) and its content."""
    cfg = StorageConfig(root=str(scratch))
    manifest = ingest_source("image-folder", str(folder), cfg, name=NAME, shard_rows=shard_rows, progress=False)
    split = read_split(open_storage(cfg), NAME, "train")
    return manifest["generation"], ArrayDataset({"train": ArraySplit(split.images, split.labels)},
                                                tuple(manifest["label_names"]), str(folder))


@pytest.mark.slow
def test_reingests_killed_or_failing_under_concurrent_readers_never_show_a_mix(storage_config, tmp_path):
    """Streaming ingests (subprocesses, some SIGKILLed mid-way) and in-memory ones (failing mid-way) replace the
    dataset under readers: every read is one whole generation, and the readable view ends as the current one."""
    shard_rows, rng = 2, random.Random(17)
    folders, expected, by_generation = {}, {}, {}
    for seed in range(10):
        folder = tmp_path / f"src{seed}"
        image_folder(folder, seed, 40 + 10 * seed)
        generation, data = folder_content(folder, shard_rows, tmp_path / f"scratch{seed}")
        folders[seed] = (folder, data, generation)
        split = data.splits["train"]
        for g in (generation, generation_of(data, shard_rows)):
            expected[g], by_generation[g] = (split.images, split.labels), data
    storage = open_storage(storage_config, for_writing=True)
    ingest(storage, NAME, folders[0][1], shard_rows=shard_rows, progress=False)
    killed_mid_way = failed = completed = 0
    with Readers(storage_config, expected) as readers:
        for seed in range(1, 10):
            folder, data, generation = folders[seed]
            if seed % 3 == 0:                        # in process: dies after some shards, then GC with no grace
                with pytest.raises(RuntimeError):
                    ingest(FailingStorage(storage_config, shards_ok=rng.randint(1, 10)), NAME, data,
                           shard_rows=shard_rows, progress=False)
                failed += 1
                ingest(storage, NAME, folders[seed - 1][1], shard_rows=shard_rows, progress=False,
                       keep_superseded_s=0)
                continue
            proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "ingest", "image-folder", str(folder),
                                     "--name", NAME, "--shard-rows", str(shard_rows), "--no-progress",
                                     *root_args(storage_config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
            kill_after = rng.randint(1, 15) if seed % 3 == 1 else None
            while kill_after is not None and proc.poll() is None:
                if len(storage.list(dataset_key(NAME, "train", f"__g-{generation}"))) >= kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
            _, err = proc.communicate(timeout=300)
            if proc.returncode == -signal.SIGKILL:
                killed_mid_way += read_manifest(storage, NAME)["generation"] != generation
            else:
                assert proc.returncode == 0, err
                completed += 1
            time.sleep(0.2)                          # let the readers read what is there now
    assert not readers.failures, readers.failures[:5]
    assert readers.reads > 0 and len(readers.seen) >= 2          # replacements happened while they read
    assert killed_mid_way >= 1 and failed >= 1 and completed >= 1
    final = read_manifest(storage, NAME)
    assert_reads_as(storage, by_generation[final["generation"]])
    if not storage.is_s3:                            # the raw folder, as pandas reads it, is the current dataset
        import pandas as pd
        frame = pd.read_parquet(storage.path(dataset_key(NAME, "train")))
        assert np.array_equal(frame["label"].to_numpy(), by_generation[final["generation"]].splits["train"].labels)
