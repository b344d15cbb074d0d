"""Bigger images end to end (issue 27): a folder of 64×64 RGB images made here → ingest on Ray Data → the rgb64
conv model on Ray Train → generate → `vaegen show`."""
import json
import os

import numpy as np
import pytest
from conftest import root_args
from PIL import Image

from cluster.store.storage import open_storage
from jobs.cli import main

CLASSES = ("disc", "square", "stripes")


def shapes_folder(path, per_class: int, seed: int = 0):
    """Coloured shapes on a noisy background, one shape and hue family per class, at random places and sizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    for k, cls in enumerate(CLASSES):
        (path / cls).mkdir(parents=True)
        for i in range(per_class):
            cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(8, 16)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r if cls == "disc" else
                    (abs(yy - cy) < r) & (abs(xx - cx) < r) if cls == "square" else (xx // 6) % 2 == 0)
            colour = np.eye(3)[k] * rng.integers(150, 255) + rng.integers(0, 60, 3)
            img = rng.integers(0, 50, (64, 64, 3)) + mask[..., None] * colour
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path / cls / f"{i:04d}.png")
    return path


@pytest.mark.slow
def test_64x64_rgb_images_ingest_train_generate_and_show(tmp_path, local_storage_config, ray_local, capsys):
    args = root_args(local_storage_config)
    source = shapes_folder(tmp_path / "shapes64", per_class=700)
    assert main(["ingest", "image-folder", str(source), "--no-progress", *args]) == 0
    storage = open_storage(local_storage_config)
    manifest = json.loads(storage.read_bytes("datasets/shapes64/_manifest.json"))
    assert manifest["image_shape"] == [3, 64, 64] and manifest["splits"]["train"]["rows"] == 2100
    assert manifest["label_names"] == sorted(CLASSES)
    assert main(["train", "--dataset", "shapes64", "--name", "shapes64", "--preset", "rgb64", "--conditional",
                 "--epochs", "2", "--workers", "1", "--no-progress", *args]) == 0
    metrics = json.loads(storage.read_bytes("models/shapes64/v0001/metrics.json"))
    print("rgb64 test loss (nats/image):", metrics.get("test_loss", metrics.get("val_loss")))
    capsys.readouterr()
    assert main(["generate", "--model", "shapes64", "--count", "60", "--shard-size", "30", "--workers", "1",
                 "--no-progress", *args]) == 0
    jobs = [e for e in storage.list_dirs("outputs")]
    assert len(jobs) == 1
    assert main(["show", jobs[0], *args]) == 0
    assert "60 images in 2 of 2 shards" in capsys.readouterr().out
    assert main(["show", "shapes64", *args]) == 0
    assert os.path.exists(storage.path(f"outputs/{jobs[0]}/_gallery.html"))
