"""bench/gpu.py --smoke, as CI runs it: every row the GPU benchmark reports is there, with sane numbers (no
timings asserted: a figure is only checked to be a positive, finite number)."""
import json
import math
import os
import subprocess
import sys

import pytest

from cluster.generate.writers import WRITERS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.usefixtures("starts_ray")
def test_the_gpu_bench_smoke_reports_every_row(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")                # the CPU path, whatever the machine
    done = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--root", str(tmp_path / "root")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert all(r["bench"] == "gpu" for r in rows)
    by_what: dict[str, list[dict]] = {}
    for r in rows:
        by_what.setdefault(r["what"], []).append(r)

    (env_row,) = by_what["environment"]
    assert env_row["device"] == "cpu" and env_row["smoke"] is True

    bounds = {r["model"]: r for r in by_what["decoder_bound"]}
    assert set(bounds) == {"mlp", "conv"}
    assert all(positive(r["samples_per_s"]) and r["batch"] > 0 for r in bounds.values())

    generated = {(r["format"], r["model"]): r for r in by_what["generate"]}
    expected = {("parquet", "mlp"), ("parquet", "conv")} | {(f, "conv") for f in WRITERS if f != "parquet"}
    assert set(generated) == expected
    for r in generated.values():
        assert r["workers"] >= 1 and r["shards"] == -(-r["count"] // r["shard_size"])
        assert positive(r["steady_samples_per_s"]) and positive(r["startup_s"]) and positive(r["bytes_per_sample"])
        assert r["bound_samples_per_s"] == bounds[r["model"]]["samples_per_s"]
        assert r["ratio_to_bound"] == pytest.approx(r["steady_samples_per_s"] / r["bound_samples_per_s"])

    training = by_what["training"]
    assert training
    if os.path.exists(os.path.join(REPO, "bench", "gpu_train.py")):
        assert not any("skipped" in r for r in training), training
    else:
        assert "skipped" in training[0]
