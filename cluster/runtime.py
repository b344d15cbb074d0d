"""Starting or joining Ray: the embedded default starts a local Ray; --address joins a cluster."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .console import capture

# Each Ray worker gets one torch/OpenMP thread unless told otherwise: N busy workers on N cores, not N².
# A local Ray is never drained or preempted, so Ray Train's preemption watcher (an actor process per run) has
# nothing to watch there.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
DASHBOARD_ENV = "VAEGEN_RAY_DASHBOARD"     # "0": the embedded Ray starts without its dashboard (and State API)


def dashboard_wanted() -> bool:
    return os.environ.get(DASHBOARD_ENV, "1").strip().lower() not in ("0", "false", "no")


@contextmanager
def ray_runtime(address: str | None = None, *, num_cpus: int | None = None,
                object_store_mb: int | None = None, dashboard: bool | None = None) -> Iterator[None]:
    """Use the Ray already running in this process, else join `address` (or $RAY_ADDRESS, as inside a Ray Job),
    else start a local one, with its dashboard unless `dashboard` is False (default: unless
    $VAEGEN_RAY_DASHBOARD=0). Only a Ray
    started or joined here is disconnected on exit."""
    capture()        # from here Ray's output goes to the verb's log file, unless --verbose (cluster/console.py)
    import ray
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Joining: the cluster (or the job's runtime_env) owns the workers' environment; ours would conflict.
        ray.init(address=address, log_to_driver=True)
    else:
        dashboard = dashboard_wanted() if dashboard is None else dashboard
        # Workers' own prints (epoch lines) still reach the terminal; Ray's INFO chatter does not.
        kwargs: dict = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": True,
                        "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="WARNING")}
        store = object_store_mb or int(os.environ.get("VAEGEN_OBJECT_STORE_MB", "0")) or None
        # address="local": always a new Ray; plain ray.init() would join whatever `ray start` left recorded
        # in /tmp/ray/ray_current_cluster, even a cluster that no longer runs.
        # The dashboard (127.0.0.1 only) also serves the State API that Ray Train's placement-group cleaner polls;
        # without it that actor warns every second. It is a dozen Python processes (its head and one per module)
        # that compete with the workers' start-up for the CPUs, hence the switch.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                 dashboard_host="127.0.0.1",
                 object_store_memory=store * 2**20 if store else None, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
