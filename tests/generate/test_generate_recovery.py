"""Generation meeting trouble without a kill: a second driver of the same job waits on its lease, two workers
racing on one shard publish one object, a damaged finished job is withdrawn before its repair, a writer that
throws publishes nothing, a full disk or a worker's OSError is one line. After each, every id is present exactly
once and the shards are byte for byte what an undisturbed worker builds."""
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from generate_support import assert_complete_and_exact, publish_tiny_model, spec, wait_for, worker_in_stage

from cluster.generate.commit import read_committed_manifest
from cluster.generate.drill import STAGE_DELAY_ENV, stage_pause
from cluster.generate.driver import run_generation
from cluster.generate.plan import plan_job
from cluster.generate.pool import run_shards, start_workers, stop_workers
from cluster.generate.settings import RunSettings
from cluster.generate.shards import ShardMaker
from cluster.generate.writers import ParquetShardWriter
from cluster.store.layout import LEASE, RECEIPTS, SUCCESS
from cluster.store.records import sha256_hex
from cluster.store.registry import Registry
from cluster.store.storage import open_storage
from vae_core.config import StorageConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_same_shard_written_twice_at_once_is_one_object(ray_local, storage_config):
    import ray
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(spec(), storage)
    actors = start_workers(plan, storage_config, RunSettings(workers=2, max_restarts=0))
    try:
        records = ray.get([a.run_shard.remote(2) for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    assert records[0]["sha256"] == records[1]["sha256"]
    assert True in {r["published"] for r in records}
    assert [e.key for e in storage.list(plan.keys.data, recursive=True)] == [plan.shard_key(2)]
    assert sha256_hex(storage.read_bytes(plan.shard_key(2))) == records[0]["sha256"]


class ExplodingWriter(ParquetShardWriter):
    """A writer that fails after its first batch, like a full disk or a bug halfway through a shard."""

    def write(self, batch) -> None:
        if self.batches:
            raise OSError("disk full")
        super().write(batch)


def test_an_exception_inside_a_writer_publishes_nothing(storage_config):
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(spec(), storage)
    maker = ShardMaker(plan, storage, Registry(storage).load("tiny").model, writer_cls=ExplodingWriter)
    with pytest.raises(OSError, match="disk full"):
        maker.make(0)
    assert storage.list("outputs", recursive=True) == []


def test_the_drill_hook_is_off_unless_set_and_refuses_a_bad_setting():
    assert stage_pause(None) is None and stage_pause("") is None
    pause = stage_pause("decode=0.2, publish=0")
    pause("encode")                                      # a stage it does not name: no pause
    started = time.monotonic()
    pause("decode")
    assert time.monotonic() - started >= 0.2
    with pytest.raises(ValueError):
        stage_pause("decode=not-a-number")


def test_a_second_driver_waits_for_the_first_and_writes_nothing(ray_local, local_storage_config, monkeypatch, capfd):
    """Two drivers of one job at once (a cron retry overlapping a slow run): the second waits on the job's lease,
    then finds the job committed and returns its manifest; every shard is built once."""
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    job = spec()
    prefix = plan_job(job, storage).prefix
    monkeypatch.setenv(STAGE_DELAY_ENV, "publish=0.3")
    results: dict = {}

    def drive(name: str) -> None:
        results[name] = run_generation(job, local_storage_config, workers=1, progress=False)
    first = threading.Thread(target=drive, args=("first",))
    first.start()
    wait_for(lambda: storage.exists(f"{prefix}/{LEASE}"), what="the first driver's lease")
    second = threading.Thread(target=drive, args=("second",))
    second.start()
    first.join(timeout=300)
    second.join(timeout=300)

    assert results["first"]["run"]["shards_written"] == 6
    assert results["second"]["run"].get("already_complete") and results["second"]["run"]["shards_written"] == 0
    waited = capfd.readouterr().err
    assert "is being run by" in waited and f"{LEASE} expires in" in waited
    assert read_committed_manifest(storage, prefix)["shards"] == results["second"]["shards"]
    assert_complete_and_exact(storage, results["second"], job)


def test_a_damaged_finished_job_is_withdrawn_before_its_repair_and_nothing_is_deleted(ray_local, local_storage_config,
                                                                                    monkeypatch):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    job = spec()
    first = run_generation(job, local_storage_config, workers=1, progress=False)
    key = plan_job(job, storage).shard_key(4)
    damaged = storage.read_bytes(key)[:-50]
    storage.publish(key, damaged)
    monkeypatch.setenv(STAGE_DELAY_ENV, "decode=1.0")
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(run_generation(job, local_storage_config, workers=1,
                                                                          progress=False)))
    driver.start()
    wait_for(lambda: worker_in_stage(first["job_id"], "decode"), what="the repair under way")
    assert read_committed_manifest(storage, first["prefix"]) is None               # withdrawn first
    assert not storage.exists(f"{first['prefix']}/{SUCCESS}")
    assert storage.read_bytes(key) == damaged                                      # left for the publish path
    driver.join(timeout=300)
    assert (result["run"]["shards_written"], result["run"]["shards_skipped"]) == (1, 5)
    assert_complete_and_exact(storage, result, job)


@pytest.mark.ray                                        # its `vaegen` processes start a local Ray
def test_generate_onto_a_full_disk_is_one_line_and_a_rerun_with_space_resumes(tmp_path, small_disk):
    staging = open_storage(StorageConfig(root=str(tmp_path / "staging")), for_writing=True)
    publish_tiny_model(staging)
    model_bytes = sum(e.size for e in staging.list("", recursive=True))
    root = small_disk(model_bytes + 512 * 1024)           # room for the model and a few shards, not the job
    shutil.copytree(staging.base, root, dirs_exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "jobs.cli", "generate", "--model", "tiny", "--count", "6000", "--shard-size",
           "200", "--seed", "3", "--workers", "1", "--root", str(root), "--no-progress"]

    full = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1, full.stderr[-3000:]
    assert lines[0].startswith(f"vaegen: error: no space left on the disk holding {root}/outputs/"), lines[0]
    assert "free space and rerun to resume" in lines[0] and "\x1b[" not in full.stderr
    storage = open_storage(StorageConfig(root=str(root)))
    receipts = [e.key for e in storage.list("outputs", recursive=True) if f"/{RECEIPTS}/" in e.key]
    assert not [e.key for e in storage.list("outputs", recursive=True) if ".tmp-" in e.key]

    small_disk.grow(root, 256 << 20)                      # space freed: the same command finishes the job
    resumed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    written, skipped = map(int, re.search(r"\((\d+) written, (\d+) already there\)", resumed.stdout).groups())
    assert written + skipped == 30 and skipped >= len(receipts) >= 1


def test_a_failing_shard_lets_the_others_in_flight_end_before_its_error_is_raised(ray_local, tmp_path):
    """A shard that fails ends the run, but a shard mid-publish on the same actor is not killed mid-write (that
    would leave a temp file on a local disk): run_shards raises only once it has ended."""
    import ray

    @ray.remote(max_concurrency=2)
    class SlowAndFailingWorker:
        def run_shard(self, index: int) -> dict:
            if index == 0:
                time.sleep(0.2)
                raise OSError(28, "No space left on device")
            time.sleep(2.0)
            (tmp_path / f"shard-{index}").write_text("whole")
            return {"index": index}

    worker = SlowAndFailingWorker.remote()
    try:
        with pytest.raises(OSError, match="No space left"):
            run_shards([worker], [0, 1, 2], on_done=lambda record: None)
        assert (tmp_path / "shard-1").read_text() == "whole"          # the shard in flight ended
        assert not (tmp_path / "shard-2").exists()                    # and no new one started
    finally:
        stop_workers([worker])


def test_a_workers_os_error_reaches_the_driver_as_itself_not_as_rays_coloured_traceback(ray_local,
                                                                                         local_storage_config):
    import ray
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    job = spec()
    shards_folder = os.path.dirname(plan_job(job, storage).shard_key(0))
    storage.publish(shards_folder, b"a file where the shards' folder belongs")
    with pytest.raises(OSError) as raised:
        run_generation(job, local_storage_config, workers=1, progress=False)
    assert not isinstance(raised.value, ray.exceptions.RayTaskError)     # what the CLI prints in one line
    assert "\x1b[" not in str(raised.value) and "Traceback" not in str(raised.value)
