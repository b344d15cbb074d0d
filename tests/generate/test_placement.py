"""Where DecoderWorkers go: --workers auto sized from the cluster's nodes (size_placement, on synthetic resource
dicts), and on a real multi-node Ray (ray.cluster_utils.Cluster) whose nodes declare fake GPUs: every GPU gets
a worker, none holds more models than its declared memory can, a worker on a fake GPU decodes on the CPU, and a
node killed mid-job loses and duplicates nothing."""
import math
import random
import threading

import pytest
import torch
from generate_support import assert_complete_and_exact, publish_tiny_model, spec, wait_for
from test_scale_cluster import worker_statuses

from cluster.generate.drill import STAGE_DELAY_ENV
from cluster.generate.driver import run_generation
from cluster.generate.plan import plan_job
from cluster.generate.pool import placed_settings, start_workers, stop_workers, worker_device
from cluster.generate.settings import RunSettings
from cluster.runtime.placement import (
    DEFAULT_CPU_WORKERS,
    DEFAULT_CPUS_PER_WORKER,
    GPU_MEMORY_RESOURCE,
    GPU_MEMORY_USABLE,
    UNKNOWN_MEMORY_WORKERS_PER_GPU,
    size_placement,
    worker_gpu_bytes,
)
from cluster.runtime.ray_session import WORKER_ENV
from cluster.store.storage import open_storage
from vae_core.errors import VaegenError

GIB = 2**30
CONV = worker_gpu_bytes(13_000_000, (1, 28, 28), 4096)        # about the fmnist-best conv decoder's footprint


def size(nodes, workers=None, cpus=None, gpus=None, *, footprint=CONV, memory=None):
    return size_placement(nodes, workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus,
                          worker_gpu_bytes=footprint, gpu_memory_bytes=memory)


def most_per_gpu(fraction: float) -> int:
    """What Ray packs onto one GPU at this fraction (it keeps 4 decimals)."""
    return 1 if fraction > 0.5 else int(1 / round(fraction, 4) + 1e-9)


def test_a_gpu_node_is_used_whole_one_worker_per_usable_cpu():
    workers, cpus, gpus = size([{"CPU": 16.0, "GPU": 1.0}], memory=141 * GIB)
    assert (workers, cpus) == (15, 1.0) and most_per_gpu(gpus) == 15 and workers * gpus <= 1


