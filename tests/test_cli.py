"""The `vaegen` command as a user runs it: help on every verb, the main path, one-line errors, exit codes."""
import json
import os
import subprocess
import sys
import threading

import pytest

from cluster.registry import Registry
from cluster.storage import open_storage
from vae_core.checkpoint import checkpoint_files
from vae_core.config import ModelConfig, StorageConfig
from vae_core.models import build_model


def vaegen(*args, env=None, check=False):
    """Run the CLI in a fresh interpreter, as the console script does."""
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaegen: error:"), proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("verb", ["ingest", "train", "sample", "pipeline"])
def test_every_verb_has_help(verb):
    out = vaegen(verb, "--help", check=True).stdout
    assert "--root" in out and "usage: vaegen" in out


@pytest.fixture(scope="module")
def ingested_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cli") / "root")
    vaegen("ingest", "fashion-mnist", "--root", root, "--no-progress", check=True)
    return root


def test_train_then_sample(ingested_root, tmp_path):
    out = vaegen("train", "--root", ingested_root, "--epochs", "1", "--max-images", "2000", "--hidden-dim", "64",
                 "--name", "tiny", "--no-progress", check=True).stdout
    assert "published tiny@v0001" in out
    version = os.path.join(ingested_root, "models", "tiny", "v0001")
    assert {"model.safetensors", "config.json", "metrics.json", "samples.png", "recon.png",
            "curves.png"} <= set(os.listdir(version))
    metrics = json.load(open(os.path.join(version, "metrics.json")))
    assert metrics["train_images"] == 1800 and metrics["test_images"] == 10000 and len(metrics["history"]) == 1
    png = tmp_path / "grid.png"
    vaegen("sample", "--root", ingested_root, "--model", "tiny", "--count", "16", "--out", str(png), check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, fragment", [
    (["train", "--epochs", "0"], "--epochs=0 must be > 0"),
    (["train", "--batch-size", "-1"], "--batch-size=-1 must be > 0"),
    (["train", "--dataset", "nope"], "no dataset 'nope'"),
    (["sample", "--model", "ghost"], "no model named 'ghost'"),
])
def test_bad_input_is_one_line_and_exit_2(ingested_root, args, fragment):
    assert_one_line_error(vaegen(*args, "--root", ingested_root), fragment)


def test_bad_roots_are_one_line_errors(tmp_path, s3_server):
    assert_one_line_error(vaegen("ingest", "fashion-mnist", "--root", "gs://b/x"), "unsupported storage URI scheme")
    assert_one_line_error(vaegen("ingest", "fashion-mnist", "--root", "s3://missing-bucket/x",
                                 "--s3-endpoint", s3_server), "bucket 'missing-bucket' does not exist")
    assert_one_line_error(vaegen("ingest", "fashion-mnist", str(tmp_path / "none"), "--root", str(tmp_path / "r")),
                          "does not exist")
    assert not (tmp_path / "r" / "datasets").exists()


def test_corrupt_idx_publishes_nothing(tmp_path):
    src = tmp_path / "fm"
    src.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (src / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)       # header cut short
    root = tmp_path / "root"
    assert_one_line_error(vaegen("ingest", "fashion-mnist", str(src), "--root", str(root)), "truncated")
    assert not (root / "datasets").exists()


def test_concurrent_publishes_never_share_a_version_number(storage_config):
    registry = Registry(open_storage(storage_config, for_writing=True))
    files = checkpoint_files(build_model(ModelConfig(image_shape=(1, 8, 8), hidden_dim=4, latent_dim=2)))
    refs = []
    threads = [threading.Thread(target=lambda: refs.append(registry.publish("m", files))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.version for r in refs) == ["v0001", "v0002", "v0003", "v0004"]
    assert registry.versions("m") == ["v0001", "v0002", "v0003", "v0004"]
    assert registry.resolve("m").version == "v0004" and registry.resolve("m@2").version == "v0002"
    assert registry.load("m@v0003").model.cfg.latent_dim == 2
