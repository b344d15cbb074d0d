"""Shared fixtures: real Fashion-MNIST bytes, a real S3 endpoint (moto's server over HTTP on 127.0.0.1),
and one local Ray per test session (started only by the tests that ask for it)."""
from __future__ import annotations

import os
import socket
import uuid

import numpy as np
import pytest

from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_DIR, read_fashion_mnist

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Every Ray the tests start (and the CLI processes they spawn, which inherit this) binds to 127.0.0.1 instead
# of the host's interface: Ray's switch for its loopback-only mode, read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fashion_mnist():
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (./dev.sh does it)")
    return read_fashion_mnist()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP: moto's ThreadedMotoServer on 127.0.0.1, a free port, stopped at the end."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                            "AWS_REGION", "AWS_DEFAULT_REGION")}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    import boto3
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="vaegen-test")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_storage_config(s3_server) -> StorageConfig:
    """A fresh prefix in the test bucket for each test."""
    return StorageConfig(root=f"s3://vaegen-test/{uuid.uuid4().hex[:12]}", s3_endpoint=s3_server)


@pytest.fixture
def local_storage_config(tmp_path) -> StorageConfig:
    return StorageConfig(root=str(tmp_path / "root"))


@pytest.fixture(params=["local", "s3"])
def storage_config(request) -> StorageConfig:
    """Runs a test against a local folder and against S3 over HTTP: the same code path."""
    return request.getfixturevalue(f"{request.param}_storage_config")


@pytest.fixture(scope="session")
def small_fashion(fashion_mnist):
    """2,000 real training images and 500 test images, as uint8 (N, 1, 28, 28)."""
    train, test = fashion_mnist.splits["train"], fashion_mnist.splits["test"]
    return (train.images[:2000], train.labels[:2000]), (test.images[:500], test.labels[:500])


@pytest.fixture
def fashion_root(storage_config, small_fashion):
    """A storage root (local folder, then S3) holding small_fashion as dataset 'fm-small' with both splits."""
    from cluster.datasets import ingest
    from cluster.storage import open_storage
    from vae_core.data import ArrayDataset, ArraySplit
    (train_x, train_y), (test_x, test_y) = small_fashion
    dataset = ArrayDataset({"train": ArraySplit(train_x, train_y), "test": ArraySplit(test_x, test_y)},
                           tuple(str(i) for i in range(10)), "small_fashion")
    ingest(open_storage(storage_config, for_writing=True), "fm-small", dataset, progress=False)
    return storage_config


def root_args(cfg: StorageConfig) -> list[str]:
    """The CLI flags that point `vaegen` at a storage root."""
    return ["--root", cfg.root] + (["--s3-endpoint", cfg.s3_endpoint] if cfg.s3_endpoint else [])


def rng_images(n: int, shape=(1, 28, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


RAY_TEST_CPUS = 4          # logical CPUs on a 2-core box: room for actors and Ray Data's tasks side by side


def start_local_ray() -> None:
    import ray
    from cluster.runtime import WORKER_ENV
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=RAY_TEST_CPUS, object_store_memory=256 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)


@pytest.fixture
def ray_local(s3_server):
    """One local Ray reused by every test that asks for it (started on first use, stopped at session end).
    It asks for the S3 server first: Ray workers inherit the environment Ray starts with, S3 credentials too."""
    start_local_ray()
    yield
    # left running for the next test; `_stop_ray_at_exit` stops it


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_exit():
    yield
    import sys
    if "ray" in sys.modules:
        import ray
        ray.shutdown()


@pytest.fixture
def ray_cluster():
    """A multi-node ray.cluster_utils.Cluster for fault tests; any shared local Ray is stopped first.
    Usage: cluster = ray_cluster(); cluster.add_node(num_cpus=1); ray.init(address=cluster.address)."""
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()
    made: list[Cluster] = []

    def make(**head_args) -> Cluster:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "object_store_memory": 128 * 2**20, **head_args})
        made.append(c)
        return c
    yield make
    ray.shutdown()
    for c in made:
        c.shutdown()