def test_gpu_memory_caps_the_workers_per_gpu():
    small = 4 * GIB                                                       # holds 4 footprints of about 0.9 GiB
    fits = int(small * GPU_MEMORY_USABLE // CONV)
    workers, cpus, gpus = size([{"CPU": 64.0, "GPU": 2.0}], memory=small)
    assert workers == 2 * fits and most_per_gpu(gpus) == fits
    # a GPU that cannot hold two models gets one worker, with the whole GPU
    assert size([{"CPU": 64.0, "GPU": 2.0}], memory=1.5 * CONV) == (2, 1.0, 1.0)
    # declared per node (summed over its GPUs); the smallest node decides the fraction for all
    nodes = [{"CPU": 32.0, "GPU": 2.0, GPU_MEMORY_RESOURCE: 2 * 80 * 1024},
             {"CPU": 32.0, "GPU": 2.0, GPU_MEMORY_RESOURCE: 2 * 3 * 1024}]
    workers, _, gpus = size(nodes, memory=141 * GIB)
    assert most_per_gpu(gpus) == int(3 * GIB * GPU_MEMORY_USABLE // CONV) and workers == 4 * most_per_gpu(gpus)
    # nothing known about the memory: a conservative cap
    assert most_per_gpu(size([{"CPU": 128.0, "GPU": 1.0}])[2]) == UNKNOWN_MEMORY_WORKERS_PER_GPU


def test_every_gpu_gets_a_worker_even_with_few_cpus():
    workers, cpus, gpus = size([{"CPU": 2.0, "GPU": 2.0}, {"CPU": 2.0, "GPU": 2.0}], memory=141 * GIB)
    assert (workers, gpus) == (4, 1.0) and cpus * 2 <= 2


def test_without_gpus_the_cpu_settings_stay_as_they_were():
    assert size([{"CPU": 64.0}, {"CPU": 8.0, "memory": 1e9}]) == (DEFAULT_CPU_WORKERS, DEFAULT_CPUS_PER_WORKER, 0.0)
    assert size([{"CPU": 64.0}], workers=7, cpus=2.0) == (7, 2.0, 0.0)
    assert size([{"CPU": 64.0, "GPU": 1.0}], gpus=0.0) == (DEFAULT_CPU_WORKERS, DEFAULT_CPUS_PER_WORKER, 0.0)
    assert size([{"CPU": 4.0}], workers=2, gpus=1.0)[2] == 1.0           # kept: placement refuses it clearly


def test_explicit_flags_are_kept_and_the_rest_sized_around_them():
    node = [{"CPU": 16.0, "GPU": 2.0}]
    assert size(node, gpus=0.25, memory=141 * GIB)[:1] == (8,) and size(node, gpus=0.25)[2] == 0.25
    workers, cpus, gpus = size(node, workers=4, memory=141 * GIB)
    assert workers == 4 and gpus == 0.5 and cpus == 1.0
    assert size(node, workers=4, cpus=3.0, gpus=0.1) == (4, 3.0, 0.1)


def test_random_clusters_never_overfill_a_gpu_or_a_node():
    rng = random.Random(7)
    for _ in range(500):
        nodes = [{"CPU": float(rng.randint(1, 128)), "GPU": float(rng.choice([0, 1, 2, 4, 8]))}
                 for _ in range(rng.randint(1, 4))]
        memory = rng.choice([None, 2 * GIB, 16 * GIB, 80 * GIB])
        footprint = rng.choice([CONV, 700 * 2**20, 5 * GIB])
        workers, cpus, gpus = size(nodes, footprint=footprint, memory=memory)
        gpu_nodes = [n for n in nodes if n["GPU"]]
        if not gpu_nodes:
            assert (workers, gpus) == (DEFAULT_CPU_WORKERS, 0.0)
            continue
        fits = int(memory * GPU_MEMORY_USABLE // footprint) if memory else UNKNOWN_MEMORY_WORKERS_PER_GPU
        assert most_per_gpu(gpus) <= max(1, fits)                          # never more models than a GPU holds
        total = sum(n["GPU"] for n in gpu_nodes)
        assert workers * gpus <= total + 1e-9 and workers >= total          # every GPU has one
        per_node = [math.ceil(workers * n["GPU"] / total) for n in gpu_nodes]
        assert all(k * cpus <= n["CPU"] for k, n in zip(per_node, gpu_nodes))


def test_workers_auto_is_the_default_and_the_flag_takes_a_number_or_auto():
    assert RunSettings().workers == "auto" and not RunSettings().sized
    assert RunSettings(workers="3").workers == 3
    assert RunSettings(workers=2, cpus_per_worker=0.5, gpus_per_worker=0.0).sized
    with pytest.raises(VaegenError, match="--workers='many' must be a number or auto"):
        RunSettings(workers="many")


def test_a_worker_given_a_gpu_without_cuda_decodes_on_the_cpu():
    assert worker_device("cpu") == "cpu"
    assert worker_device("cuda") == ("cuda" if torch.cuda.is_available() else "cpu")


FAKE_GPU_NODE = {"num_cpus": 3, "num_gpus": 2, "object_store_memory": 80 * 2**20,
                 # two "GPUs" of 1000 MiB: one tiny model's footprint (its CUDA context) fits once, not twice
                 "resources": {GPU_MEMORY_RESOURCE: 2000}}


def fake_gpu_cluster(ray_cluster):
    import ray
    cluster = ray_cluster(num_cpus=0)                                  # the head runs the driver, no workers
    nodes = [cluster.add_node(**FAKE_GPU_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
    return cluster, nodes


@pytest.mark.slow
def test_auto_workers_cover_every_fake_gpu_once_and_decode_on_the_cpu(ray_cluster, local_storage_config):
    fake_gpu_cluster(ray_cluster)
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    plan = plan_job(spec(), storage)
    settings = placed_settings(RunSettings(), plan, storage)
    assert (settings.workers, settings.gpus_per_worker) == (4, 1.0)      # memory, not CPUs, decides: 1 per GPU
    actors = start_workers(plan, local_storage_config, settings, joined=True)
    try:
        statuses = wait_for(lambda: (lambda s: s if len(s) == 4 else None)(worker_statuses(plan.job_id)),
                            what="four workers")
    finally:
        stop_workers(actors)
    placed = [(s["node"], tuple(s["gpus"])) for s in statuses]
    assert len(set(placed)) == 4 and all(len(gpus) == 1 for _, gpus in placed)    # each GPU once
    assert {s["device"] for s in statuses} == {"cpu"}                    # fake GPUs: torch sees no CUDA


@pytest.mark.slow
def test_a_gpu_node_killed_mid_job_loses_and_duplicates_nothing(ray_cluster, local_storage_config, monkeypatch):
    import ray
    cluster, nodes = fake_gpu_cluster(ray_cluster)
    storage = open_storage(local_storage_config, for_writing=True)
    publish_tiny_model(storage)
    job = spec(count=96)                                               # 12 shards of 8
    job_id = plan_job(job, storage).job_id
    monkeypatch.setenv(STAGE_DELAY_ENV, "publish=0.3")
    result: dict = {}
    driver = threading.Thread(target=lambda: result.update(run_generation(job, local_storage_config,
                                                                          progress=False)))
    driver.start()
    busy = wait_for(lambda: (lambda s: s if len(s) == 4 and any(x["stage"] == "publish" for x in s) else None)(
        worker_statuses(job_id)), what="four workers, one publishing")
    cluster.add_node(**FAKE_GPU_NODE)                                  # the replacement an autoscaler would add
    victim_node_id = next(s["node"] for s in busy if s["stage"] == "publish")
    cluster.remove_node(next(n for n in nodes if n.node_id == victim_node_id), allow_graceful=False)

    driver.join(timeout=300)
    assert not driver.is_alive()
    assert result["job_id"] == job_id and result["run"]["shards_written"] == 12
    assert result["run"]["workers"] == 4
    assert_complete_and_exact(storage, result, job)
    wait_for(lambda: victim_node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]},
             what="the killed node reported dead")                      # the GCS notices within its health checks
