"""The DecoderWorker actors on Ray: their placement and start-up, and the scheduler that feeds them shards.

- Placement: each actor asks for settings.cpus_per_worker / gpus_per_worker. On a local Ray a request the
  cluster cannot hold is refused at once; a joined cluster may be autoscaling (GPU nodes take minutes to
  arrive), so there the check is skipped and the wait is longer.
- Start-up: an actor loads the model once and checks its weights' and config.json's sha256 against the plan
  (a model edited under a running job is refused in one line, not built from).
- Backpressure: at most IN_FLIGHT_PER_WORKER shards per actor are submitted at a time, so the driver holds only
  those futures and small records, whatever the job's size.
- Faults: an actor that dies is restarted by Ray (max_restarts) and its shard retried; a call lost to an
  unreachable actor (its node removed) is resubmitted, since shards are idempotent; past those limits the run
  stops, keeping every finished shard for the next run to resume."""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

import torch

from vae_core.config import StorageConfig, from_dict, to_dict
from vae_core.errors import VaegenError

from ..registry import ModelRef
from ..storage import Storage
from .drill import stage_delay_setting, stage_pause
from .plan import JobPlan, load_model
from .settings import RunSettings
from .shards import ShardMaker

IN_FLIGHT_PER_WORKER = 2         # one shard running, one queued: workers never idle, the driver holds little
PLACEMENT_TIMEOUT_S = float(os.environ.get("VAEGEN_PLACEMENT_TIMEOUT_S", "120"))
JOINED_PLACEMENT_TIMEOUT_S = float(os.environ.get("VAEGEN_JOINED_PLACEMENT_TIMEOUT_S", "900"))
UNAVAILABLE_RETRIES = 5          # a shard's calls lost to an unreachable actor (its node removed) before giving up


def decoder_worker_class():
    """The DecoderWorker actor class, made on first use so that importing this module does not import Ray."""
    import ray

    @ray.remote(concurrency_groups={"control": 1})
    class DecoderWorker:
        """Loads the model once, then builds and publishes whole shards, one at a time (the default
        concurrency group runs one task at a time); status() answers from its own thread meanwhile."""

        def __init__(self, plan: dict, storage_cfg: dict, device: str, drill: str | None) -> None:
            torch.set_num_threads(1)          # fixed: a shard's floats must not depend on the thread count
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
                    "stage": maker.stage if maker else "refused", "shard": maker.shard if maker else -1}

        def run_shard(self, index: int) -> dict:
            if self.refusal:
                raise VaegenError(self.refusal)
            return self.maker.make(index)

    return DecoderWorker


def start_workers(plan: JobPlan, storage_cfg: StorageConfig, settings: RunSettings, *, joined: bool = False) -> list:
    """Start settings.workers actors and wait until each has loaded the model; a clear error instead of a hang
    when the cluster cannot place them (at once on a local Ray, after the placement timeout on a joined
    cluster). Each actor gets the plan and the storage settings as plain dicts."""
    import ray
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
        if isinstance(e.cause, VaegenError):
            raise VaegenError(str(e.cause)) from None
        raise
    except ray.exceptions.GetTimeoutError:
        stop_workers(actors)
        raise VaegenError(f"Ray could not start {workers} DecoderWorker(s) within {timeout:.0f} s "
                          f"(each needs {cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU; cluster resources "
                          f"{ {k: v for k, v in resources.items() if k in ('CPU', 'GPU')} })") from None
    return actors


def stop_workers(actors: list) -> None:
    import ray
    for actor in actors:
        ray.kill(actor)


def run_shards(actors: list, todo: list[int], on_done: Callable[[dict], None]) -> None:
    """Feed shard indices to the actors, at most IN_FLIGHT_PER_WORKER each (backpressure): the driver holds
    only the in-flight futures and small records, whatever the job's size."""
    import ray
    pending = deque(todo)
    futures: dict = {}
    unavailable: dict[int, int] = {}                                   # shard -> calls lost to an unreachable actor

    def submit(actor) -> None:
        if pending:
            index = pending.popleft()
            futures[actor.run_shard.remote(index)] = (actor, index)

    for _ in range(IN_FLIGHT_PER_WORKER):
        for actor in actors:
            submit(actor)
    while futures:
        ready, _ = ray.wait(list(futures), num_returns=1)
        actor, index = futures.pop(ready[0])
        try:
            record = ray.get(ready[0])
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, VaegenError):
                raise VaegenError(str(e.cause)) from None
            raise
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
            continue
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"a DecoderWorker died on shard {index} more often than its restarts allow "
                               f"({str(e).splitlines()[0]}); finished shards are kept: rerun to resume") from None
        on_done(record)
        submit(actor)
