"""A finished job is a dataset the ecosystem opens as-is, without glue code: Hugging Face `datasets` (images decode to
PIL, features typed, labels named, no label column for an unconditional model), `webdataset`, `torchvision.io`,
PIL, Ray Data and pandas, given the job folder, its data/ folder or its shard pattern as they are; rows and pixels
match the manifest's counts and checksums. Its dataset card is Hub metadata that round-trips, and the command in it
makes the very same job. `vaegen ls` tells finished, partial and failed jobs apart. Every reader here reads one set
of jobs, made once (tests/generate/test_formats_round_trip.py reads every format × kind × model)."""
import hashlib
import io
import json
import os
import shlex
from types import SimpleNamespace

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
from cluster.store.layout import CARD, DATA_DIR, OUTPUTS, RUN_RECORD, SUCCESS, JobKeys, shard_braces, shard_name
from cluster.store.storage import open_storage
from jobs.cli import main as vaegen
from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_LABELS, ArrayDataset, ArraySplit
from vae_core.use_configs import GenerateConfig

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")     # nothing may reach the network


@pytest.fixture(scope="module")
def jobs(s3_server, starts_ray, small_fashion, tmp_path_factory):
    """One root with: `recon`, reconstructions (Parquet) of 300 real Fashion-MNIST test images by an unconditional
    model (the dataset's labels and class names); `samples`, 40 unconditional samples (Parquet, no labels); `tar`,
    120 class-conditional samples as PNG tars. The S3 server starts first: Ray workers inherit its env."""
    start_local_ray()
    cfg = StorageConfig(root=str(tmp_path_factory.mktemp("readers") / "root"))
    storage = open_storage(cfg, for_writing=True)
    _, (test_images, test_labels) = small_fashion
    ingest(storage, "fm", ArrayDataset({"test": ArraySplit(test_images[:300], test_labels[:300])},
                                       FASHION_MNIST_LABELS, "test"), shard_rows=100, progress=False)
    publish_tiny_model(storage, "tiny")
    publish_tiny_model(storage, "tiny-cond", num_classes=10)
    return SimpleNamespace(
        cfg=cfg, storage=storage,
        recon=run_reconstruction(GenerateConfig(model="tiny", kind="reconstructions", dataset="fm"), cfg,
                                 workers=2, progress=False),
        samples=run_generation(GenerateConfig(model="tiny", count=40, shard_size=20, seed=4), cfg, workers=2,
                               progress=False),
        tar=run_generation(GenerateConfig(model="tiny-cond", count=120, shard_size=50, format="png", seed=3), cfg,
                           workers=2, progress=False))


def job_dir(cfg: StorageConfig, manifest: dict) -> str:
    return os.path.join(cfg.root, manifest["prefix"])


def data_dir(cfg: StorageConfig, manifest: dict) -> str:
    return os.path.join(job_dir(cfg, manifest), DATA_DIR)


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


def test_hugging_face_datasets_loads_the_job_folder_typed_and_named(jobs):
    import datasets
    recon = jobs.recon
    ds = datasets.load_dataset(job_dir(jobs.cfg, recon), split="test")    # the split it reconstructs, named so
    assert ds.num_rows == recon["totals"]["rows"] == 300
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == list(FASHION_MNIST_LABELS)
    assert ds.features["latent"].length == 4
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (28, 28)
    assert ds.features["label"].int2str(first["label"]) == FASHION_MNIST_LABELS[first["label"]]
    images = [(row["id"], chw(row["image"])) for row in ds]
    assert shard_pixel_hashes(per_shard(images, recon)) == [s["pixels_sha256"] for s in recon["shards"]]

    unconditional = datasets.load_dataset(job_dir(jobs.cfg, jobs.samples), split="train")
    assert unconditional.num_rows == 40 and "label" not in unconditional.features
    assert isinstance(unconditional.features["image"], datasets.Image)


def test_webdataset_reads_the_png_tars_from_the_manifest_brace_pattern(jobs):
    import webdataset as wds
    tar = jobs.tar
    assert tar["shard_pattern"] == shard_braces("png", 3, "train")
    url = os.path.join(job_dir(jobs.cfg, tar), tar["shard_pattern"])
    rows = []
    for sample in wds.WebDataset(url, shardshuffle=False).decode("pill"):     # "pill": PIL images, mode L (grey)
        meta = sample["json"]
        assert sample["__key__"] == f"{meta['id']:010d}" and meta["label"] == meta["id"] % 10
        rows.append((meta["id"], chw(sample["png"])))
    assert sorted(i for i, _ in rows) == list(range(120))
    assert shard_pixel_hashes(per_shard(rows, tar)) == [s["pixels_sha256"] for s in tar["shards"]]
    assert tar["label_names"] == [f"class_{i}" for i in range(10)]


