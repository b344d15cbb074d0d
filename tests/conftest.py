"""Shared fixtures: real Fashion-MNIST bytes, a real S3 endpoint (moto's server over HTTP on 127.0.0.1),
and one local Ray per test session (started only by the tests that ask for it).

Test tiers. A test is marked `ray` when it uses a fixture that starts or joins Ray (ray_local, ray_cluster,
starts_ray, or any fixture built on them) and `s3` when it uses a moto server (s3_server, starts_moto, or any
fixture built on them); both marks are applied here at collection, from the fixtures a test uses. A test that
starts Ray or moto another way (a `vaegen` process that runs Ray, `ray start`, `python -m moto.server`) carries
the mark itself, and a fixture that does so asks for `starts_ray` / `starts_moto`. The unit tier,
`pytest -m "not ray and not s3 and not slow"`, then starts neither; `_tier_guard` fails any unmarked test that
starts one anyway (in this process, or in any process it spawns), so the marks cannot silently go stale."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
import warnings

import numpy as np
import pytest

from vae_core.config import StorageConfig
from vae_core.data import FASHION_MNIST_DIR, read_fashion_mnist

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Every Ray the tests start (and the CLI processes they spawn, which inherit this) binds to 127.0.0.1 instead
# of the host's interface: Ray's switch for its loopback-only mode, read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# Every process this session spawns inherits the token, so the guard can tell its own Ray and moto servers from
# another session's on a shared machine.
SESSION_TOKEN = f"VAEGEN_TEST_SESSION={uuid.uuid4().hex}"
os.environ["VAEGEN_TEST_SESSION"] = SESSION_TOKEN.split("=", 1)[1]

RAY_FIXTURES = {"ray_local", "ray_cluster", "starts_ray"}
S3_FIXTURES = {"s3_server", "starts_moto"}


@pytest.hookimpl(tryfirst=True)           # before -m deselects: the marks must exist when it reads them
def pytest_collection_modifyitems(items):
    for item in items:
        used = set(item.fixturenames)         # already the transitive closure of the fixtures it asks for
        if used & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        if used & S3_FIXTURES:
            item.add_marker(pytest.mark.s3)


@pytest.fixture(scope="session")
def starts_ray():
    """Ask for this in a fixture that starts or joins a Ray of its own: every test using it is marked `ray`."""


@pytest.fixture(scope="session")
def starts_moto():
    """Ask for this in a fixture that starts a moto server of its own: every test using it is marked `s3`."""


def _service_processes(token: str = SESSION_TOKEN) -> dict[int, str]:
    """This session's Ray and moto server processes, pid → 'ray' or 's3' (a Ray's gcs_server and raylets; moto
    run as `moto_server` or `python -m moto.server`). Found by the session `token` in their environment, wherever
    they were reparented. A raylet starts each Ray worker by fork, then exec: for the milliseconds between, the
    child still shows the raylet's command line and environment, so a process whose parent is one of these is
    such a child, not a server."""
    found, parents = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            programs = [os.path.basename(a) for a in argv[:2]]      # [python, script] for a console script
            kind = ("ray" if programs[0] in (b"gcs_server", b"raylet")
                    else "s3" if b"moto_server" in programs or b"moto.server" in argv[:3] else None)
            if kind:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    ours = token.encode() in f.read().split(b"\0")
                if ours:
                    with open(f"/proc/{entry.name}/stat") as f:
                        parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                    found[int(entry.name)] = kind
        except (OSError, IndexError, ValueError):       # gone, or not ours to read
            continue
    return {pid: kind for pid, kind in found.items() if parents[pid] not in found}


def _ray_running_here() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class _ServiceWatch(threading.Thread):
    """What one test starts, from its fixtures' setup to their teardown: Ray in this process, moto's server module
    imported here, and every Ray or moto server process of this session that appears (a CLI process that starts
    Ray stops it before it exits, so one look at the end would miss it; both live for seconds, a look every half
    second sees them)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="tier-guard")
        self.ray_before, self.moto_before = _ray_running_here(), "moto.server" in sys.modules
        self.before = set(_service_processes())
        self.started: set[str] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.look()

    def look(self) -> None:
        self.started |= {kind for pid, kind in _service_processes().items() if pid not in self.before}

    def finish(self) -> set[str]:
        self.done.set()
        self.join()
        self.look()
        if not self.ray_before and _ray_running_here():
            self.started.add("ray")
        if not self.moto_before and "moto.server" in sys.modules:
            self.started.add("s3")
        return self.started


