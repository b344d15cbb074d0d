"""A root is portable: copied to another folder (`cp -a`) or synced to S3, every record in it still holds, and
vaegen reads, resumes and reports it at its new location. No record, card or page under a root names the place
it was written in: records hold root-relative keys, and messages name the root vaegen was given."""
import os
import shutil
from pathlib import Path

import boto3
import pytest
from conftest import root_args

from cluster.data.datasets import ingest
from cluster.store.storage import open_storage
from jobs.cli import main as vaegen
from vae_core.config import StorageConfig
from vae_core.data import ArrayDataset, ArraySplit

TRAIN = ["--epochs", "1", "--max-images", "200", "--hidden-dim", "16", "--latent-dim", "2", "--no-progress"]
SAMPLES = ["generate", "--model", "m", "--count", "20", "--shard-size", "10", "--format", "png", "--workers", "1",
           "--no-progress"]
RECONSTRUCT = ["reconstruct", "--model", "m", "--dataset", "fm", "--split", "test", "--workers", "1",
               "--no-progress"]


@pytest.fixture
def written(ray_local, small_fashion, tmp_path, capsys):
    """A root with every kind of record vaegen writes: a dataset, a training run, a model version made champion
    and a retrain's decision, a tar job and a Parquet job, and `vaegen show`'s pages of a job and the model."""
    root = tmp_path / "made-here" / "root"
    cfg = StorageConfig(root=str(root))
    (train_x, train_y), (test_x, test_y) = small_fashion
    ingest(open_storage(cfg, for_writing=True), "fm", ArrayDataset(
        {"train": ArraySplit(train_x[:300], train_y[:300]), "test": ArraySplit(test_x[:40], test_y[:40])},
        tuple(str(i) for i in range(10)), "small_fashion"), progress=False)
    here = ["--root", str(root)]
    assert vaegen(["train", "--dataset", "fm", "--name", "m", "--run-id", "r1", *TRAIN, *here]) == 0
    assert vaegen(["retrain", "--dataset", "fm", "--name", "m", "--run-id", "r2", *TRAIN, *here]) == 0
    assert vaegen([*SAMPLES, *here]) == 0
    assert vaegen([*RECONSTRUCT, *here]) == 0
    job = capsys.readouterr().out.split("reconstructions job ", 1)[1].split()[0]
    assert vaegen(["show", job, *here]) == 0 and vaegen(["show", "m", *here]) == 0
    capsys.readouterr()
    return root, job


def files_naming(root: Path, place: Path) -> list[str]:
    """Every file under `root` whose bytes hold `place` (the logs folder aside: a log is what a run printed where
    it ran, not a record)."""
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and "logs" not in p.relative_to(root).parts and str(place).encode() in p.read_bytes()]


def reads_and_resumes_at(cfg: StorageConfig, job: str, capsys) -> None:
    """ls, show and a rerun of every command against the copy: each names the copy, and nothing is redone."""
    where = cfg.root.rstrip("/")
    capsys.readouterr()
    assert vaegen([*RECONSTRUCT, *root_args(cfg)]) == 0
    assert vaegen([*SAMPLES, *root_args(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count("(0 written, 1 already there)") + out.count("(0 written, 2 already there)") == 2
    assert f"at {where}/outputs/{job} (0 written" in out
    assert vaegen(["train", "--dataset", "fm", "--name", "m", "--run-id", "r1", *TRAIN, *root_args(cfg)]) == 0
    assert "m@v0001" in capsys.readouterr().out                          # the finished run, not a new version
    assert vaegen(["ls", *root_args(cfg)]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith(where) and "corrupt" not in listing.lower() and listing.count("finished") == 2
    assert vaegen(["show", job, *root_args(cfg)]) == 0 and vaegen(["show", "m@v0001", *root_args(cfg)]) == 0
    shown = capsys.readouterr().out
    assert f"{where}/outputs/{job}/" in shown and f"{where}/models/m/v0001/" in shown


def test_a_root_copied_to_another_folder_names_no_old_place_and_reads_and_resumes_there(written, tmp_path,
                                                                                        capsys):
    root, job = written
    copy = tmp_path / "copied-there" / "root"
    shutil.copytree(root, copy, symlinks=True)
    shutil.rmtree(root.parent)                                  # nothing may still lean on the old place
    assert files_naming(copy, root.parent) == []
    assert any((copy / "train-runs").rglob("_job.json")) and any((copy / "models" / "m").rglob("config.json"))
    reads_and_resumes_at(StorageConfig(root=str(copy)), job, capsys)
    assert files_naming(copy, root.parent) == []


def test_a_root_synced_to_s3_reads_and_resumes_there(written, s3_server, capsys):
    root, job = written
    prefix = f"synced-{os.getpid()}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in root.rglob("*"):                                 # what `aws s3 sync` would upload
        if path.is_file() and "logs" not in path.relative_to(root).parts:
            s3.put_object(Bucket="vaegen-test", Key=f"{prefix}/{path.relative_to(root)}", Body=path.read_bytes())
    shutil.rmtree(root.parent)
    reads_and_resumes_at(StorageConfig(root=f"s3://vaegen-test/{prefix}", s3_endpoint=s3_server), job, capsys)