def test_the_card_of_a_tar_job_declares_features_that_datasets_reads(jobs):
    import datasets
    from huggingface_hub import DatasetCard
    folder = job_dir(jobs.cfg, jobs.tar)
    card = DatasetCard.load(os.path.join(folder, CARD)).data.to_dict()
    assert card["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.tar"}]
    assert "png" in [f["name"] for f in card["dataset_info"]["features"]]
    ds = datasets.load_dataset(folder, split="train")                     # the card's features, as declared
    assert ds.num_rows == 120 and isinstance(ds.features["png"], datasets.Image)
    assert isinstance(ds[0]["png"], Image.Image)
    assert sorted(row["json"]["id"] for row in ds) == list(range(120))
    if "cls" in ds.features:                                              # a tar with .cls members
        assert ds.features["cls"].names == [f"class_{i}" for i in range(10)]
        assert sorted(ds["cls"]) == sorted(i % 10 for i in range(120))


def test_pandas_and_ray_data_read_the_data_folder(jobs):
    import pandas as pd
    import ray
    recon = jobs.recon
    frame = pd.read_parquet(data_dir(jobs.cfg, recon))
    assert sorted(frame["id"]) == list(range(300)) and "label" in frame.columns
    images = [(i, chw(Image.open(io.BytesIO(image["bytes"])))) for i, image in zip(frame["id"], frame["image"])]
    assert shard_pixel_hashes(per_shard(images, recon)) == [s["pixels_sha256"] for s in recon["shards"]]
    rows = ray.data.read_parquet(data_dir(jobs.cfg, recon)).take_all()
    assert sorted(r["id"] for r in rows) == list(range(300))
    by_id = dict(zip(frame["id"], frame["image"]))
    assert all(by_id[r["id"]]["bytes"] == r["image"]["bytes"] for r in rows)

    unconditional = pd.read_parquet(data_dir(jobs.cfg, jobs.samples))
    assert sorted(unconditional["id"]) == list(range(40)) and "label" not in unconditional.columns
    assert ray.data.read_parquet(data_dir(jobs.cfg, jobs.samples)).count() == 40


def test_torchvision_and_pil_decode_the_image_bytes_as_they_are(jobs):
    import pandas as pd
    import torch
    from torchvision.io import decode_image
    cfg, recon = jobs.cfg, jobs.recon
    df = pd.read_parquet(data_dir(cfg, recon)).sort_values("id")
    for cell in df["image"][:5]:
        tensor = decode_image(torch.frombuffer(bytearray(cell["bytes"]), dtype=torch.uint8))
        assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.uint8
        with Image.open(io.BytesIO(cell["bytes"])) as im:
            assert im.format == "PNG" and im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), tensor[0].numpy())


def test_the_gallery_and_every_record_stay_out_of_the_data(jobs):
    """`vaegen show` writes its page into the job folder: data/ still reads as data alone, and beside it are the
    card and records whose names pyarrow's discovery skips."""
    import pandas as pd
    cfg, samples = jobs.cfg, jobs.samples
    keys = JobKeys(samples["prefix"])
    assert vaegen(["show", samples["job_id"], "--root", cfg.root]) == 0
    assert os.path.exists(os.path.join(cfg.root, keys.gallery))
    top = sorted(os.listdir(job_dir(cfg, samples)))
    assert [name for name in top if not name.startswith(("_", "."))] == [CARD, DATA_DIR]
    assert len(pd.read_parquet(data_dir(cfg, samples))) == 40


def test_the_card_round_trips_and_says_what_the_hub_expects(jobs):
    from huggingface_hub import DatasetCard
    cfg, recon, samples = jobs.cfg, jobs.recon, jobs.samples
    path = os.path.join(job_dir(cfg, recon), CARD)
    card = DatasetCard.load(path)
    assert "vaegen reconstruct --dataset fm --split test --model tiny" in card.text and recon["model"] in card.text
    again = DatasetCard(str(card))
    assert again.data.to_dict() == card.data.to_dict() and str(again) == str(card)
    data = card.data.to_dict()
    assert data["license"] == "mit"                                 # Fashion-MNIST's, recognised from its manifest
    assert data["source_datasets"] == ["extended|zalando-datasets/fashion_mnist"]
    assert data["size_categories"] == "n<1K" and "image-to-image" in data["task_categories"]
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "test",
                                                                          "path": "data/test-*.parquet"}]}]
    label = next(f for f in data["dataset_info"]["features"] if f["name"] == "label")
    assert list(label["dtype"]["class_label"]["names"].values()) == list(FASHION_MNIST_LABELS)
    unconditional = DatasetCard.load(os.path.join(job_dir(cfg, samples), CARD)).data.to_dict()
    assert "label" not in [f["name"] for f in unconditional["dataset_info"]["features"]]
    assert "unconditional-image-generation" in unconditional["task_categories"]


