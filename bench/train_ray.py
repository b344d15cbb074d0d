"""Ray Train (1 and 2 workers) vs vaegen's single-process trainer: same model, data, epochs, global batch.

Prints one JSON line per trainer: images/s inside the training loop (epoch 1, which streams from storage,
and the later epochs), images/s end to end (start of the call to the published version), and for Ray the
seconds from the start of the call (ray.init included) to the first training batch. The single process runs
with torch's default threads and with one thread (multi-threaded torch collapses on a loaded machine);
`ratio_vs_single` compares Ray's later-epoch images/s with the faster of the two, measured in the same run
(the default-threads one before and after the others, and averaged).

It compares at the classic global batch (128) and at larger ones (512 to 2048), each trainer at the same batch:
a DDP step pays one all-reduce of every gradient whatever the batch, so the batch sets how much compute that
cost is spread over. The first line measures that cost here (gloo, two local processes, one thread each), so the
ratios can be read against it. Per batch size, `independent-processes` is the ceiling for any data-parallel
trainer: N one-thread processes, each training alone on 1/N of the images at 1/N of the batch, with no
synchronisation at all (each still pays a whole optimizer step per step, as every DDP worker does).
With several workers Ray Train runs once per `--sync-every` value: 1 all-reduces the gradients every step
(exact data-parallel Adam), K > 1 averages the workers' weights every K steps (post-local SGD); compare
their `val_loss` with the single process's for what the saved communication costs.

    PYTHONPATH=. python bench/train_ray.py --images 60000 --epochs 4      # the full figures
    PYTHONPATH=. python bench/train_ray.py --images 4000 --epochs 2 --batch-sizes 128   # a quick check
    PYTHONPATH=. python bench/train_ray.py --startup            # where the time to the first batch goes

`--startup` trains one epoch per worker count instead and prints, per run, the seconds from the call to each
start-up stage (`startup_breakdown`, from Ray Train's own controller and worker-group callbacks and from
wrappers around the driver's and the worker's steps), each stage's own seconds (`stage_seconds`), and the
time to the first batch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.data.datasets import ingest  # noqa: E402
from cluster.runtime.ray_session import DASHBOARD_ENV  # noqa: E402
from cluster.store.storage import open_storage  # noqa: E402
from cluster.train.driver import train_model  # noqa: E402
from cluster.train.runs import TrainResult  # noqa: E402
from vae_core.config import ModelConfig, RayTrainConfig, StorageConfig, TrainConfig, TrainJobConfig  # noqa: E402
from vae_core.data import ArrayDataset, ArraySplit, read_fashion_mnist  # noqa: E402
from vae_core.models import build_model  # noqa: E402


def figures(result: TrainResult, seconds: float) -> dict:
    rates = [m.images_per_s for m in result.history]
    images = result.summary["train_images"] * len(result.history)
    return {"epochs": len(result.history), "train_images": result.summary["train_images"],
            "img_per_s_epoch1": round(rates[0]),
            "img_per_s_later_epochs": round(statistics.median(rates[1:])) if len(rates) > 1 else None,
            "img_per_s_end_to_end": round(images / seconds), "seconds": round(seconds, 1),
            "val_loss": round(result.summary["best_val_loss"], 2)}


def spawned(target, per_process_args: list[tuple]) -> list:
    """Run `target(*args, results)` in one spawned process per args tuple, all at once; what they put in
    `results`, once all have exited."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, results)) for args in per_process_args]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    out = []
    while not results.empty():
        out.append(results.get())
    return out


def allreduce_floor(parameters: int, rounds: int = 40) -> float:
    """Milliseconds one gloo all-reduce of `parameters` float32 gradients takes between two local processes
    (one torch thread each, as Ray Train's CPU workers): the communication every DDP step pays."""
    port = 29_000 + os.getpid() % 1000
    return spawned(_allreduce_worker, [(rank, parameters, rounds, port) for rank in (0, 1)])[0]   # rank 0's


def _allreduce_worker(rank: int, parameters: int, rounds: int, port: int, result) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grads = torch.ones(parameters)
    for _ in range(5):
        dist.all_reduce(grads)
    started = time.perf_counter()
    for _ in range(rounds):
        dist.all_reduce(grads)
    if rank == 0:
        result.put(round((time.perf_counter() - started) / rounds * 1e3, 2))
    dist.destroy_process_group()


