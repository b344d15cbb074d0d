"""A finished job is a dataset the ecosystem opens as-is: Hugging Face `datasets` (images decode to PIL, labels
carry names), `webdataset`, Ray Data and pandas; rows and pixels match the manifest's counts and checksums.
`vaegen ls` tells finished, partial and failed jobs apart."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
from conftest import start_local_ray
from generate_support import publish_tiny_model
from PIL import Image

from cluster.data.datasets import ingest
from cluster.generate.drill import STAGE_DELAY_ENV
from cluster.generate.driver import run_generation, run_reconstruction
from cluster.generate.plan import plan_job
from cluster.show.inventory import job_status, list_jobs
from cluster.store.layout import RUN_RECORD, SUCCESS, JobKeys, shard_braces, shard_name
from cluster.store.storage import open_storage
from jobs.cli import main as vaegen
from vae_core.config import StorageConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.use_configs import GenerateConfig

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")     # nothing may reach the network


@pytest.fixture(scope="module")
def jobs(s3_server, starts_ray, small_fashion, tmp_path_factory):
    """One root with: reconstructions (Parquet) of 300 real test images with Fashion-MNIST's class names, and
    120 class-conditional samples as PNG tars. The S3 server starts first: Ray workers inherit its env."""
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("outputs") / "root"))
    storage = open_storage(cfg, for_writing=True)
    _, (test_images, test_labels) = small_fashion
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(test_images[:300], test_labels[:300])}, names, "test"),
           shard_rows=100, progress=False)
    publish_tiny_model(storage, "tiny")
    publish_tiny_model(storage, "tiny-cond", num_classes=10)
    recon = run_reconstruction(GenerateConfig(model="tiny", kind="reconstructions", dataset="fm"), cfg,
                               workers=2, progress=False)
    samples = run_generation(GenerateConfig(model="tiny-cond", count=120, shard_size=50, format="png", seed=3), cfg,
                             workers=2, progress=False)
    return cfg, storage, recon, samples, names


def job_dir(cfg: StorageConfig, manifest: dict) -> str:
    return os.path.join(cfg.root, manifest["prefix"])


def shard_pixel_hashes(images_by_shard: list[list[np.ndarray]]) -> list[str]:
    """The manifest's pixels_sha256: sha256 of a shard's uint8 CHW images in id order."""
    return [hashlib.sha256(b"".join(np.ascontiguousarray(i).tobytes() for i in imgs)).hexdigest()
            for imgs in images_by_shard]


def chw(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def per_shard(rows: list[tuple[int, np.ndarray]], manifest: dict) -> list[list[np.ndarray]]:
    by_id = dict(rows)
    return [[by_id[i] for i in range(s["first_id"], s["last_id"] + 1)] for s in manifest["shards"]]


def test_hugging_face_datasets_loads_images_and_class_names(jobs):
    import datasets
    cfg, _, recon, _, names = jobs
    files = [os.path.join(job_dir(cfg, recon), s["name"]) for s in recon["shards"]]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")

    assert ds.num_rows == recon["totals"]["rows"] == 300
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == list(names)
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (28, 28)
    assert ds.features["label"].int2str(first["label"]) == names[first["label"]]
    images = [(row["id"], chw(row["image"])) for row in ds]
    assert shard_pixel_hashes(per_shard(images, recon)) == [s["pixels_sha256"] for s in recon["shards"]]


def test_the_dataset_card_is_what_load_dataset_reads_from_the_job_folder(jobs):
    import datasets
    cfg, storage, recon, _, names = jobs
    card = storage.read_bytes(JobKeys(recon["prefix"]).card).decode()
    assert card.startswith("---\n") and "data_files" in card and recon["model"] in card
    assert "vaegen reconstruct --dataset fm --split test --model tiny" in card
    ds = datasets.load_dataset(job_dir(cfg, recon), split="test")      # the test split, named so
    assert ds.num_rows == 300 and ds.features["label"].names == list(names)
    assert isinstance(ds[5]["image"], Image.Image)


def test_webdataset_reads_the_png_tars_from_the_manifest_brace_pattern(jobs):
    import webdataset as wds
    cfg, _, _, samples, _ = jobs
    assert samples["shard_pattern"] == shard_braces("png", 3, "train")
    url = os.path.join(job_dir(cfg, samples), samples["shard_pattern"])
    rows = []
    for sample in wds.WebDataset(url, shardshuffle=False).decode("pill"):     # "pill": PIL images, mode L (grey)
        meta = sample["json"]
        assert sample["__key__"] == f"{meta['id']:010d}" and meta["label"] == meta["id"] % 10
        rows.append((meta["id"], chw(sample["png"])))
    assert sorted(i for i, _ in rows) == list(range(120))
    assert shard_pixel_hashes(per_shard(rows, samples)) == [s["pixels_sha256"] for s in samples["shards"]]
    assert samples["label_names"] == [f"class_{i}" for i in range(10)]


def test_hugging_face_datasets_reads_the_png_tar_job_folder_as_webdataset(jobs):
    import datasets
    cfg, _, _, samples, _ = jobs
    ds = datasets.load_dataset(job_dir(cfg, samples), split="train")     # the card (README.md): data_files, features
    assert ds.num_rows == 120 and isinstance(ds[0]["png"], Image.Image)
    assert sorted(row["json"]["id"] for row in ds) == list(range(120))


def test_ray_data_and_pandas_read_the_parquet_shards(jobs):
    import pandas as pd
    import ray
    cfg, _, recon, _, _ = jobs
    folder = job_dir(cfg, recon)
    frame = pd.read_parquet([os.path.join(folder, s["name"]) for s in recon["shards"]])
    assert len(frame) == 300 and list(frame["id"]) == list(range(300))
    images = [(i, chw(Image.open(io.BytesIO(image["bytes"])))) for i, image in zip(frame["id"], frame["image"])]
    assert shard_pixel_hashes(per_shard(images, recon)) == [s["pixels_sha256"] for s in recon["shards"]]

    ds = ray.data.read_parquet([os.path.join(folder, s["name"]) for s in recon["shards"]])
    assert ds.count() == 300
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == list(range(300))
    by_id = {r["id"]: r["image"]["bytes"] for r in rows}
    assert all(by_id[i] == frame["image"][i]["bytes"] for i in range(300))


def test_ls_shows_finished_partial_and_failed_jobs(jobs, capsys):
    cfg, storage, recon, samples, _ = jobs
    # partial: a run that stopped after one of its shards (what a killed driver leaves: receipts, no _SUCCESS)
    partial = run_generation(GenerateConfig(model="tiny", count=60, shard_size=20, seed=11), cfg, progress=False)
    storage.delete(f"{partial['prefix']}/{SUCCESS}")
    keys = JobKeys(partial["prefix"])
    for name in (shard_name(1, "parquet", 3, "train"), shard_name(2, "parquet", 3, "train")):
        storage.delete(keys.shard(name))
        storage.delete(keys.receipt(name))
    # failed: a run whose workers die on every shard (the stage delay is not a number: ValueError in the actor)
    spec = GenerateConfig(model="tiny", count=30, shard_size=10, seed=12)
    failed_plan = plan_job(spec, storage)
    os.environ[STAGE_DELAY_ENV] = "decode=not-a-number"
    try:
        with pytest.raises(Exception):
            run_generation(spec, cfg, workers=1, progress=False, max_restarts=0)
    finally:
        del os.environ[STAGE_DELAY_ENV]

    states = {j.job_id: (j.state, j.progress) for j in list_jobs(storage)}
    assert states[recon["job_id"]] == ("finished", "3/3") and states[samples["job_id"]] == ("finished", "3/3")
    assert states[partial["job_id"]] == ("partial", "1/3")
    assert states[failed_plan.job_id] == ("failed", "0/3")
    record = json.loads(storage.read_bytes(f"{failed_plan.prefix}/{RUN_RECORD}"))
    assert record["status"] == "failed" and record["error"]

    assert vaegen(["ls", cfg.root]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "finished" in lines[recon["job_id"]] and "300" in lines[recon["job_id"]]
    assert "partial" in lines[partial["job_id"]] and "1/3" in lines[partial["job_id"]]
    assert "failed" in lines[failed_plan.job_id] and "0/3" in lines[failed_plan.job_id]
    assert "fm" in lines and "tiny@v0001" in out and "tiny-cond@v0001" in out


def test_job_status_of_an_unknown_job_is_partial_with_nothing_done(jobs):
    _, storage, _, _, _ = jobs
    status = job_status(storage, "samples-0000000000000000")
    assert (status.state, status.shards_done, status.shards_planned) == ("partial", 0, None)


def test_ls_writes_folder_names_escaped_never_as_terminal_control(tmp_path, capsys):
    root = tmp_path / "root"
    hostile = ["j\x1b]0;owned\x07", "k\x1b[2J\x1b[31mred", "l\u202egnp.exe"]
    for name in hostile:
        (root / "outputs" / name).mkdir(parents=True)
    assert vaegen(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.isprintable() or all(line.isprintable() for line in out.splitlines())
    for name in hostile:
        assert name not in out and ascii(name)[1:-1] in out
