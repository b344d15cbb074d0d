"""Faults on real processes: a DecoderWorker killed by pid mid-shard, the driver (the CLI) killed mid-job,
two workers racing on one shard, a writer that throws. After each, every id is present exactly once and the
shards are byte-identical to what an undisturbed worker builds."""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from generate_support import all_rows, publish_tiny_model, sha256_hex, shard_objects

from cluster.generate.commit import read_committed_manifest
from cluster.generate.drill import STAGE_DELAY_ENV, stage_pause
from cluster.generate.driver import run_generation
from cluster.generate.plan import plan_job
from cluster.generate.pool import start_workers
from cluster.generate.settings import RunSettings
from cluster.generate.shards import ShardMaker
from cluster.generate.writers import ParquetShardWriter
from cluster.store.layout import LEASE, RECEIPTS, SUCCESS, JobKeys
from cluster.store.registry import Registry
from cluster.store.storage import open_storage
from vae_core.config import StorageConfig
from vae_core.use_configs import GenerateConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spec(**overrides) -> GenerateConfig:
    return GenerateConfig(**{"model": "tiny", "count": 48, "shard_size": 8, "seed": 3, "decode_batch": 4,
                             **overrides})


def expected_shards(storage, job: GenerateConfig) -> dict[str, str]:
    """sha256 of each shard as one undisturbed worker builds it (one torch thread, as in the actors)."""
    plan = plan_job(job, storage)
    maker = ShardMaker(plan, storage, Registry(storage).load(job.model).model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {r["name"]: r["sha256"] for r in (maker.build(i)[1] for i in range(plan.num_shards))}
    finally:
        torch.set_num_threads(threads)


def assert_complete_and_exact(storage, manifest, job):
    assert sorted(all_rows(storage, manifest)["id"]) == list(range(job.count))
    assert {k: sha256_hex(v) for k, v in shard_objects(storage, manifest).items()} == expected_shards(storage, job)
    assert storage.exists(f"{manifest['prefix']}/{SUCCESS}")


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_in_stage(job_id: str, stage: str) -> int | None:
    """The pid of a DecoderWorker of this job now inside `stage`, asked through its status() method."""
    import ray
    for name in ray.util.list_named_actors():
        if job_id in name:
            try:
                status = ray.get(ray.get_actor(name).status.remote(), timeout=2)
            except Exception:                      # restarting or gone: ask the next one
                continue
            if status["stage"] == stage:
                return status["pid"]
    return None


@pytest.mark.parametrize("stage, where", [("encode", "local"), ("publish", "s3"),
                                          pytest.param("encode", "s3", marks=pytest.mark.slow),
                                          pytest.param("publish", "local", marks=pytest.mark.slow)])
def test_a_worker_killed_mid_shard_loses_and_duplicates_nothing(ray_local, request, monkeypatch, stage, where):
    storage_config = request.getfixturevalue(f"{where}_storage_config")
    storage = open_storage(storage_config, for_writing=True)
    publish_tiny_model(storage)
    job = spec()
    job_id = plan_job(job, storage).job_id
    monkeypatch.setenv(STAGE_DELAY_ENV, f"{stage}=0.3")
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(run_generation(job, storage_config, workers=2,
                                                                          progress=False)))
    driver.start()
    pid = wait_for(lambda: worker_in_stage(job_id, stage), what=f"a worker in stage {stage}")
    os.kill(pid, signal.SIGKILL)
    assert not storage.exists(f"outputs/{job_id}/{SUCCESS}")
    driver.join(timeout=300)

    assert result["job_id"] == job_id and result["run"]["shards_written"] == 6
    assert_complete_and_exact(storage, result, job)


def test_the_driver_killed_mid_job_resumes_where_it_stopped(ray_local, local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    job = spec()
    prefix = plan_job(job, storage).prefix
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO, **{STAGE_DELAY_ENV: "publish=0.5"})
    cmd = [sys.executable, "-m", "jobs.cli", "generate", "--model", "tiny", "--count", "48", "--shard-size", "8",
           "--seed", "3", "--decode-batch", "4", "--workers", "1", "--root", local_storage_config.root,
           "--no-progress"]
    driver = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(storage.list(f"{prefix}/{RECEIPTS}")) >= 2 or driver.poll() is not None,
                 timeout=180, what="two finished shards")
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)                # the CLI and the local Ray it started
        driver.wait()
        driver.stderr.close()
    finished = len(storage.list(f"{prefix}/{RECEIPTS}"))
    assert 2 <= finished < 6
    assert not storage.exists(f"{prefix}/{SUCCESS}") and not storage.exists(JobKeys(prefix).manifest)

    resumed = run_generation(job, local_storage_config, workers=2, progress=False)
    assert resumed["run"]["shards_skipped"] >= finished
    assert resumed["run"]["shards_written"] + resumed["run"]["shards_skipped"] == 6
    assert_complete_and_exact(storage, resumed, job)
    assert not [e.key for e in storage.list(prefix, recursive=True) if ".tmp-" in e.key]   # no temp file left


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
