"""Generation across several Ray nodes (ray.cluster_utils.Cluster: logical nodes on this machine): actors land
on different nodes, one node is removed mid-job with its worker busy, and the job still finishes with every
sample id exactly once and the same bytes an undisturbed worker builds. Also the driver's compact per-shard
ledger, which keeps its memory at ~100 bytes a shard."""
import threading

import pytest
from generate_support import assert_complete_and_exact, publish_tiny_model, spec, wait_for

from cluster.generate.commit import ShardLedger
from cluster.generate.drill import STAGE_DELAY_ENV
from cluster.generate.driver import run_generation
from cluster.generate.plan import plan_job
from cluster.runtime.ray_session import WORKER_ENV
from cluster.store.records import sha256_hex
from cluster.store.storage import open_storage

WORKERS = 3
WORKER_NODES = WORKERS + 1          # one spare: the removed node's actor restarts there


def worker_statuses(job_id: str) -> list[dict]:
    """status() of every live DecoderWorker of this job (pid, node id, stage, shard)."""
    import ray
    statuses = []
    for name in ray.util.list_named_actors():
        if job_id in name:
            try:
                statuses.append(ray.get(ray.get_actor(name).status.remote(), timeout=2))
            except Exception:                      # restarting or gone
                continue
    return statuses


@pytest.mark.slow
def test_a_node_removed_mid_job_loses_and_duplicates_nothing(ray_cluster, local_storage_config, monkeypatch):
    import ray
    cluster = ray_cluster(num_cpus=0)                                  # the head runs the driver, no workers
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20) for _ in range(WORKER_NODES)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)

    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    job = spec(count=96)                                               # 12 shards of 8
    job_id = plan_job(job, storage).job_id
    monkeypatch.setenv(STAGE_DELAY_ENV, "publish=0.3")                 # shards slow enough to catch one mid-way
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(run_generation(
        job, local_storage_config, workers=WORKERS, cpus_per_worker=1.0, progress=False)))
    driver.start()

    # one CPU per node and per actor: the three actors are on three different nodes
    busy = wait_for(lambda: (lambda s: s if len(s) == WORKERS and any(x["stage"] == "publish" for x in s) else None)(
        worker_statuses(job_id)), what="three workers, one publishing")
    assert len({s["node"] for s in busy}) == WORKERS
    victim_node_id = next(s["node"] for s in busy if s["stage"] == "publish")
    victim = next(n for n in nodes if n.node_id == victim_node_id)
    cluster.remove_node(victim, allow_graceful=False)                  # its raylet and workers are killed

    driver.join(timeout=300)
    assert not driver.is_alive()
    assert result["job_id"] == job_id and result["run"]["shards_written"] == 12
    assert_complete_and_exact(storage, result, job)
    # Ray marks the node dead after its health checks fail: a wait, however loaded the machine, not a race.
    alive = wait_for(lambda: (lambda a: a if victim_node_id not in a else None)(
        {n["NodeID"] for n in ray.nodes() if n["Alive"]}), what="Ray to mark the removed node dead")
    assert len(alive) == WORKER_NODES                                  # head + the three nodes left


def test_the_ledger_gives_back_exactly_the_records_it_was_given(local_storage_config):
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(spec(count=20), storage)                           # 3 shards: 8, 8, 4 rows
    ledger = ShardLedger(plan)
    zero_tail = "ab" * 31 + "00"                                       # a digest ending in a zero byte survives
    records = [{"index": i, "name": plan.shard_name(i), "rows": plan.task(i).rows,
                "first_id": plan.task(i).first_id, "last_id": plan.task(i).first_id + plan.task(i).rows - 1,
                "bytes": 1000 + i, "sha256": sha256_hex(bytes([i])), "pixels_sha256": zero_tail} for i in (2, 0)]
    for record in records:
        ledger.add(record)
    assert ledger.missing() == [1] and 0 in ledger and 1 not in ledger and len(ledger) == 2
    assert ledger.rows() == 12 and ledger.total_bytes() == 2002
    for record in records:
        assert ledger.entry(record["index"]) == {k: v for k, v in record.items() if k != "index"}
