"""The ingest engine (issue 27): sources streamed into shards and committed atomically; the dataset folder read
directly by Hugging Face `datasets` and pandas; bad images, mixed sizes and unlabelled data."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cluster.data.datasets import bind_model_to_dataset, read_manifest, read_split
from cluster.data.ingest import ingest_source
from cluster.store.layout import dataset_key
from cluster.store.storage import open_storage
from vae_core.config import ModelConfig
from vae_core.errors import VaegenError


def image_folder(path, n: int, seed: int = 0, size=(8, 8), classes=("a", "b", "c")):
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = path / classes[i % len(classes)] if classes else path
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return path


def tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_reingested_folder_reads_as_exactly_the_current_rows_in_datasets_and_pandas(tmp_path, local_storage_config):
    import datasets
    storage = open_storage(local_storage_config, for_writing=True)
    ingest_source("image-folder", str(image_folder(tmp_path / "v1", 50)), local_storage_config, name="ds",
                  shard_rows=16, progress=False)
    second = ingest_source("image-folder", str(image_folder(tmp_path / "v2", 35, seed=1)), local_storage_config,
                           name="ds", shard_rows=16, progress=False)
    assert [e["generation"] for e in second["superseded"]] != []          # the old generation is still kept
    folder = storage.path(dataset_key("ds"))
    frame = pd.read_parquet(f"{folder}/train")
    assert len(frame) == 35 and sorted(frame["id"]) == list(range(35))
    loaded = datasets.load_dataset(folder, cache_dir=str(tmp_path / "hf-cache"))
    assert loaded["train"].num_rows == 35
    assert loaded["train"].features["label"].names == ["a", "b", "c"]
    want = read_split(storage, "ds", "train")
    row = loaded["train"][7]
    assert np.array_equal(np.frombuffer(row["pixels"], np.uint8).reshape(3, 8, 8), want.images[7])
    card = storage.read_bytes(dataset_key("ds", "README.md")).decode()
    assert card.startswith("---\nconfigs:") and "35 images of 8×8 pixels, RGB" in card


def test_an_identical_source_reingest_writes_nothing(tmp_path, local_storage_config):
    source = str(image_folder(tmp_path / "imgs", 20))
    first = ingest_source("image-folder", source, local_storage_config, shard_rows=8, progress=False)
    before = tree(tmp_path / "root")
    again = ingest_source("image-folder", source, local_storage_config, shard_rows=8, progress=False)
    assert again == first and tree(tmp_path / "root") == before
    assert [s["rows"] for s in first["splits"]["train"]["shards"]] == [8, 8, 4]


def test_a_bad_image_is_one_line_and_publishes_nothing_unless_skipped(tmp_path, local_storage_config):
    source = image_folder(tmp_path / "imgs", 12)
    (source / "b" / "0004.png").write_bytes(b"not a png at all")
    with pytest.raises(VaegenError, match=r"^cannot read image .*0004\.png"):
        ingest_source("image-folder", str(source), local_storage_config, progress=False)
    assert tree(tmp_path / "root") == {} if (tmp_path / "root").exists() else True
    from cluster.data.sources import IngestOptions
    manifest = ingest_source("image-folder", str(source), local_storage_config, progress=False,
                             options=IngestOptions(skip_bad=True))
    assert manifest["splits"]["train"]["rows"] == 11
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["examples"][0]["name"].endswith("0004.png")
    card = open_storage(local_storage_config).read_bytes(dataset_key("imgs", "README.md")).decode()
    assert "Skipped 1 unreadable image(s)" in card and "0004.png" in card


def test_mixed_sizes_are_one_line_naming_two_sizes_and_the_flag(tmp_path, local_storage_config):
    source = image_folder(tmp_path / "imgs", 6)
    image_folder(source, 1, size=(5, 7), classes=("c",))                     # overwrites c/0000.png, 5x7
    with pytest.raises(VaegenError, match=r"images differ in size: .* is \d+x\d+ but .* is \d+x\d+: pass --size HxW"):
        ingest_source("image-folder", str(source), local_storage_config, progress=False)


def test_an_unlabelled_folder_has_label_minus_one_and_refuses_conditional(tmp_path, local_storage_config):
    manifest = ingest_source("image-folder", str(image_folder(tmp_path / "flat", 9, classes=())),
                             local_storage_config, progress=False)
    assert manifest["label_names"] == []
    assert read_split(open_storage(local_storage_config), "flat", "train").labels.tolist() == [-1] * 9
    assert bind_model_to_dataset(ModelConfig(arch="conv"), manifest, conditional=False).num_classes == 0
    with pytest.raises(VaegenError, match="^dataset 'flat' is unlabelled: --conditional needs labels"):
        bind_model_to_dataset(ModelConfig(arch="conv"), manifest, conditional=True)


def test_ray_data_and_this_process_write_the_same_bytes(tmp_path, ray_local):
    """The tiny-input path is the same code: the same input ingested on Ray Data (here) and in a fresh process
    with no Ray (a subprocess) gives the same generation, shards and bytes."""
    import ray

    from vae_core.config import StorageConfig
    source = str(image_folder(tmp_path / "imgs", 40))
    on_ray = ingest_source("image-folder", source, StorageConfig(root=str(tmp_path / "a")), shard_rows=16,
                           progress=False)
    assert ray.is_initialized()
    subprocess.run([sys.executable, "-m", "jobs.cli", "ingest", "image-folder", source, "--shard-rows", "16",
                    "--no-progress", "--root", str(tmp_path / "b")], check=True, capture_output=True)
    in_process = read_manifest(open_storage(StorageConfig(root=str(tmp_path / "b"))), "imgs")
    strip = lambda m: {k: v for k, v in m.items() if k != "created_at"}
    assert json.dumps(strip(on_ray), sort_keys=True) == json.dumps(strip(in_process), sort_keys=True)
    shards = lambda root: {k: v for k, v in tree(root / "datasets").items() if k.endswith(".parquet")}
    assert shards(tmp_path / "a") == shards(tmp_path / "b") and len(shards(tmp_path / "a")) == 6


def test_a_bad_image_on_ray_data_is_the_same_one_line(tmp_path, local_storage_config, ray_local):
    source = image_folder(tmp_path / "imgs", 12)
    (source / "b" / "0004.png").write_bytes(b"not a png at all")
    with pytest.raises(VaegenError, match=r"^cannot read image .*0004\.png: [^\n]*$"):
        ingest_source("image-folder", str(source), local_storage_config, progress=False)
    assert not (tmp_path / "root").exists() or tree(tmp_path / "root") == {}


def test_one_pass_and_two_passes_write_the_same_shards(tmp_path):
    """Without --skip-bad the plan numbers the rows and each task writes its final shard; with it (nothing bad
    here) the images go through pieces first: the shards' bytes are the same."""
    from cluster.data.sources import IngestOptions
    from vae_core.config import StorageConfig
    source = str(image_folder(tmp_path / "imgs", 30))
    for root, skip_bad in (("one", False), ("two", True)):
        manifest = ingest_source("image-folder", source, StorageConfig(root=str(tmp_path / root)), shard_rows=8,
                                 progress=False, options=IngestOptions(skip_bad=skip_bad))
        assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [8, 8, 8, 6]
    shards = lambda root: sorted(v for k, v in tree(root / "datasets").items() if "/__g-" in k)
    assert shards(tmp_path / "one") == shards(tmp_path / "two")


def test_16_bit_images_scaled_are_counted_in_the_manifest_notes(tmp_path, local_storage_config):
    from cluster.data.sources import IngestOptions
    source = image_folder(tmp_path / "imgs", 4, size=(2, 3), classes=("a",))
    for i in range(2):
        Image.fromarray(np.full((2, 3), 1000 * (i + 1), np.uint16)).save(source / "a" / f"deep{i}.png")
    manifest = ingest_source("image-folder", str(source), local_storage_config, progress=False,
                             options=IngestOptions(mode="RGB"))
    assert manifest["notes"] == ["2 16-bit image(s) scaled to 8 bits (round(v / 257))"]
    card = open_storage(local_storage_config).read_bytes(dataset_key("imgs", "README.md")).decode()
    assert "2 16-bit image(s) scaled to 8 bits" in card
