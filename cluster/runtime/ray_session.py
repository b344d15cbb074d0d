"""Starting or joining Ray: the embedded default starts a local Ray; --address joins a cluster."""
from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cluster.runtime.console import capture

# Each Ray worker gets one torch/OpenMP thread unless told otherwise: N busy workers on N cores, not N².
# A local Ray is never drained or preempted, so Ray Train's preemption watcher (an actor process per run) has
# nothing to watch there. Ray Train's controller polls its workers every 2 s by default, and a run's end (the
# worker group finishing, then stopping) waits on those polls: every 0.5 s, a small run publishes seconds
# sooner, for a few cheap calls a second. A worker that misses polls is still only declared lost after Ray
# Train's health-check timeout (minutes), not after one missed poll.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
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
DASHBOARD_ENV = "VAEGEN_RAY_DASHBOARD"     # "1": the embedded Ray starts its dashboard, when its packages are here


def dashboard_import_error(module: str = "ray.dashboard.optional_deps") -> ImportError | None:
    """Why Ray's dashboard cannot start in this environment (ray[default]'s packages are missing), or None: the
    import Ray itself checks before it refuses include_dashboard=True."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return e
    return None


def include_dashboard(asked: bool | None = None,
                      import_error: Callable[[], ImportError | None] = dashboard_import_error) -> bool:
    """Whether the embedded Ray starts its dashboard: when asked (`asked`, else $VAEGEN_RAY_DASHBOARD=1) and its
    packages import. Off unless asked: it lives only as long as the command, and it is a dozen Python processes
    (its head and one per module) that compete with the workers' start-up for the CPUs. Asked for on a Ray
    without its packages, it says so and Ray starts without it."""
    if asked is None:
        asked = os.environ.get(DASHBOARD_ENV, "0").strip().lower() in ("1", "true", "yes")
    if not asked:
        return False
    error = import_error()
    if error is not None:
        print(f"vaegen: Ray's dashboard needs pip install 'ray[default]' ({error}); starting Ray without it")
        return False
    return True


def ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to: that Ray stops when this process does."""
    import ray._private.worker
    node = getattr(ray._private.worker, "_global_node", None)
    return node is not None and node.is_head()


def local_raylet_pids() -> set[int]:
    """The raylets of the Ray this process started (empty when it joined one, or started none)."""
    import ray._private.worker
    from ray._private import ray_constants
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None or not node.is_head():
        return set()
    return {info.process.pid for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])}


def shutdown_ray() -> None:
    """ray.shutdown(); when this process started that Ray, SIGKILL any of its worker processes that outlived it.
    Ray 2.60's workers can deadlock in their C++ exit handlers (an actor exiting while a pubsub reply is pending
    destroys the publisher inside the io service it posts to): such a process never ends and keeps its memory (a
    Ray Train controller: most of a GB). Every worker carries its raylet's pid in RAY_RAYLET_PID, so they are found
    exactly (through /proc, on Linux), wherever they were reparented."""
    import ray
    raylets = {str(pid).encode() for pid in local_raylet_pids()}
    ray.shutdown()
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


@contextmanager
def ray_runtime(address: str | None = None, *, num_cpus: int | None = None,
                object_store_mb: int | None = None, dashboard: bool | None = None) -> Iterator[None]:
    """Use the Ray already running in this process, else join `address` (or $RAY_ADDRESS, as inside a Ray Job),
    else start a local one, with its dashboard if `dashboard` (default: $VAEGEN_RAY_DASHBOARD=1) and its packages
    are installed (include_dashboard). Only a Ray
    started or joined here is disconnected on exit."""
    capture()        # from here Ray's output goes to the verb's log file, unless --verbose (cluster/runtime/console.py)
    import ray
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Joining: the cluster (or the job's runtime_env) owns the workers' environment; ours would conflict.
        ray.init(address=address, log_to_driver=True)
    else:
        dashboard = include_dashboard(dashboard)
        # Workers' own prints (epoch lines) still reach the terminal; Ray's INFO chatter does not.
        kwargs: dict = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": True,
                        "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="WARNING"),
                        "_system_config": LOCAL_RAY_SYSTEM_CONFIG}
        store = object_store_mb or int(os.environ.get("VAEGEN_OBJECT_STORE_MB", "0")) or None
        # address="local": always a new Ray; plain ray.init() would join whatever `ray start` left recorded
        # in /tmp/ray/ray_current_cluster, even a cluster that no longer runs.
        context = ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", object_store_memory=store * 2**20 if store else None,
                           **kwargs)
        if dashboard:
            print(f"vaegen: Ray's dashboard at http://{context.dashboard_url} while this command runs")
    try:
        yield
    finally:
        shutdown_ray()