def independent_ceiling(images, batch_size: int, epochs: int, processes: int) -> int:
    """Images/s summed over `processes` one-thread trainers running at once, each on its own 1/N of the
    images at batch batch_size/N, sharing nothing (vae_core.fit in spawned processes; later-epoch median)."""
    share = len(images) // processes
    return round(sum(spawned(_independent_worker, [(images[i * share:(i + 1) * share], batch_size // processes,
                                                    epochs) for i in range(processes)])))


def _independent_worker(images, batch_size: int, epochs: int, result) -> None:
    from vae_core.train import ImageSet, fit
    torch.set_num_threads(1)
    x = torch.from_numpy(images)
    torch.manual_seed(0)
    history = fit(build_model(ModelConfig(image_shape=tuple(x.shape[1:]))), ImageSet(x), ImageSet(x[:1000]),
                  TrainConfig(epochs=epochs, batch_size=batch_size, patience=epochs, threads=1)).history
    result.put(statistics.median(m.images_per_s for m in history[1:]) if len(history) > 1
               else history[0].images_per_s)


# -- --startup: where the seconds before the first batch go --------------------------------------------------
STARTUP_LOG = "VAEGEN_BENCH_STARTUP_LOG"      # the file every process of a run appends its stage times to


def note(stage: str, **extra) -> None:
    """Append `stage` and its wall-clock time to the run's startup log (driver, controller or worker)."""
    path = os.environ.get(STARTUP_LOG)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "t": time.time(), **extra}) + "\n")


def startup_callback() -> None:
    """Define StartupTimes, a Ray Train controller/worker-group callback, and name it in RAY_TRAIN_CALLBACKS so
    that Ray Train adds it to the run's own callbacks (the controller runs it)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class Times(ControllerCallback, WorkerGroupCallback):
        def after_controller_start(self, train_run_context):
            note("controller_started")

        def before_worker_group_start(self, worker_group_context):
            note("worker_group_starting")

        def after_worker_group_start(self, worker_group):
            note("worker_group_started")        # actors up; the backend (process group) and data set up next

        def after_worker_group_training_start(self, worker_group):
            note("training_started")

    Times.__name__ = Times.__qualname__ = "StartupTimes"
    globals()["StartupTimes"] = Times
    os.environ["RAY_TRAIN_CALLBACKS"] = "__main__.StartupTimes"


def timed_worker_loop(raw: dict) -> None:
    """cluster.train.on_ray's worker loop, noting when it starts and when the worker's rows are in memory."""
    import cluster.train.on_ray as worker_module
    note("worker_loop_started")
    for name in ("worker_rows", "rows_in_memory"):        # whichever this version of cluster.train.on_ray has
        real = getattr(worker_module, name, None)
        if real is not None:
            def timed(*args, _real=real, **kwargs):
                note("rows_loading")
                rows = _real(*args, **kwargs)
                note("rows_in_memory")
                return rows
            setattr(worker_module, name, timed)
            break
    worker_module.train_loop_per_worker(raw)


def time_driver_steps() -> None:
    """Wrap the driver's ray_runtime and run_trainer so that the startup log shows ray.init and the trainer."""
    import contextlib

    import cluster.train.on_ray as driver_module
    real_runtime, real_trainer = driver_module.ray_runtime, driver_module.run_trainer

    @contextlib.contextmanager
    def runtime(*args, **kwargs):
        note("ray_init_starting")
        with real_runtime(*args, **kwargs):
            note("ray_ready")
            yield

    def trainer(*args, **kwargs):
        note("trainer_starting")
        return real_trainer(*args, **kwargs)
    driver_module.ray_runtime, driver_module.run_trainer = runtime, trainer
    driver_module.train_loop_per_worker = timed_worker_loop


