"""Generation survives kills on real processes: a DecoderWorker SIGKILLed mid-shard, the driver (the CLI) killed
mid-job, and chaos, three drivers of one job at once as separate processes joined to one Ray, over S3 behind a
fault-injecting proxy (409/500/503/SlowDown answers, connections reset mid-body, delays), with drivers and
DecoderWorker actors SIGKILLed at random over several rounds. After each, every id is present exactly once and the
shards are byte for byte what an undisturbed worker builds."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from generate_support import (all_rows, assert_complete_and_exact, publish_tiny_model, shard_objects, spec, wait_for,
                              worker_in_stage)
from s3_fault_proxy import FaultProxy

from cluster.generate.commit import read_committed_manifest
from cluster.generate.drill import STAGE_DELAY_ENV
from cluster.generate.driver import run_generation
from cluster.generate.lease import LEASE_TTL_ENV
from cluster.generate.plan import plan_job
from cluster.store.layout import LEASE, RECEIPTS, SUCCESS, JobKeys
from cluster.store.storage import open_storage
from vae_core.config import StorageConfig
from vae_core.use_configs import GenerateConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    # A short lease TTL: the killed driver's lease then blocks the resume for seconds, not the default minute (a
    # lease that outlives its driver is tests/generate/test_generate.py's subject, not this test's).
    env.update(PYTHONPATH=REPO, **{STAGE_DELAY_ENV: "publish=0.5", LEASE_TTL_ENV: "4"})
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


# -- chaos: three drivers, faults and kills ---------------------------------------------------------------------------
SHARDS = 12
JOB = GenerateConfig(model="tiny", count=SHARDS * 64, shard_size=64, seed=5, decode_batch=16)
DRIVERS, ROUNDS = 3, 3
HANG_GUARD_S = 300


def driver_command(root: str, endpoint: str, address: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "generate", "--model", JOB.model, "--count", str(JOB.count),
            "--shard-size", str(JOB.shard_size), "--seed", str(JOB.seed), "--decode-batch", str(JOB.decode_batch),
            "--workers", "2", "--cpus-per-worker", "0.5", "--root", root, "--s3-endpoint", endpoint,
            "--address", address, "--no-progress"]


def decoder_pids(job_id: str) -> list[int]:
    """pids of the live DecoderWorkers of this job, whichever driver (Ray namespace) owns them."""
    import ray
    pids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if job_id in actor["name"]:
            try:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids.append(ray.get(handle.status.remote(), timeout=2)["pid"])
            except Exception:                  # restarting, or its driver just died
                continue
    return pids


def done_shards(storage, plan) -> int:
    return len(storage.list(f"{plan.prefix}/{RECEIPTS}"))


def lease_holder_pid(storage, plan) -> int | None:
    """The pid in the owner of the job's lease ("host:pid:nonce"), if a lease is there."""
    key = f"{plan.prefix}/{LEASE}"
    try:
        return int(json.loads(storage.read_bytes(key))["owner"].split(":")[1]) if storage.exists(key) else None
    except (ValueError, KeyError, IndexError):
        return None


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_three_drivers_under_faults_and_kills_commit_every_id_exactly_once(ray_local, s3_server, tmp_path):
    import ray
    rng = random.Random(17)
    direct = StorageConfig(root="s3://vaegen-test/chaos", s3_endpoint=s3_server)       # moto, no faults
    storage = open_storage(direct, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(JOB, storage)
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": REPO, LEASE_TTL_ENV: "4", STAGE_DELAY_ENV: "decode=0.05,publish=0.5"}
    env.pop("RAY_ADDRESS", None)
    kills = {"drivers": 0, "workers": 0}

    with FaultProxy(s3_server, seed=3, error_rate=0.08, reset_rate=0.03, delay_rate=0.1, max_delay_s=0.2) as proxy:
        for round_ in range(ROUNDS):
            logs = [open(tmp_path / f"driver-{round_}-{k}.log", "wb") for k in range(DRIVERS)]
            drivers = []
            for log in logs:
                drivers.append(subprocess.Popen(driver_command(direct.root, proxy.url, address), env=env, cwd=REPO,
                                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
                time.sleep(rng.uniform(0, 1.5))
            # Run until another quarter of the job is done (a hang guard only bounds the wait), killing a
            # DecoderWorker now and then; then kill the lease holder, let the others take over for a moment, and
            # kill every driver left.
            target = min(done_shards(storage, plan) + SHARDS // (ROUNDS + 1), SHARDS)
            deadline = time.monotonic() + HANG_GUARD_S
            while done_shards(storage, plan) < target and any(d.poll() is None for d in drivers):
                assert time.monotonic() < deadline, f"round {round_}: no progress to {target} shards"
                time.sleep(rng.uniform(0.5, 2))
                if rng.random() < 0.4 and (pids := decoder_pids(plan.job_id)):
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills["workers"] += 1
            alive = [d for d in drivers if d.poll() is None]
            holder = lease_holder_pid(storage, plan)
            victims = [d for d in alive if d.pid == holder] or alive[:1]    # the holder, else any live driver
            for driver in victims:
                kill_group(driver)
                kills["drivers"] += 1
            time.sleep(rng.uniform(2, 6))
            print(f"round {round_}: {done_shards(storage, plan)} shards done, exit codes {[d.poll() for d in drivers]}")
            for driver in drivers:
                kill_group(driver)
            for log in logs:
                log.close()
            committed = read_committed_manifest(storage, plan.prefix)
            assert committed is None or sorted(all_rows(storage, committed)["id"]) == list(range(JOB.count))

        done_before_final = done_shards(storage, plan)
        proxy.set_rates(error_rate=0.0, reset_rate=0.0, delay_rate=0.0)
        final = run_generation(JOB, StorageConfig(root=direct.root, s3_endpoint=proxy.url), workers=2,
                               progress=False)
    print(f"kills {kills}, proxy {dict(proxy.counts)}, final run {final['run']}")     # shown when it fails
    assert proxy.counts["passed"] and sum(v for k, v in proxy.counts.items() if k != "passed"), proxy.counts
    assert kills["drivers"] > 0 and final["run"]["shards_skipped"] >= done_before_final    # a real resume

    committed = read_committed_manifest(storage, plan.prefix)
    assert committed is not None and committed["shards"] == final["shards"]            # _SUCCESS names it
    assert sorted(all_rows(storage, committed)["id"]) == list(range(JOB.count))        # every id exactly once
    fresh = StorageConfig(root=str(tmp_path / "fresh"))
    publish_tiny_model(open_storage(fresh, for_writing=True))
    clean = run_generation(JOB, fresh, workers=1, progress=False)
    assert clean["job_id"] == committed["job_id"] and clean["shards"] == committed["shards"]
    assert shard_objects(open_storage(fresh), clean) == shard_objects(storage, committed)
