"""Starting or joining Ray: the embedded default starts a local Ray; --address joins a cluster."""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cluster.runtime.console import capture
from cluster.runtime.ray_join import CONNECT_TIMEOUT_S, join_ray, ray_target
from cluster.runtime.ray_private import kill_stray_workers, local_ray_options, local_raylet_pids

# Each Ray worker gets one torch/OpenMP thread unless told otherwise: N busy workers on N cores, not N².
# A local Ray is never drained or preempted, so Ray Train's preemption watcher (an actor process per run) has
# nothing to watch there. Ray Train's controller polls its workers every 2 s by default, and a run's end (the
# worker group finishing, then stopping) waits on those polls: every 0.5 s, a small run publishes seconds
# sooner, for a few cheap calls a second. A worker that misses polls is still only declared lost after Ray
# Train's health-check timeout (minutes), not after one missed poll.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
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


def shutdown_ray() -> None:
    """ray.shutdown(); when this process started that Ray, also kill any of its worker processes that outlived it
    (ray_private.kill_stray_workers: Ray 2.60's workers can hang in their exit handlers)."""
    import ray
    raylets = local_raylet_pids()
    ray.shutdown()
    kill_stray_workers(raylets)


@contextmanager
def ray_runtime(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int | None = None,
                dashboard: bool | None = None, connect_timeout: float = CONNECT_TIMEOUT_S) -> Iterator[None]:
    """Use the Ray already running in this process, else join `address` (or $RAY_ADDRESS, as inside a Ray Job)
    within `connect_timeout` seconds, in view (ray_join.py), else start a local one, with its dashboard if
    `dashboard` (default: $VAEGEN_RAY_DASHBOARD=1) and its packages are installed (include_dashboard). Only a Ray
    started or joined here is disconnected on exit."""
    capture()        # from here Ray's output goes to the verb's log file, unless --verbose (cluster/runtime/console.py)
    import ray
    if ray.is_initialized():
        yield
        return
    target = ray_target(address)
    if target is not None:
        # Joining: the cluster (or the job's runtime_env) owns the workers' environment; ours would conflict.
        join_ray(target, connect_timeout, lambda joined: ray.init(address=joined, log_to_driver=True))
    else:
        dashboard = include_dashboard(dashboard)
        # Workers' own prints (epoch lines) still reach the terminal; Ray's INFO chatter does not.
        kwargs: dict = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": True,
                        "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="WARNING"),
                        **local_ray_options()}
        store = object_store_mb or int(os.environ.get("VAEGEN_OBJECT_STORE_MB", "0")) or None
        # address="local": always a new Ray; plain ray.init() would join whatever `ray start` left recorded
        # in /tmp/ray/ray_current_cluster, even a cluster that no longer runs.
        # Seconds of start-up before any bar can move: said, so that a blank terminal is never the only sign.
        cpus = num_cpus or os.cpu_count()
        # Ray's CPUs are scheduling slots: a training's local Ray may have more than the machine (local_cpus).
        slots = (f"{cpus} CPUs" if cpus == os.cpu_count()
                 else f"{cpus} CPU slots on this machine's {os.cpu_count()} CPUs")
        print(f"vaegen: starting a local Ray ({slots})...", flush=True)
        context = ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", object_store_memory=store * 2**20 if store else None,
                           **kwargs)
        if dashboard:
            print(f"vaegen: Ray's dashboard at http://{context.dashboard_url} while this command runs")
    try:
        yield
    finally:
        shutdown_ray()