class TreeCPU:
    """CPU seconds (user + system) used by this process and every process under it (Ray's), sampled from /proc
    in a thread: on a shared machine the wall-clock stages stretch with other people's load, the CPU a start-up
    asks for much less."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.samples, self._seen = interval, [], {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._total()))
            self._stop.wait(self.interval)

    def _total(self) -> float:
        tick, parent_and_cpu = os.sysconf("SC_CLK_TCK"), {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent_and_cpu[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        tree, grew = {os.getpid()}, True
        while grew:
            below = {pid for pid, (parent, _) in parent_and_cpu.items() if parent in tree} - tree
            tree |= below
            grew = bool(below)
        for pid in tree & parent_and_cpu.keys():            # an exited process keeps its last figure
            self._seen[pid] = max(self._seen.get(pid, 0.0), parent_and_cpu[pid][1])
        return sum(self._seen.values())

    def used_until(self, moment: float) -> float:
        """CPU seconds from the first sample to the last one taken at or before `moment`."""
        before = [cpu for t, cpu in self.samples if t <= moment]
        return round(before[-1] - self.samples[0][1], 1) if before else float("nan")


STAGES = [("driver_prepare", "ray_init_starting"),       # manifest, claim, read + checksum, initial weights
          ("ray_init", "ray_ready"),
          ("trainer_and_controller", "controller_started"),   # the trainer, datasets, the controller actor
          ("controller_to_worker_group", "worker_group_starting"),
          ("worker_group_start", "worker_group_started"),     # placement group + worker actors
          ("backend_and_data_setup", "training_started"),     # process group, dataset shards, train context
          ("worker_loop_start", "worker_loop_started"),
          ("model_setup", "rows_loading"),                    # weights, DDP, checkpoint
          ("dataset_materialisation", "rows_in_memory"),
          ("first_batch", "first_batch")]


def startup_run(job: TrainJobConfig, workers: int, log: str) -> dict:
    """One Ray Train run of one epoch; the seconds from the call to each stage, and each stage's own seconds."""
    open(log, "w").close()
    ray_job = replace(job, run_id="", ray=RayTrainConfig(workers=workers, max_failures=0))
    with TreeCPU() as cpu:
        started = time.time()
        result = train_model(ray_job, progress=False)
        ended = time.time()
    seen: dict[str, float] = {}
    with open(log) as f:
        for line in f:
            event = json.loads(line)
            seen[event["stage"]] = max(seen.get(event["stage"], 0.0), event["t"])   # the slowest worker
    seen["first_batch"] = started + result.summary["seconds_to_first_batch"]
    at = {name: round(seen[stage] - started, 2) for name, stage in STAGES if stage in seen}
    own, previous = {}, 0.0
    for name, _ in STAGES:
        if name in at:
            own[name] = round(at[name] - previous, 2)
            previous = at[name]
    return {"bench": "train_ray", "trainer": "ray-train-startup", "workers": workers, "cpus": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 1), "train_images": result.summary["train_images"],
            "seconds_to_first_batch": round(result.summary["seconds_to_first_batch"], 2),
            "cpu_seconds_to_first_batch": cpu.used_until(seen["first_batch"]),
            "seconds_end_to_end": round(ended - started, 1), "stage_seconds": own, "startup_breakdown": at}


