"""The DecoderWorker actors on Ray: their placement and start-up, and the scheduler that feeds them shards.

- Placement: each actor asks for settings.cpus_per_worker / gpus_per_worker. On a local Ray a request the
  cluster cannot hold is refused at once; a joined cluster may be autoscaling (GPU nodes take minutes to
  arrive), so there the check is skipped and the wait is longer.
- Start-up: an actor loads the model once and checks its weights' and config.json's sha256 against the plan
  (a model edited under a running job is refused in one line, not built from).
- Backpressure and overlap: at most IN_FLIGHT_PER_WORKER shards per actor are submitted at a time, and an actor
  runs that many at once (threads): one decodes while the other encodes and publishes (shards.py), so the device
  never waits on a shard's compression or upload, and memory holds at most two shards per actor. The driver
  holds only those futures and small records, whatever the job's size.
- Device: an actor given a GPU decodes on CUDA; one that sees no CUDA (a fake or misdeclared GPU resource)
  decodes on the CPU rather than failing.
- Faults: an actor that dies is restarted by Ray (max_restarts) and its shard retried; a call lost to an
  unreachable actor (its node removed) is resubmitted, since shards are idempotent; past those limits, or when a
  shard fails (a full disk), the run stops once the other shards in flight have ended (none is killed mid-write),
  keeping every finished shard for the next run to resume."""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import NoReturn

import torch

from cluster.generate.drill import stage_delay_setting, stage_pause
from cluster.generate.plan import JobPlan, load_model
from cluster.generate.settings import RunSettings
from cluster.generate.shards import ShardMaker
from cluster.runtime.placement import worker_gpu_bytes
from cluster.store.registry import ModelRef, Registry
from cluster.store.storage import Storage
from vae_core.config import StorageConfig, from_dict, to_dict
from vae_core.errors import VaegenError
from vae_core.names import WEIGHTS_FILE

IN_FLIGHT_PER_WORKER = 2         # one shard decoding, one encoding/publishing: the device never idles on a write
PLACEMENT_TIMEOUT_S = float(os.environ.get("VAEGEN_PLACEMENT_TIMEOUT_S", "120"))
JOINED_PLACEMENT_TIMEOUT_S = float(os.environ.get("VAEGEN_JOINED_PLACEMENT_TIMEOUT_S", "900"))
UNAVAILABLE_RETRIES = 5          # a shard's calls lost to an unreachable actor (its node removed) before giving up
SETTLE_S = 60.0                  # how long a failing run lets its other in-flight shards end before the kill


def decoder_worker_class():
    """The DecoderWorker actor class, made on first use so that importing this module does not import Ray."""
    import ray

    @ray.remote(concurrency_groups={"control": 1}, max_concurrency=IN_FLIGHT_PER_WORKER)
    class DecoderWorker:
        """Loads the model once, then builds and publishes whole shards, IN_FLIGHT_PER_WORKER at a time (their
        decoding one at a time, see ShardMaker); status() answers from its own thread meanwhile."""

        def __init__(self, plan: dict, storage_cfg: dict, device: str, drill: str | None) -> None:
            torch.set_num_threads(1)          # fixed: a shard's floats must not depend on the thread count
            device = worker_device(device)
            plan, storage = JobPlan.from_dict(plan), Storage(from_dict(StorageConfig, storage_cfg))
            # A refusal is kept and raised by every call (a constructor's exception would be retried by Ray's
            # restarts and reach the driver as an actor death, not as this one line).
            self.maker, self.refusal = None, None
            try:
                loaded, config_sha256 = load_model(storage, ModelRef(*plan.model_ref.split("@")))
                changed = [what for what, ours, planned in (("weights", loaded.weights_sha256, plan.weights_sha256),
                                                            ("config.json", config_sha256, plan.config_sha256))
                           if ours != planned]
                if changed:
                    raise VaegenError(f"{plan.model_ref} changed under job {plan.job_id}: its "
                                      f"{' and '.join(changed)} sha256 differ from the plan's; rerun to start a "
                                      "new job for the model as it is now")
                self.maker = ShardMaker(plan, storage, loaded.model, device=device, pause=stage_pause(drill))
            except VaegenError as e:
                self.refusal = str(e)

        def ready(self) -> int:
            if self.refusal:
                raise VaegenError(self.refusal)
            return os.getpid()

        @ray.method(concurrency_group="control")
        def status(self) -> dict:
            maker = self.maker
            return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                    "stage": maker.stage if maker else "refused", "shard": maker.shard if maker else -1,
                    "stages": dict(maker.stages) if maker else {},        # every shard in flight
                    "device": maker.device if maker else None, "gpus": [str(g) for g in ray.get_gpu_ids()]}

        def run_shard(self, index: int) -> dict:
            if self.refusal:
                raise VaegenError(self.refusal)
            return self.maker.make(index)

    return DecoderWorker


def placed_settings(settings: RunSettings, plan: JobPlan, storage: Storage) -> RunSettings:
    """settings with --workers auto and unset per-worker resources sized for the Ray cluster now connected
    (settings.size_placement): its alive nodes' resources, and this job's model's GPU footprint."""
    if settings.sized:
        return settings
    import ray
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    ref = ModelRef(*plan.model_ref.split("@"))
    weights = sum(e.size for e in storage.list(Registry(storage).key(ref.name, ref.version))
                  if e.key.endswith(WEIGHTS_FILE))
    driver_gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return settings.placed(nodes, worker_gpu_bytes=worker_gpu_bytes(weights, plan.image_shape, plan.spec.decode_batch),
                           gpu_memory_bytes=driver_gpu)


