"""Starting or joining Ray: the embedded default starts a local Ray; --address joins a cluster."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Each Ray worker gets one torch/OpenMP thread unless told otherwise: N busy workers on N cores, not N².
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def ray_runtime(address: str | None = None, *, num_cpus: int | None = None,
                object_store_mb: int | None = None) -> Iterator[None]:
    """Use the Ray already running in this process, else join `address`, else start a local one.
    Only a Ray started here is shut down on exit."""
    import ray
    if ray.is_initialized():
        yield
        return
    kwargs: dict = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        store = object_store_mb or int(os.environ.get("VAEGEN_OBJECT_STORE_MB", "0")) or None
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 object_store_memory=store * 2**20 if store else None, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
