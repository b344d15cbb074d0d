"""Every use of Ray's private API in vaegen (`ray._private`, `ray.*._internal`, `_system_config`, overriding Ray's
private methods): nowhere else in vae_core/, cluster/ or jobs/ (tests/test_ray_private.py checks it).

Private modules, settings and methods change between Ray releases without notice, so each hook here runs only
where hooks_enabled(): the Ray imported is the one pyproject.toml pins (PINNED_RAY_VERSION) and
$VAEGEN_RAY_PRIVATE_HOOKS is not "0". Anywhere else each hook falls back to Ray's public API, which does the same
work with a slower start and stop:
- a local Ray starts with Ray's own system settings (local_ray_options() adds no _system_config);
- Ray Train keeps all its controller helpers (trainer_class() is Ray's DataParallelTrainer);
- whether this process started its Ray cannot be told, so it counts as joined (ray_started_here() is False);
- stopping Ray is ray.shutdown() alone (local_raylet_pids() is empty, so kill_stray_workers() finds nothing);
- a Parquet read starts Ray Data's default number of footer-reading actors (footer_readers_for() sets none)."""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

PINNED_RAY_VERSION = "2.60.0"             # pyproject.toml's ray[...]==; the hooks are written against this release
HOOKS_ENV = "VAEGEN_RAY_PRIVATE_HOOKS"    # "0": every hook takes its public fallback, as on another Ray version

# A Ray started here:
# - prestarts no idle worker processes. Ray starts one per CPU for the first driver, to run its first tasks sooner;
#   the first actors vaegen starts are Ray Train's controller and workers, which bring their own runtime
#   environment and so cannot use those processes: they would only take CPU from the start-up that matters.
# - retries its socket connections every 100 ms instead of every second, 100 times instead of 10 (the same 10 s
#   before it gives up). The raylet connects to the object store it has just started in a thread; when the store
#   is not listening yet, the first retry came a whole second later, in about half of all starts.
LOCAL_RAY_SYSTEM_CONFIG = {"prestart_worker_first_driver": False,
                           "raylet_client_connect_timeout_milliseconds": 100,
                           "raylet_client_num_connect_attempts": 100}


# Ray Data's Parquet reader lists its files on a pool of footer-reading actors, started anew for each execution of
# the read (each streamed epoch), 32 of them unless this variable, read when read_parquet builds the datasource,
# says otherwise. It hands them FOOTER_BATCH_FILES files at a time, so an actor beyond the files' batches does
# nothing but start a worker process, every epoch: on a small node, CPU the training workers are waiting for.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_BATCH_FILES = 10
FOOTER_ACTORS_MAX = 32


def hooks_apply(ray_version: str, switch: str | None) -> bool:
    """Whether the private hooks run on Ray `ray_version` with $VAEGEN_RAY_PRIVATE_HOOKS set to `switch`."""
    switched_off = (switch or "").strip().lower() in ("0", "false", "no", "off")
    return ray_version == PINNED_RAY_VERSION and not switched_off


def hooks_enabled() -> bool:
    """Whether the private hooks run in this process: the pinned Ray, and not switched off."""
    import ray
    return hooks_apply(ray.__version__, os.environ.get(HOOKS_ENV))


def local_ray_options() -> dict:
    """ray.init() keyword arguments, beyond the public ones, for a Ray started here."""
    return {"_system_config": LOCAL_RAY_SYSTEM_CONFIG} if hooks_enabled() else {}


def _head_node():
    """The Ray node this process started (it stops when this process does), or None."""
    import ray._private.worker
    node = getattr(ray._private.worker, "_global_node", None)
    return node if node is not None and node.is_head() else None


def ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to: that Ray stops when this process does."""
    return hooks_enabled() and _head_node() is not None


def local_raylet_pids() -> set[int]:
    """The raylets of the Ray this process started (empty when it joined one, or started none)."""
    if not hooks_enabled():
        return set()
    node = _head_node()
    if node is None:
        return set()
    from ray._private import ray_constants
    return {info.process.pid for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])}


def kill_stray_workers(raylet_pids: set[int]) -> None:
    """SIGKILL every worker process of these raylets still running (call it after ray.shutdown()).
    Ray 2.60's workers can deadlock in their C++ exit handlers (an actor exiting while a pubsub reply is pending
    destroys the publisher inside the io service it posts to): such a process never ends and keeps its memory (a
    Ray Train controller: most of a GB). Every worker carries its raylet's pid in RAY_RAYLET_PID, so they are found
    exactly (through /proc, on Linux), wherever they were reparented."""
    raylets = {str(pid).encode() for pid in raylet_pids}
    if not raylets or not os.path.isdir("/proc"):
        return
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            if any(var.startswith(b"RAY_RAYLET_PID=") and var.split(b"=", 1)[1] in raylets for var in env):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:                                      # gone already, or not ours
            continue


def trainer_class(*, local: bool) -> type:
    """Ray Train's DataParallelTrainer (TorchTrainer is one with a TorchConfig); on a Ray this process started
    (`local`), one without three of its helpers, each a worker process to start (and import into) before the first
    batch, with nothing to do on such a Ray:
    - the placement-group cleaner, a detached actor that removes a dead controller's placement group from a cluster
      that outlives it (a Ray started here stops with this process). It also polls the State API every second:
      without the dashboard, which serves that API, it logs a warning each time, and it fails when other Ray
      instances run on the same host;
    - the autoscaling coordinator the scaling policy reports its resources to: a Ray started here has no autoscaler;
    - the dataset manager, when the run has no Ray Data datasets (the training rows came through the object store).
    tests/test_train_ray.py checks that these helpers are gone on a local Ray and kept on a joined one."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
    if not local or not hooks_enabled():
        return DataParallelTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LocalTrainer(DataParallelTrainer):
        def _create_default_callbacks(self) -> list:
            unused = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["scaling_policy"] = without_autoscaler(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)
    return LocalTrainer


def without_autoscaler(scaling_config):
    """Ray Train's fixed-size scaling policy, minus its resource requests to the autoscaling coordinator (whose
    actor it would start first). Made here, and so sent to the controller by value."""
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class LocalScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass
    return LocalScalingPolicy(scaling_config)


def recorded_address_file() -> str:
    """Ray's session file: where `ray start` records the address that `--address auto` joins (under $RAY_TMPDIR, else
    $TMPDIR, else /tmp, as Ray looks for it). Without the hooks, Ray's default place for it."""
    if hooks_enabled():
        from ray._common.utils import get_ray_address_file
        return get_ray_address_file(None)
    return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray",
                        "ray_current_cluster")


@contextmanager
def footer_readers_for(files: int) -> Iterator[None]:
    """Around ray.data.read_parquet of `files` files: its footer-reading pool is one actor per batch of files Ray
    Data hands out (see FOOTER_ACTORS_ENV), at most Ray's own default. A value the user set is kept."""
    if not hooks_enabled() or FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(max(1, min(FOOTER_ACTORS_MAX, -(-files // FOOTER_BATCH_FILES))))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)