def worker_device(requested: str) -> str:
    """The device a worker decodes on: CUDA when asked for and present, else the CPU."""
    return requested if requested != "cuda" or torch.cuda.is_available() else "cpu"


def start_workers(plan: JobPlan, storage_cfg: StorageConfig, settings: RunSettings, *, joined: bool = False) -> list:
    """Start settings.workers actors and wait until each has loaded the model; a clear error instead of a hang
    when the cluster cannot place them (at once on a local Ray, after the placement timeout on a joined
    cluster). Each actor gets the plan and the storage settings as plain dicts."""
    import ray
    if not settings.sized:                                     # auto values: sized here for a direct caller
        settings = placed_settings(settings, plan, Storage(storage_cfg))
    workers, cpus_per_worker, gpus_per_worker = settings.workers, settings.cpus_per_worker, settings.gpus_per_worker
    resources = ray.cluster_resources()
    need = {"CPU": workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
    short = [f"{need[r]:g} {r} (cluster has {resources.get(r, 0):g})" for r in need
             if need[r] > resources.get(r, 0) + 1e-9]
    timeout = JOINED_PLACEMENT_TIMEOUT_S if joined else PLACEMENT_TIMEOUT_S
    if short and not joined:
        raise VaegenError(f"Ray cannot place {workers} DecoderWorker(s): they need {', '.join(short)}; "
                          "lower --workers, --cpus-per-worker or --gpus-per-worker")
    worker_cls = decoder_worker_class()
    arguments = (plan.to_dict(), to_dict(storage_cfg), settings.device, stage_delay_setting())
    actors = [worker_cls.options(name=f"vaegen-decoder-{plan.job_id}-{k}-{os.getpid()}",
                                 num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                 max_restarts=settings.max_restarts, max_task_retries=settings.max_restarts)
              .remote(*arguments)
              for k in range(workers)]
    try:
        ray.get([a.ready.remote() for a in actors], timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        stop_workers(actors)
        raise_worker_error(e)
    except ray.exceptions.GetTimeoutError:
        stop_workers(actors)
        raise VaegenError(f"Ray could not start {workers} DecoderWorker(s) within {timeout:.0f} s "
                          f"(each needs {cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU; cluster resources "
                          f"{ {k: v for k, v in resources.items() if k in ('CPU', 'GPU')} })") from None
    return actors


def raise_worker_error(error: Exception) -> NoReturn:
    """Raise what a DecoderWorker's call raised as the driver's own exception. Ray's wrapper reads as the
    worker's whole traceback in terminal colours; the error inside it (its `cause`) is what the user must see:
    a VaegenError (a full disk, a changed model) or an OSError stays one line. Anything else is a bug in vaegen
    and keeps Ray's wrapper, traceback and all."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, VaegenError):
        raise VaegenError(str(cause)) from None
    if isinstance(cause, OSError):
        raise cause from None
    raise error


def stop_workers(actors: list) -> None:
    import ray
    for actor in actors:
        ray.kill(actor)


def run_shards(actors: list, todo: list[int], on_done: Callable[[dict], None]) -> None:
    """Feed shard indices to the actors, at most IN_FLIGHT_PER_WORKER each (backpressure): the driver holds
    only the in-flight futures and small records, whatever the job's size. When a shard fails, the others in
    flight end first (settle), then the failure is raised."""
    import ray
    pending = deque(todo)
    futures: dict = {}
    unavailable: dict[int, int] = {}                                   # shard -> calls lost to an unreachable actor

    def submit(actor) -> None:
        if pending:
            index = pending.popleft()
            futures[actor.run_shard.remote(index)] = (actor, index)

    def next_record() -> dict | None:
        """The record of the next shard to end (then its actor gets another), or None when it is to be rerun."""
        ready, _ = ray.wait(list(futures), num_returns=1)
        actor, index = futures.pop(ready[0])
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayTaskError as e:
            raise_worker_error(e)
        except ray.exceptions.ActorUnavailableError as e:
            # The actor's node went away mid-call (or its link did): Ray does not retry such a call, since it
            # may have run. A shard is idempotent, so run it again; the actor restarts elsewhere meanwhile.
            unavailable[index] = unavailable.get(index, 0) + 1
            if unavailable[index] > UNAVAILABLE_RETRIES:
                raise RuntimeError(f"shard {index}: its DecoderWorker stayed unreachable over "
                                   f"{UNAVAILABLE_RETRIES} retries ({str(e).splitlines()[0]}); finished shards "
                                   "are kept: rerun to resume") from None
            time.sleep(0.5 * unavailable[index])                     # rare: give the restart a moment
            pending.appendleft(index)
            submit(actor)
            return None
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"a DecoderWorker died on shard {index} more often than its restarts allow "
                               f"({str(e).splitlines()[0]}); finished shards are kept: rerun to resume") from None
        submit(actor)
        return record

    for _ in range(IN_FLIGHT_PER_WORKER):
        for actor in actors:
            submit(actor)
    try:
        while futures:
            if (record := next_record()) is not None:
                on_done(record)
    except Exception:
        settle(futures)
        raise


def settle(futures: dict) -> None:
    """Let the shards still in flight when a run fails end (each publishes whole, or fails and removes its temp
    file) before stop_workers kills their actors: a kill mid-write would leave a temp file on a local disk.
    Bounded, since a shard on a hung actor may never end; Ctrl-C (not an Exception) does not wait."""
    import ray
    if futures:
        ray.wait(list(futures), num_returns=len(futures), timeout=SETTLE_S)