def startup(args: argparse.Namespace) -> None:
    fashion = read_fashion_mnist()
    train = fashion.splits["train"]
    with tempfile.TemporaryDirectory(prefix="vaegen-bench-") as root:
        log = os.path.join(root, "startup.jsonl")
        os.environ[STARTUP_LOG] = log                 # worker processes inherit the driver's environment
        startup_callback()
        time_driver_steps()
        storage_cfg = StorageConfig(root=os.path.join(root, "store"))
        dataset = ArrayDataset({"train": ArraySplit(train.images[:args.images], train.labels[:args.images])},
                               fashion.label_names, fashion.source)
        ingest(open_storage(storage_cfg, for_writing=True), "fashion-mnist", dataset, progress=False)
        job = TrainJobConfig(storage=storage_cfg, dataset="fashion-mnist", name="bench-startup",
                             train=TrainConfig(epochs=1, batch_size=args.batch_sizes[0], patience=1))
        dashboards = {"off": ["0"], "on": ["1"], "both": ["1", "0"]}[args.dashboard]
        for workers in args.workers:
            for _ in range(args.repeat):
                for dashboard in dashboards:            # alternated, so that both see the same machine
                    os.environ[DASHBOARD_ENV] = dashboard
                    print(json.dumps({**startup_run(job, workers, log), "dashboard": dashboard == "1"}),
                          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=60_000, help="training images (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 1024, 2048],
                   help="global batches to compare at; each trainer uses the same one (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sync-every", type=int, nargs="+", default=[1, 8],
                   help="with several workers, each of these: 1 = gradient all-reduce every step, K = weights "
                        "averaged every K steps (post-local SGD) (default: %(default)s)")
    p.add_argument("--startup", action="store_true",
                   help="instead: one epoch per worker count, printing where the time to the first batch goes")
    p.add_argument("--repeat", type=int, default=1, help="with --startup, runs per worker count (default: 1)")
    p.add_argument("--dashboard", choices=["off", "on", "both"], default="off",
                   help="with --startup, start the embedded Ray with its dashboard, without, or each in turn "
                        "(default: %(default)s, as vaegen does unless VAEGEN_RAY_DASHBOARD=1)")
    args = p.parse_args()
    if args.startup:
        startup(args)
        return

    fashion = read_fashion_mnist()
    train = fashion.splits["train"]
    parameters = sum(t.numel() for t in build_model(ModelConfig(image_shape=(1, 28, 28))).parameters())
    print(json.dumps({"bench": "train_ray", "trainer": "gloo-allreduce-floor", "parameters": parameters,
                      "allreduce_ms": allreduce_floor(parameters), "cpus": os.cpu_count()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="vaegen-bench-") as root:
        storage_cfg = StorageConfig(root=root)
        dataset = ArrayDataset({"train": ArraySplit(train.images[:args.images], train.labels[:args.images])},
                               fashion.label_names, fashion.source)
        ingest(open_storage(storage_cfg, for_writing=True), "fashion-mnist", dataset, progress=False)
        for batch_size in args.batch_sizes:
            compare_at(storage_cfg, batch_size, args, train.images[:args.images])


def compare_at(storage_cfg: StorageConfig, batch_size: int, args: argparse.Namespace, images) -> None:
    """The single process (default threads and one thread), the no-synchronisation ceiling, Ray Train with each
    worker count, then the default-threads single process again: the baseline is the mean of its two runs, so
    that a machine whose speed drifts during the comparison moves the baseline as it moves the others."""
    job = TrainJobConfig(storage=storage_cfg, dataset="fashion-mnist", name=f"bench-b{batch_size}",
                         train=TrainConfig(epochs=args.epochs, batch_size=batch_size, patience=args.epochs))
    common = {"bench": "train_ray", "model": "mlp 784-400-20", "batch_global": batch_size, "cpus": os.cpu_count()}
    single_rates = {threads: [single_process(job, threads, common)] for threads in (0, 1)}
    compared = []                                          # (line, images/s), printed once the baseline is known
    for workers in [w for w in args.workers if w > 1]:
        ceiling = independent_ceiling(images, batch_size, args.epochs, workers)
        compared.append(({**common, "trainer": "independent-processes", "workers": workers, "torch_threads": 1,
                          "img_per_s_later_epochs": ceiling}, ceiling))
    runs = [(w, k) for w in args.workers for k in (args.sync_every if w > 1 else [1])]
    for workers, sync_every in runs:
        ray_job = replace(job, ray=RayTrainConfig(workers=workers, max_failures=0, sync_every=sync_every))
        started = time.perf_counter()
        result = train_model(ray_job, progress=False)
        ray_figures = figures(result, time.perf_counter() - started)
        compared.append(({**common, "trainer": "ray-train", "workers": workers, "sync_every": sync_every,
                          "torch_threads": 1, **ray_figures,
                          "seconds_to_first_batch": round(result.summary["seconds_to_first_batch"], 1)},
                         ray_figures["img_per_s_later_epochs"] or ray_figures["img_per_s_epoch1"]))
    time.sleep(10)       # Ray's processes take seconds to exit after shutdown; an epoch meanwhile runs at half speed
    single_rates[0].append(single_process(job, 0, common))
    base = max(statistics.mean(rates) for rates in single_rates.values())
    print(json.dumps({**common, "trainer": "baseline", "img_per_s": round(base),
                      "default_threads_runs": single_rates[0], "one_thread_runs": single_rates[1]}), flush=True)
    for line, rate in compared:
        print(json.dumps({**line, "ratio_vs_single": round(rate / base, 2)}), flush=True)


def single_process(job: TrainJobConfig, threads: int, common: dict) -> int:
    """vaegen's single-process trainer (threads=0: torch's default); prints its line, returns its images/s."""
    torch.set_num_threads(threads or os.cpu_count())
    started = time.perf_counter()
    single = figures(train_model(replace(job, ray=None, train=replace(job.train, threads=threads)), progress=False),
                     time.perf_counter() - started)
    print(json.dumps({**common, "trainer": "single-process", "workers": 1, "torch_threads": torch.get_num_threads(),
                      **single}), flush=True)
    return single["img_per_s_later_epochs"] or single["img_per_s_epoch1"]


if __name__ == "__main__":
    main()