def test_the_command_in_the_card_makes_the_very_same_job(jobs, capsys):
    """A job made with the real CLI, every identity flag off its default: the card's command names it again."""
    from huggingface_hub import DatasetCard
    cfg, storage = jobs.cfg, jobs.storage
    assert vaegen(["generate", "--model", "tiny", "--count", "30", "--shard-size", "16", "--seed", "9",
                   "--pixels", "mean", "--decode-batch", "8", "--root", cfg.root, "--workers", "1"]) == 0
    first = capsys.readouterr().out
    job_id = first.split(" job ", 1)[1].split()[0]
    card = DatasetCard.load(os.path.join(cfg.root, OUTPUTS, job_id, CARD))
    command = card.text.split("```\nvaegen ", 1)[1].split("\n", 1)[0]
    assert "--pixels mean" in command and "--decode-batch 8" in command
    assert command.endswith(" --root <root>") and cfg.root not in card.text     # the root may move: no path
    command = command.replace("<root>", shlex.quote(cfg.root))
    assert "N(0, I)" in card.text                  # the tiny model has no fitted prior
    before = storage.list_dirs(OUTPUTS)
    manifest = storage.read_bytes(JobKeys.of(job_id).manifest)
    assert vaegen(shlex.split(command)) == 0
    assert f" job {job_id} " in capsys.readouterr().out
    assert storage.list_dirs(OUTPUTS) == before and storage.read_bytes(JobKeys.of(job_id).manifest) == manifest


def test_the_card_does_not_claim_a_standard_normal_prior_for_a_fitted_one():
    from cluster.generate.card import Provenance, RowLayout, dataset_card
    manifest = {"job_id": "samples-00", "kind": "samples", "format": "parquet", "model": "m@v0001",
                "weights_sha256": "ab" * 32, "prefix": "outputs/samples-00", "split": "train",
                "shard_pattern": "data/train-{00000..00001}-of-00002.parquet",
                "totals": {"rows": 20_000, "shards": 2, "bytes": 123}, "created_at": 0.0, "label_names": [],
                "libraries": {"vaegen": "0"}, "image_shape": [1, 28, 28],
                "spec": {"kind": "samples", "model": "m", "count": 20_000, "shard_size": 10_000, "seed": 0,
                         "labels": [], "pixels": "sample", "format": "parquet", "decode_batch": 4096,
                         "dataset": "", "split": "test"}}
    card = dataset_card(manifest, RowLayout(False, 4), Provenance("fm", prior_components=10))
    assert "N(0, I)" not in card.text and "mixture of 10 Gaussians" in card.text
    assert card.data.to_dict()["size_categories"] == "10K<n<100K" and card.data.to_dict()["license"] == "unknown"


def test_class_names_in_the_card_are_text_never_markup():
    from huggingface_hub import DatasetCard

    from cluster.generate.card import Provenance, RowLayout, dataset_card
    names = ["<script>alert(1)</script>", "[click](http://evil.example)", "two\nlines # head", "a|b*c_d`e`", "T-shirt"]
    manifest = {"job_id": "samples-00", "kind": "samples", "format": "parquet", "model": "m@v0001",
                "weights_sha256": "ab" * 32, "prefix": "outputs/samples-00", "split": "train",
                "shard_pattern": "data/train-{00000..00001}-of-00002.parquet",
                "totals": {"rows": 10, "shards": 1, "bytes": 123}, "created_at": 0.0, "label_names": names,
                "libraries": {"vaegen": "0"}, "image_shape": [1, 28, 28],
                "spec": {"kind": "samples", "model": "m", "count": 10, "shard_size": 10, "seed": 0,
                         "labels": [], "pixels": "sample", "format": "parquet", "decode_batch": 8,
                         "dataset": "", "split": "test"}}
    card = dataset_card(manifest, RowLayout(True, 4), Provenance("fm"))
    labels = next(line for line in card.text.splitlines() if line.startswith("- labels:"))
    assert labels == ("- labels: &lt;script&gt;alert\\(1\\)&lt;/script&gt;, \\[click\\]\\(http://evil.example\\), "
                      "two\\\\nlines \\# head, a\\|b\\*c\\_d\\`e\\`, T-shirt")
    assert "<script>" not in card.text and "\ntwo" not in card.text
    features = DatasetCard(str(card)).data.to_dict()["dataset_info"]["features"]
    assert list(next(f for f in features if f["name"] == "label")["dtype"]["class_label"]["names"].values()) == names


# -- vaegen ls -----------------------------------------------------------------------------------------------------

def test_ls_shows_finished_partial_and_failed_jobs(jobs, capsys):
    cfg, storage, recon, tar = jobs.cfg, jobs.storage, jobs.recon, jobs.tar
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
    assert states[recon["job_id"]] == ("finished", "3/3") and states[tar["job_id"]] == ("finished", "3/3")
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
    status = job_status(jobs.storage, "samples-0000000000000000")
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
