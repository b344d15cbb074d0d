"""The generation write path's packaging: the worker's uint8 conversion gives vae_core's bytes, the tar writers'
framing refuses what it did not write whole, and the packaging benchmark (bench/package.py) runs end to end in
its smoke mode, one JSON line per measurement."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.generate.shards import uint8_pixels
from cluster.generate.writers import DecodedBatch, PngTarShardWriter, ShardInfo, tar_member_count
from cluster.generate.writers.tar import check_members
from vae_core.images import to_uint8

ROOT = Path(__file__).resolve().parents[2]


def test_the_workers_uint8_conversion_gives_to_uint8s_bytes_at_every_rounding_edge():
    k = torch.arange(256, dtype=torch.float32)
    half = (k + 0.5) / 255                                 # exactly between two levels, and a hair either side
    edges = torch.cat([k / 255, half, torch.nextafter(half, torch.tensor(2.0)), torch.nextafter(half, torch.tensor(-1.0)),
                       torch.tensor([-0.5, 1.5, float("inf"), -float("inf")])])
    noise = torch.rand(2048 - len(edges), generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2
    images = torch.cat([edges, noise]).reshape(2, 1, 32, 32)
    expected = to_uint8(images)
    got = uint8_pixels(images.clone())
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.slow                          # the bench itself, end to end: seconds of packaging
def test_the_packaging_bench_smoke_mode_measures_every_format_and_shape(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "package.py"), "--smoke", "--tmp", str(tmp_path)],
                         capture_output=True, text=True, check=True, env=env, timeout=300)
    records = [json.loads(line) for line in out.stdout.splitlines()]
    totals = [r for r in records if r["measure"].startswith("packaging per sample")]
    assert {(r["format"], tuple(r["shape"])) for r in totals} == {
        (f, s) for f in ("parquet", "png", "jpeg") for s in ((1, 28, 28), (3, 32, 32))}
    assert all(r["cpu_us_per_sample"]["median"] > 0 and r["bytes_per_sample"] > 0 for r in totals)
    stages = {(r["format"], r["stage"]) for r in records if r["measure"] == "stage"}
    assert {s for _, s in stages} == {"convert", "encode", "frame", "hash", "write"}
    assert {r["codec"] for r in records if r["measure"] == "codec alone"} == {"libdeflate", "libjpeg-turbo"}
    assert not list(tmp_path.iterdir())                       # every local root it wrote is gone


def test_the_tar_writers_read_back_refuses_a_damaged_header_a_wrong_size_or_a_missing_end():
    writer = PngTarShardWriter(ShardInfo(index=0, seed=1, model="tiny@v0001", weights_sha256="ab" * 32, job_id="j"))
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    writer.write(DecodedBatch(np.arange(5, dtype=np.int64), np.arange(5) % 2, np.zeros((5, 3), np.float32), images))
    data, sizes = writer.close(), np.concatenate(writer.sizes)
    assert tar_member_count(data) == len(sizes) == 15
    check_members(data, sizes)                                   # what close() ran: passes on its own bytes
    damaged = bytearray(data)
    damaged[512 * 2 + 3] ^= 1                                    # inside the second member's header (the first's data is one block)
    for bad, want in ((bytes(damaged), sizes), (data, sizes + np.eye(len(sizes), dtype=np.int64)[4]),
                      (data[:512 * 7], sizes), (data[:len(data) // 2 + 1], sizes)):
        with pytest.raises(ValueError, match="checksum|truncated|zero blocks"):
            check_members(bad, want)


def test_a_tar_encoder_that_drops_an_image_is_refused_not_shortened():
    class Dropping(PngTarShardWriter):
        def encode(self, images):
            return super().encode(images)[:-1]

    writer = Dropping(ShardInfo(index=0, seed=1, model="tiny@v0001", weights_sha256="ab" * 32, job_id="j"))
    images = np.zeros((3, 1, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="members for 3 rows"):
        writer.write(DecodedBatch(np.arange(3, dtype=np.int64), None, np.zeros((3, 2), np.float32), images))
