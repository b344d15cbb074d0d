"""One training loop for every backend: a 1-worker Ray Train run and a single-process run give the same
weights; the single-process trainer checkpoints every epoch and survives a real SIGKILL; the backend comes from
the config, and old runs that cannot resume are refused in one line. Real Fashion-MNIST bytes, real storage,
real local Ray."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from conftest import unique_name

from cluster.data.datasets import ingest
from cluster.store.registry import Registry
from cluster.store.storage import Storage, open_storage
from cluster.train.driver import train_model
from cluster.train.in_process import checkpoint_name
from cluster.train.runs import JOB_FILE, RUNS_DIR
from jobs.args import train_job_config
from jobs.cli import build_parser
from vae_core.config import ModelConfig, RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig
from vae_core.data import ArrayDataset, ArraySplit
from vae_core.errors import VaegenError
from vae_core.models import build_model
from vae_core.train import EarlyStopping, TrainingState, checkpoint_state, make_optimizer, resume

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASET = "fm"


def ingest_fashion(cfg: StorageConfig, small_fashion, rows: int = 2000) -> Storage:
    (train_x, train_y), (test_x, test_y) = small_fashion
    dataset = ArrayDataset({"train": ArraySplit(train_x[:rows], train_y[:rows]), "test": ArraySplit(test_x, test_y)},
                           tuple(str(i) for i in range(10)), "fashion-mnist slice")
    storage = open_storage(cfg, for_writing=True)
    ingest(storage, DATASET, dataset, shard_rows=250, progress=False)        # several shards: several read tasks
    return storage


def weights_sha256(storage: Storage, ref) -> str:
    return Registry(storage).load(ref).weights_sha256


def test_one_ray_worker_trains_the_same_weights_as_one_process(ray_local, local_storage_config, small_fashion):
    """Same config, same data: the worker holds its rows in id order, shuffles them and draws its noise from the
    (seed, epoch, rank) generators as one process does, and one worker has no DDP wrapper and no process group.
    Binarised, so the noise generator matters; threads=1 on both sides, so no reduction is split differently."""
    storage = ingest_fashion(local_storage_config, small_fashion, rows=800)
    job = TrainJobConfig(storage=local_storage_config, dataset=DATASET, name="fm-mlp",
                         model=ModelConfig(hidden_dim=64, latent_dim=4),
                         train=TrainConfig(epochs=3, batch_size=50, patience=5, binarize=True, threads=1,
                                           lr_schedule="cosine", kl_warmup_epochs=2))
    one_process = train_model(replace(job, run_id=unique_name("single")), progress=False)
    one_worker = train_model(replace(job, run_id=unique_name("ray"), ray=RayTrainConfig(workers=1)), progress=False)
    assert [m.epoch for m in one_worker.history] == [0, 1, 2]
    assert [m.loss for m in one_worker.history] == [m.loss for m in one_process.history]
    assert [m.val_loss for m in one_worker.history] == [m.val_loss for m in one_process.history]
    assert weights_sha256(storage, one_worker.ref) == weights_sha256(storage, one_process.ref)
    # The Ray version says how it trained; the single-process one records no Ray settings at all.
    ray_config = Registry(storage).load(one_worker.ref).config["train_job"]
    single_config = Registry(storage).load(one_process.ref).config["train_job"]
    assert ray_config["ray"]["workers"] == 1 and single_config["ray"] is None
    assert one_worker.summary["workers"] == 1 and "workers" not in one_process.summary
    assert one_process.summary["backend"] == "single-process" and one_worker.summary["backend"] == "ray"


def train_argv(cfg: StorageConfig, run_id: str, name: str = "fm-mlp") -> list[str]:
    return ["train", "--root", cfg.root, "--dataset", DATASET, "--name", name, "--run-id", run_id,
            "--epochs", "12", "--patience", "12", "--threads", "1", "--no-progress"]


@pytest.mark.slow
def test_a_sigkilled_single_process_run_resumes_from_its_checkpoint_and_publishes_once(local_storage_config,
                                                                                      small_fashion):
    storage = ingest_fashion(local_storage_config, small_fashion)
    run_id = unique_name("run")
    run = f"{RUNS_DIR}/{run_id}"
    argv = train_argv(local_storage_config, run_id)
    driver = subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300                     # a hang guard, not a speed requirement
        while not storage.exists(f"{run}/{checkpoint_name(2)}"):
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint of epoch 2"
            time.sleep(0.02)
        assert driver.poll() is None, "the run ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL
    finally:
        driver.kill()
        driver.stderr.close()
    registry = Registry(storage)
    assert registry.versions("fm-mlp") == []                       # killed: nothing published
    assert storage.exists(f"{run}/{JOB_FILE}")

    job = train_job_config(build_parser().parse_args(argv))        # the same settings the killed run pinned
    result = train_model(job, progress=False)
    starts = result.summary["resumed_at_epochs"]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 2, starts    # resumed, never from scratch
    assert [m.epoch for m in result.history] == list(range(12))
    assert registry.versions("fm-mlp") == [result.ref.version]
    assert train_model(job, progress=False).ref == result.ref       # a finished run: its version, once
    assert registry.versions("fm-mlp") == [result.ref.version]
    # The RNG position is the epoch number: the resumed run is the run that was never killed.
    whole = train_model(train_job_config(build_parser().parse_args(
        train_argv(local_storage_config, unique_name("run"), name="fm-whole"))), progress=False)
    assert weights_sha256(storage, whole.ref) == weights_sha256(storage, result.ref)
    assert whole.summary["resumed_at_epochs"] == [0]
    checkpoints = sorted(e.key.rsplit("/", 1)[-1] for e in storage.list(run) if e.key.endswith(".pt"))
    assert checkpoints == [checkpoint_name(11), checkpoint_name(12)]            # older ones are deleted
    saved = torch.load(io.BytesIO(storage.read_bytes(f"{run}/{checkpoint_name(12)}")), weights_only=True)
    assert saved["rng"]["next_epoch"] == 12 and len(saved["history"]) == 12


def test_the_backend_comes_from_the_config_for_every_verb_that_trains():
    parser = build_parser()
    for verb in ("train", "retrain", "pipeline"):
        args = parser.parse_args([verb, "--workers", "2", "--gpus-per-worker", "1", "--cpus-per-worker", "3",
                                  "--sync-every", "4", "--address", "auto", "--run-id", "r-1"])
        job = train_job_config(args)
        assert job.ray == RayTrainConfig(workers=2, gpus_per_worker=1.0, cpus_per_worker=3.0, sync_every=4)
        assert job.run_id == "r-1" and args.address == "auto"
    assert train_job_config(parser.parse_args(["train"])).ray is None
    assert train_job_config(parser.parse_args(["retrain"])).ray is None
    assert train_job_config(parser.parse_args(["pipeline"])).ray == RayTrainConfig(workers="auto")


def test_a_run_started_by_an_earlier_vaegen_is_refused_in_one_line(local_storage_config, small_fashion):
    storage = ingest_fashion(local_storage_config, small_fashion, rows=300)
    job = TrainJobConfig(storage=local_storage_config, dataset=DATASET, name="fm-mlp", run_id="old-run",
                         train=TrainConfig(epochs=1))
    # What _job.json held before the run id moved out of the Ray settings (and the RNG scheme changed).
    old = {"model": {}, "train": {}, "storage": {}, "dataset": DATASET, "name": "fm-mlp", "conditional": False,
           "ray": {"workers": 2, "run_id": "old-run"}}
    storage.publish(f"{RUNS_DIR}/old-run/{JOB_FILE}", json.dumps(old).encode())
    with pytest.raises(VaegenError, match="started by an earlier vaegen .* use a new --run-id") as e:
        train_model(job, progress=False)
    assert "\n" not in str(e.value)
    assert Registry(storage).names() == []


def test_a_checkpoint_of_another_rng_scheme_is_refused():
    cfg = TrainConfig(epochs=2)
    model = build_model(ModelConfig(image_shape=(1, 28, 28), hidden_dim=8, latent_dim=2))
    optimizer = make_optimizer(model, cfg)
    saved = checkpoint_state(model, optimizer, TrainingState(EarlyStopping(cfg.patience)))
    assert resume(saved, model, optimizer, cfg).next_epoch == 0
    saved.pop("rng")                                              # as an earlier vaegen's Ray checkpoints are
    with pytest.raises(VaegenError, match="another scheme .* use a new --run-id"):
        resume(saved, model, optimizer, cfg)


def test_a_warm_start_is_pinned_to_its_run(local_storage_config, small_fashion):
    storage = ingest_fashion(local_storage_config, small_fashion, rows=300)
    job = TrainJobConfig(storage=local_storage_config, dataset=DATASET, name="fm-mlp", run_id="warm",
                         model=ModelConfig(hidden_dim=8, latent_dim=2), train=TrainConfig(epochs=1))
    first = train_model(job, progress=False)
    champion = Registry(storage).load(first.ref).model.state_dict()
    with pytest.raises(VaegenError, match="warm_start_sha256 differ"):
        train_model(job, progress=False, initial_state=champion)


# -- --workers auto ---------------------------------------------------------------------------------------------
def test_auto_workers_is_one_per_gpu_else_one_per_node_and_splits_the_global_batch():
    from cluster.runtime.placement import size_training
    here = {"CPU": 2.0, "GPU": 0.0, "local": True}
    assert size_training([here], batch_size=128) == (1, 2.0, 0.0)               # this machine: one worker, every CPU
    assert size_training([{**here, "GPU": 2.0, "CPU": 16.0}], batch_size=128) == (2, 8.0, 1.0)
    head, cpu_node = {"CPU": 0.0}, {"CPU": 8.0}                                   # a KubeRay head runs no workers
    assert size_training([head, cpu_node, cpu_node], batch_size=128) == (2, 7.0, 0.0)   # one CPU left to the node
    gpu_node = {"CPU": 16.0, "GPU": 4.0}
    assert size_training([head, cpu_node, gpu_node, gpu_node], batch_size=128) == (8, 3.0, 1.0)   # GPUs only
    assert size_training([{"CPU": 4.0, "GPU": 3.0}], batch_size=128) == (2, 1.0, 1.0)   # 3 does not split 128


def test_auto_workers_on_this_machine_are_sized_without_starting_ray():
    """A process not connected to Ray, with no address: the workers are sized from this machine, where the local
    Ray will start (a fresh interpreter: this one may hold the test session's Ray)."""
    code = ("import json, os, ray, torch; from cluster.runtime.placement import sized_training; "
            "from vae_core.config import RayTrainConfig, TrainConfig, TrainJobConfig; "
            "job = sized_training(TrainJobConfig(ray=RayTrainConfig(workers='auto'), train=TrainConfig(batch_size=128))); "
            "print(json.dumps([job.ray.workers, job.ray.cpus_per_worker, job.ray.gpus_per_worker, os.cpu_count(), "
            "torch.cuda.device_count(), ray.is_initialized()]))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    workers, cpus, gpus, cpu_count, gpu_count, started = json.loads(out.stdout.strip().splitlines()[-1])
    if gpu_count:
        assert (workers, gpus) == (max(w for w in range(1, gpu_count + 1) if 128 % w == 0), 1.0)
    else:
        assert (workers, cpus, gpus) == (1, float(cpu_count), 0.0)       # one worker, every CPU as torch threads
    assert not started
    explicit = TrainJobConfig(ray=RayTrainConfig(workers=2))
    from cluster.runtime.placement import sized_training
    assert sized_training(explicit) is explicit


def test_auto_workers_cannot_be_mixed_with_per_worker_resources():
    parser = build_parser()
    with pytest.raises(VaegenError, match="--workers auto sizes --cpus-per-worker too; give --workers N"):
        train_job_config(parser.parse_args(["train", "--workers", "auto", "--cpus-per-worker", "2"]))
    assert train_job_config(parser.parse_args(["train", "--workers", "auto"])).ray.workers == "auto"
    with pytest.raises(VaegenError, match="--workers='two' must be a number or auto"):
        train_job_config(parser.parse_args(["train", "--workers", "two"]))


@pytest.mark.parametrize("rows, lr", [(200, 1e30), (1, 1e-3)], ids=["lr-1e30", "one-image"])
def test_a_run_without_a_finite_validation_loss_is_one_line_and_publishes_nothing(local_storage_config, capsys,
                                                                                 rows, lr):
    from jobs.cli import main
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (rows, 1, 8, 8), generator=rng, dtype=torch.uint8).numpy()
    ingest(open_storage(local_storage_config, for_writing=True), "noise",
           ArrayDataset({"train": ArraySplit(images, torch.zeros(rows, dtype=torch.int64).numpy())}, ("a",), "x"),
           progress=False)
    assert main(["train", "--root", local_storage_config.root, "--dataset", "noise", "--hidden-dim", "8",
                 "--latent-dim", "2", "--epochs", "2", "--lr", str(lr), "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "no finite validation loss" in err[0] and "--lr=" in err[0], err
    assert open_storage(local_storage_config).list("models", recursive=True) == []