_WATCH = pytest.StashKey[_ServiceWatch]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if not {"ray", "s3"} <= {m.name for m in item.iter_markers()}:
        item.stash[_WATCH] = _ServiceWatch()
        item.stash[_WATCH].start()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Fails (at teardown) a test that started Ray or moto without its `ray` / `s3` mark."""
    watch = item.stash.get(_WATCH, None)
    try:
        result = yield
    finally:
        started = watch.finish() if watch else set()
    marks = {m.name for m in item.iter_markers()}
    unmarked = sorted(started - marks)
    if unmarked:
        what = {"ray": "Ray", "s3": "a moto server"}
        message = (f"{item.nodeid} started {' and '.join(what[k] for k in unmarked)} but is not marked "
                   f"{' and '.join(unmarked)}: use the fixture (ray_local, s3_server, ...), ask for starts_ray / "
                   f"starts_moto in a fixture that starts its own, or mark the test")
        if not marks & {"ray", "s3", "slow"}:
            pytest.fail(message, pytrace=False)         # it is in the unit tier, which promises neither
        warnings.warn(pytest.PytestWarning(message))     # outside the unit tier: a mark to fix, not a broken promise
    return result


def vaegen_in_a_fresh_process(argv: list[str], watched: tuple[str, ...] = ("torch",)) -> tuple[int, list[str], str]:
    """`vaegen ARGV` in a new interpreter, where nothing is imported yet: (its exit status, which modules of
    `watched` it imported, its stderr)."""
    code = ("import json, sys\nfrom jobs.cli import main\ntry:\n    status = main(sys.argv[2:])\n"
            "except SystemExit as e:\n    status = e.code if isinstance(e.code, int) else 1\n"
            "watched = [m for m in sys.argv[1].split(',') if m in sys.modules]\n"
            "print(json.dumps([status, sorted(watched)]), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, ",".join(watched), *argv], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    try:
        status, imported = json.loads(proc.stderr.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"vaegen {' '.join(argv)} ended without its report: {proc.stderr[-2000:]}") from None
    return status, imported, proc.stderr


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1: all are held while they are picked, since a port let go may be
    handed out again at once (two of a Ray head's components given one port refuse to start)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@pytest.fixture(scope="session")
def fashion_mnist():
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.fail(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist (./dev.sh does it)")
    return read_fashion_mnist()


# moto's fixed test credentials: the driver gets them from s3_server, Ray's workers from start_local_ray, so a
# Ray started before the S3 server (by a module's fixture) still reaches it.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


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
    os.environ.update(S3_TEST_ENV)
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


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])   # asks for S3 only at run time
def storage_config(request) -> StorageConfig:
    """Runs a test against a local folder and against S3 over HTTP: the same code path."""
    return request.getfixturevalue(f"{request.param}_storage_config")


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a disk of its own that holds only `size` bytes (a tmpfs, which a root user may mount), for
    what a full disk does: small_disk(size) -> its path; small_disk.grow(path, size) frees space the way a user
    would. Skipped, saying why, where mounting is not permitted; unmounted at the end."""
    mounted = []

    def mount(size: int):
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                  capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            pytest.skip("a full disk is made with mount -t tmpfs, and there is no mount command here")
        if proc.returncode != 0:
            pytest.skip(f"a full disk is made with mount -t tmpfs, which is not permitted here: {proc.stderr.strip()}")
        mounted.append(folder)
        return folder

    def grow(folder, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, timeout=30)

    mount.grow = grow
    try:
        yield mount
    finally:
        for folder in mounted:
            subprocess.run(["umount", str(folder)], check=True, timeout=60)


@pytest.fixture(scope="session")
def small_fashion(fashion_mnist):
    """2,000 real training images and 500 test images, as uint8 (N, 1, 28, 28)."""
    train, test = fashion_mnist.splits["train"], fashion_mnist.splits["test"]
    return (train.images[:2000], train.labels[:2000]), (test.images[:500], test.labels[:500])


@pytest.fixture
def fashion_root(storage_config, small_fashion):
    """A storage root (local folder, then S3) holding small_fashion as dataset 'fm-small' with both splits."""
    from cluster.data.datasets import ingest
    from cluster.store.storage import open_storage
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


@pytest.fixture
def tiny_root(tmp_path):
    """A local root holding one untrained 1x8x8 model version, `tiny`: enough for the verbs that read a model."""
    from cluster.store.registry import Registry
    from cluster.store.storage import open_storage
    from vae_core.checkpoint import checkpoint_files
    from vae_core.config import ModelConfig
    from vae_core.models import build_model
    root = tmp_path / "root"
    storage = open_storage(StorageConfig(root=str(root)), for_writing=True)
    Registry(storage).publish("tiny", checkpoint_files(build_model(ModelConfig(image_shape=(1, 8, 8), hidden_dim=4,
                                                                                latent_dim=2))))
    return root


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


RAY_TEST_CPUS = 4          # logical CPUs on a 2-core box: room for actors and Ray Data's tasks side by side


def start_local_ray() -> None:
    import ray

    from cluster.runtime.ray_private import local_ray_options
    from cluster.runtime.ray_session import WORKER_ENV
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=RAY_TEST_CPUS, object_store_memory=256 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": {**WORKER_ENV, **S3_TEST_ENV}}, log_to_driver=False, **local_ray_options())


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
        from cluster.runtime.ray_session import shutdown_ray
        shutdown_ray()           # and any worker of the session's Ray that outlived it


@pytest.fixture
def ray_cluster():
    """A multi-node ray.cluster_utils.Cluster for fault tests; any shared local Ray is stopped first.
    Usage: cluster = ray_cluster(); cluster.add_node(num_cpus=1); ray.init(address=cluster.address)."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster.runtime.ray_session import shutdown_ray
    shutdown_ray()
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
