"""Data-parallel training on Ray Train: real local Ray, S3 over HTTP (moto server), real Fashion-MNIST images.

2,000 training images (200 held out) and 500 test images; tiny epochs so that each fit takes seconds of
training (most of a fit here is Ray Train's start-up)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
from conftest import free_port, unique_name

from cluster.data.datasets import bind_model_to_dataset, ingest, read_manifest, shard_keys
from cluster.store.registry import Registry
from cluster.store.storage import Storage, open_storage
from cluster.train.driver import train_model
from cluster.train.on_ray import RUNS_DIR, STATE_FILE
from jobs.cli import main as vaegen
from vae_core.config import ModelConfig, RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.errors import VaegenError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASET = "fm"
INTERRUPTED_EPOCHS = 2     # a run interrupted after its first epoch's checkpoint still has a streamed epoch to resume
# In-memory epochs of this data take a fraction of a second each: a run of this many, whose worker is killed as its
# first checkpoint lands, is still far from its end then, however loaded the machine (both slow down together).
KILLED_WORKER_EPOCHS = 30


def ingest_small_fashion(cfg: StorageConfig, small_fashion) -> Storage:
    (train_x, train_y), (test_x, test_y) = small_fashion
    dataset = ArrayDataset({"train": ArraySplit(train_x, train_y), "test": ArraySplit(test_x, test_y)},
                           tuple(str(i) for i in range(10)), "fashion-mnist (first 2,000/500)")
    storage = open_storage(cfg, for_writing=True)
    ingest(storage, DATASET, dataset, shard_rows=500, progress=False)
    return storage


def job_for(cfg: StorageConfig, *, workers: int = 2, epochs: int = 6, patience: int = 10, run_id: str = "",
            **ray_settings) -> TrainJobConfig:
    return TrainJobConfig(storage=cfg, dataset=DATASET, name="fm-mlp",
                          model=ModelConfig(hidden_dim=128, latent_dim=8),
                          train=TrainConfig(epochs=epochs, batch_size=64, patience=patience),
                          run_id=run_id or unique_name("run"), ray=RayTrainConfig(workers=workers, **ray_settings))


def checkpoint_keys(storage: Storage, run_id: str) -> list[str]:
    return [e.key for e in storage.list(f"{RUNS_DIR}/{run_id}", recursive=True) if e.key.endswith(STATE_FILE)]


def registered_checkpoints(storage: Storage, run_id: str) -> int:
    """Checkpoints Ray Train has recorded in its run snapshot (a checkpoint only counts once it is there)."""
    key = f"{RUNS_DIR}/{run_id}/checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(storage.read_bytes(key))["checkpoint_results"]) if storage.exists(key) else 0
    except ValueError:                                   # caught mid-write
        return 0


def wait_for_checkpoint(storage: Storage, run_id: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not registered_checkpoints(storage, run_id):
        if time.time() > deadline:
            raise TimeoutError(f"no checkpoint of {run_id} after {timeout_s} s")
        time.sleep(0.1)


def train_worker_pids() -> list[int]:
    """Ray Train's worker actors of the Ray this test process started (never another user's): processes
    descending from this one whose title starts with ray::RayTrainWorker."""
    parent, title = {}, {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title[int(entry)] = f.read().decode(errors="replace")
        except (ValueError, OSError):
            continue
    mine = {os.getpid()}
    for _ in range(8):                                   # driver → raylet → workers: a few levels deep
        mine |= {pid for pid, ppid in parent.items() if ppid in mine}
    return sorted(pid for pid in mine if title.get(pid, "").startswith("ray::RayTrainWorker"))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3_fashion(s3_server, small_fashion) -> StorageConfig:
    cfg = StorageConfig(root=f"s3://vaegen-test/{unique_name('train-ray')}", s3_endpoint=s3_server)
    ingest_small_fashion(cfg, small_fashion)
    return cfg


@pytest.fixture(scope="module")
def two_worker_run(s3_fashion, starts_ray):
    from conftest import start_local_ray
    start_local_ray()
    job = job_for(s3_fashion, workers=2)
    return job, train_model(job, progress=False)


def test_two_workers_checkpoint_to_s3_and_publish_a_loadable_version(s3_fashion, two_worker_run):
    job, result = two_worker_run
    storage = open_storage(s3_fashion)
    assert storage.is_s3 and checkpoint_keys(storage, job.run_id)          # Ray Train's checkpoints on S3
    loaded = Registry(storage).load(str(result.ref))
    assert loaded.model.cfg.image_shape == (1, 28, 28) and loaded.model.cfg.hidden_dim == 128
    metrics = Registry(storage).metrics(result.ref)
    assert metrics["workers"] == 2 and len(metrics["history"]) == 6
    assert metrics["train_images"] == 1800 and metrics["val_images"] == 200 and metrics["test_images"] == 500
    assert [m["epoch"] for m in metrics["history"]] == list(range(6))
    assert metrics["history"][-1]["val_loss"] < metrics["history"][0]["val_loss"]   # it learned
    for fname in ("samples.png", "recon.png", "curves.png"):
        assert Registry(storage).read_file(result.ref, fname).startswith(b"\x89PNG")


@pytest.mark.slow
def test_one_worker_matches_two_workers_at_the_same_global_batch(s3_fashion, two_worker_run):
    """Same data, same global batch (64 = 1×64 = 2×32): only the shuffling differs, so the held-out loss
    agrees within 4%. Measured at 6 epochs: vae_core.fit alone spreads 285.6-288.5 over 4 shuffle seeds."""
    job, two = two_worker_run
    one = train_model(replace(job, run_id=unique_name("run"), ray=RayTrainConfig(workers=1)), progress=False)
    a, b = one.summary["best_val_loss"], two.summary["best_val_loss"]
    assert abs(a - b) / b < 0.04, (a, b)


@pytest.mark.slow
def test_workers_averaging_weights_every_4_steps_learn_as_well_as_gradient_all_reduce(s3_fashion, two_worker_run):
    """--sync-every 4: each worker takes its own Adam steps and the weights are averaged every 4 steps (and at
    every epoch's end, so that the workers evaluate and checkpoint the same model)."""
    import torch
    job, every_step = two_worker_run
    local = train_model(replace(job, run_id=unique_name("run"), ray=replace(job.ray, sync_every=4)),
                         progress=False)
    a, b = local.summary["best_val_loss"], every_step.summary["best_val_loss"]
    assert abs(a - b) / b < 0.04, (a, b)
    assert local.history[-1].val_loss < local.history[0].val_loss
    storage = open_storage(s3_fashion)
    last = max(checkpoint_keys(storage, local.summary["run_id"]))
    optimizer = torch.load(io.BytesIO(storage.read_bytes(last)), weights_only=True)["optimizer"]
    assert optimizer["step"] == 6 * 29       # the averager's steps (900 images a worker, 32 a batch) for a resume


def test_ray_train_on_a_ray_started_here_runs_no_placement_group_cleaner(two_worker_run):
    """That detached actor removes a dead controller's placement group from a cluster that outlives it; a Ray this
    process started stops with it, and without the dashboard (this Ray has none) the actor warns every second."""
    from ray._private.state import actors  # the GCS's actor table, dead actors too: no dashboard needed

    from cluster.runtime.ray_private import ray_started_here
    assert ray_started_here()
    classes = {actor["ActorClassName"] for actor in actors().values()}
    assert any("TrainController" in name for name in classes), classes     # the run went through Ray Train here
    assert not any("PlacementGroupCleaner" in name for name in classes), classes


def test_a_ray_started_here_drops_ray_trains_cluster_helpers_and_a_joined_cluster_keeps_them(ray_local):
    """Each helper is an actor process to start before the first batch. On a Ray this process started there is no
    outliving cluster to clean, no autoscaler to ask, and (rows through the object store) no dataset to manage."""
    import ray.data
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

    from cluster.runtime.ray_private import trainer_class, without_autoscaler

    def default_callbacks(local: bool, datasets: dict | None = None) -> set[type]:
        trainer = trainer_class(local=local)(lambda config: None, scaling_config=ScalingConfig(num_workers=1),
                                                   datasets=datasets)
        return {type(c) for c in trainer._create_default_callbacks()}
    helpers = {PlacementGroupCleanerCallback, DatasetsCallback}
    assert helpers <= default_callbacks(local=False)
    assert not helpers & default_callbacks(local=True)
    assert default_callbacks(local=True, datasets={"train": ray.data.range(4)}) & helpers == {DatasetsCallback}

    policy = without_autoscaler(ScalingConfig(num_workers=2))
    policy.after_controller_start(None)                         # Ray Train's would start the coordinator here
    decision = policy.make_decision_for_non_running_worker_group()      # and then send it a resource request
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 2


def test_one_worker_runs_without_a_process_group_and_its_controller_imports_no_torch():
    """Ray Train's controller unpickles the run's backend config before it starts any worker. One worker has nobody
    to all-reduce with: its plain BackendConfig unpickles, in a fresh interpreter as in the controller, without
    importing torch. Several workers get torch.distributed (gloo on CPUs, NCCL on GPUs)."""
    import pickle

    from ray.train import BackendConfig
    from ray.train.torch import TorchConfig

    from cluster.train.on_ray import process_group

    one = process_group(1, use_gpu=True)
    assert type(one) is BackendConfig
    load = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"
    controller = subprocess.run([sys.executable, "-c", load], input=pickle.dumps(one), capture_output=True,
                                timeout=120)
    assert controller.returncode == 0, controller.stderr.decode()[-2000:]
    assert controller.stdout.decode().strip() == "False"
    assert process_group(2, use_gpu=False) == TorchConfig(backend="gloo")
    assert process_group(4, use_gpu=True) == TorchConfig(backend="nccl")


def test_the_training_dataset_unpickles_without_torch(ray_local, local_storage_config, small_fashion):
    """Ray Data's processes of a run that reads through it (each read task, the streaming split's coordinator, the
    dataset manager) unpickle the training dataset, and so import the module of its map function: without torch
    there, none of them spends seconds importing it."""
    import numpy as np
    import ray.cloudpickle

    from cluster.train.on_ray import training_images
    storage = ingest_small_fashion(local_storage_config, small_fashion)
    manifest, job = read_manifest(storage, DATASET), job_for(local_storage_config)
    job = replace(job, model=bind_model_to_dataset(job.model, manifest, job.conditional))
    dataset = training_images(storage, job, manifest, np.arange(100))
    load = "import sys, ray.cloudpickle; ray.cloudpickle.loads(sys.stdin.buffer.read()); print('torch' in sys.modules)"
    process = subprocess.run([sys.executable, "-c", load], input=ray.cloudpickle.dumps(dataset), capture_output=True,
                             cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert process.returncode == 0, process.stderr.decode()[-2000:]
    assert process.stdout.decode().split()[-1] == "False"


def test_rerunning_a_finished_run_returns_its_version(s3_fashion, two_worker_run):
    job, result = two_worker_run
    again = train_model(job, progress=False)
    assert again.ref == result.ref
    assert Registry(open_storage(s3_fashion)).versions("fm-mlp").count(result.ref.version) == 1


def test_same_run_id_with_other_settings_is_refused(s3_fashion, two_worker_run):
    job, _ = two_worker_run
    changed = replace(job, train=replace(job.train, lr=0.01))
    with pytest.raises(VaegenError, match="started with other settings .*train.* use a new --run-id"):
        train_model(changed, progress=False)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, local_storage_config, small_fashion):
    storage = ingest_small_fashion(local_storage_config, small_fashion)
    # max_failures leaves room for the restarts a loaded machine adds; the assertions do not count them. Patience
    # above the epochs: the run's length is the epochs asked for, not where early stopping would end it.
    job = job_for(local_storage_config, epochs=KILLED_WORKER_EPOCHS, patience=KILLED_WORKER_EPOCHS, max_failures=5)
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        wait_for_checkpoint(storage, job.run_id)
        pid = train_worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    result = train_model(job, progress=False)
    killer.join()
    assert killed and not pid_alive(killed[0])
    # The guarantee, not a count: a busy machine may cost Ray Train another restart (e.g. [0, 1, 4]), each
    # from the latest checkpoint. The run started at 0, every later start resumed from a checkpoint (never from
    # scratch, never going back), it finished, and its history holds every epoch exactly once.
    restarts = result.summary["resumed_at_epochs"]
    assert restarts[0] == 0 and len(restarts) >= 2, restarts
    assert all(later >= 1 for later in restarts[1:]) and restarts == sorted(restarts), restarts
    assert [m.epoch for m in result.history] == list(range(KILLED_WORKER_EPOCHS))


@pytest.mark.slow
def test_an_interrupted_driver_resumes_with_the_same_run_id(ray_local, local_storage_config, small_fashion):
    """With workers averaging their weights (--sync-every 4), whose optimizer state a resume restores too."""
    import ray
    storage = ingest_small_fashion(local_storage_config, small_fashion)
    run_id = unique_name("run")
    argv = [sys.executable, "-m", "jobs.cli", "train", "--workers", "2", "--run-id", run_id,
            "--root", local_storage_config.root, "--dataset", DATASET, "--name", "fm-mlp",
            "--epochs", str(INTERRUPTED_EPOCHS), "--batch-size", "64", "--hidden-dim", "128", "--latent-dim", "8",
            "--patience", "10",
            "--address", ray.get_runtime_context().gcs_address, "--stream-epochs", "--sync-every", "4", "--no-progress"]
    driver = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_checkpoint(storage, run_id)
        driver.send_signal(signal.SIGINT)                # Ctrl-C
        assert driver.wait(timeout=300) != 0             # a hang guard, not a speed requirement
    finally:
        driver.kill()
    assert Registry(storage).versions("fm-mlp") == []         # interrupted: nothing published

    job = job_for(local_storage_config, epochs=INTERRUPTED_EPOCHS, run_id=run_id, stream_epochs=True, sync_every=4)
    result = train_model(job, progress=False)
    restarts = result.summary["resumed_at_epochs"]
    assert restarts[0] == 0 and restarts[-1] >= 1, restarts
    assert [m.epoch for m in result.history] == list(range(INTERRUPTED_EPOCHS))
    assert Registry(storage).versions("fm-mlp") == [result.ref.version]
    import torch
    last = max(checkpoint_keys(storage, run_id))
    optimizer = torch.load(io.BytesIO(storage.read_bytes(last)), weights_only=True)["optimizer"]
    # 29 steps an epoch (900 images a worker, 32 a batch): the averager's count went on from the checkpoint's
    assert optimizer["step"] == INTERRUPTED_EPOCHS * 29


# -- bad input: one clear line, nothing published ------------------------------------------------------
def assert_nothing_published(cfg: StorageConfig) -> None:
    assert Registry(Storage(cfg)).names() == []


def test_progress_shows_one_line_per_epoch(ray_local, local_storage_config, small_fashion):
    import ray
    ingest_small_fashion(local_storage_config, small_fashion)
    argv = [sys.executable, "-m", "jobs.cli", "train", "--workers", "2", "--root", local_storage_config.root,
            "--dataset", DATASET, "--name", "fm-progress", "--epochs", "2", "--hidden-dim", "32", "--latent-dim", "4",
            "--address", ray.get_runtime_context().gcs_address]
    out = subprocess.run(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    console = out.stdout + out.stderr
    assert [console.count(f"epoch {e}/2: loss ") for e in (1, 2)] == [1, 1], console[-3000:]
    assert "Reporting training result" not in console                     # Ray Train's per-report INFO line


def test_unknown_dataset(local_storage_config, small_fashion):
    ingest_small_fashion(local_storage_config, small_fashion)
    job = replace(job_for(local_storage_config), dataset="no-such-data")
    with pytest.raises(VaegenError, match="no dataset 'no-such-data' .*datasets there: fm"):
        train_model(job, progress=False)
    assert_nothing_published(local_storage_config)


def test_dataset_of_another_image_shape(local_storage_config, small_fashion):
    ingest_small_fashion(local_storage_config, small_fashion)
    job = replace(job_for(local_storage_config), model=ModelConfig(image_shape=(3, 32, 32)))
    with pytest.raises(VaegenError, match=r"holds images of shape \(1, 28, 28\) .* says \(3, 32, 32\)"):
        train_model(job, progress=False)
    assert_nothing_published(local_storage_config)


def test_a_corrupt_shard_fails_the_run_before_any_worker_starts(local_storage_config, small_fashion):
    storage = ingest_small_fashion(local_storage_config, small_fashion)
    storage.publish(shard_keys(storage, DATASET, "train")[1], b"garbage")
    job = job_for(local_storage_config)
    with pytest.raises(VaegenError, match="fails its sha256"):
        train_model(job, progress=False)
    assert checkpoint_keys(storage, job.run_id) == []
    assert_nothing_published(local_storage_config)


def test_unreachable_s3_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    cfg = StorageConfig(root="s3://vaegen-test/x", s3_endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(VaegenError, match="cannot reach the S3 endpoint"):
        train_model(job_for(cfg), progress=False)


@pytest.fixture
def s3_server_with_auth(starts_moto):
    """A moto server in its own process that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


def test_wrong_credentials(s3_server_with_auth, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    cfg = StorageConfig(root="s3://vaegen-test/x", s3_endpoint=s3_server_with_auth)
    with pytest.raises(VaegenError, match="S3 credentials were refused") as error:
        train_model(job_for(cfg), progress=False)
    assert "wrong-secret" not in str(error.value)


def test_each_worker_gets_an_equal_disjoint_share_in_id_order():
    """The training rows the driver sends through the object store: rank r holds every N-th row from r, in id
    order, every rank the same count (DDP steps in lockstep); the fewer than N rows left over sit out."""
    import torch

    from cluster.train.on_ray import worker_shares
    from vae_core.train import ImageSet
    rows = ImageSet(torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1), torch.arange(11) * 10)
    shares = worker_shares(rows, 3)
    assert [s.images.flatten().tolist() for s in shares] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert [s.labels.tolist() for s in shares] == [[0, 30, 60], [10, 40, 70], [20, 50, 80]]
    assert worker_shares(rows, 1)[0].images.flatten().tolist() == list(range(11))   # one worker: every row


def test_workers_zero_is_a_cli_error(local_storage_config, capsys):
    assert vaegen(["train", "--workers", "0", "--root", local_storage_config.root]) == 2
    assert "vaegen: error: --workers=0 must be >= 1" in capsys.readouterr().err


def test_sync_every_needs_workers_and_a_positive_period(local_storage_config, capsys):
    assert vaegen(["train", "--workers", "2", "--sync-every", "0", "--root", local_storage_config.root]) == 2
    assert "vaegen: error: --sync-every=0 must be >= 1" in capsys.readouterr().err
    assert vaegen(["train", "--sync-every", "4", "--root", local_storage_config.root]) == 2
    assert "--sync-every applies only to Ray Train: add --workers N" in capsys.readouterr().err


def test_global_batch_must_split_evenly(local_storage_config, small_fashion):
    ingest_small_fashion(local_storage_config, small_fashion)
    job = job_for(local_storage_config, workers=3)
    with pytest.raises(VaegenError, match="--batch-size=64 must divide by --workers=3"):
        train_model(job, progress=False)


def test_more_gpus_than_the_cluster_has_fails_fast(ray_local, local_storage_config, small_fashion):
    ingest_small_fashion(local_storage_config, small_fashion)
    job = job_for(local_storage_config, workers=2, gpus_per_worker=1)
    with pytest.raises(VaegenError, match=r"asks for 2 GPUs but the Ray cluster has 0"):
        train_model(job, progress=False)
    # Refused before a trainer was built (no wait for resources, whatever the machine's load): the run folder
    # holds only vaegen's own _job.json, no Ray Train state.
    run_files = [e.key.rsplit("/", 1)[-1] for e in open_storage(local_storage_config).list(
        f"{RUNS_DIR}/{job.run_id}", recursive=True)]
    assert run_files == ["_job.json"]
    assert_nothing_published(local_storage_config)


class Crash(BaseException):
    """The driver process dying at this point (not an Exception: nothing in vaegen catches it)."""


def test_a_driver_that_died_between_publishing_and_recording_publishes_once(ray_local, local_storage_config,
                                                                              small_fashion, monkeypatch):
    import cluster.train.driver
    storage = ingest_small_fashion(local_storage_config, small_fashion)
    job = job_for(local_storage_config, workers=1, epochs=1)
    real_record = cluster.train.driver.record_published

    def dies(*args, **kwargs):
        raise Crash()
    monkeypatch.setattr(cluster.train.driver, "record_published", dies)
    with pytest.raises(Crash):
        train_model(job, progress=False)
    registry = Registry(storage)
    assert registry.versions("fm-mlp") == ["v0001"]
    assert not storage.exists(f"{RUNS_DIR}/{job.run_id}/_published.json")

    monkeypatch.setattr(cluster.train.driver, "record_published", real_record)
    result = train_model(job, progress=False)                          # the rerun
    assert result.ref.version == "v0001" and registry.versions("fm-mlp") == ["v0001"]
    assert [m.epoch for m in result.history] == [0] and result.summary["run_id"] == job.run_id
    assert storage.exists(f"{RUNS_DIR}/{job.run_id}/_published.json")
    assert train_model(job, progress=False).ref == result.ref          # and once it is recorded
    assert registry.versions("fm-mlp") == ["v0001"]
