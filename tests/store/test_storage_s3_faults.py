"""Storage against a misbehaving S3: its retryable answers (409/500/503/SlowDown, resets mid-request) are retried
through a real fault-injecting proxy in front of moto, a read during a replace is one whole version, and an endpoint
that never answers fails in one line within --s3-timeout."""
import contextlib
import json
import os
import socket
import threading
import time
import uuid

import boto3
import pytest
from s3_fault_proxy import FaultProxy
from threads import all_at_once

from cluster.store.storage import Storage
from jobs.cli import main
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError

# -- S3 through a fault-injecting proxy --------------------------------------------------------------

@pytest.fixture
def faulty(s3_server):
    """(proxy, root config through it, the same root directly on moto): start a proxy with proxy.set_rates."""
    prefix = uuid.uuid4().hex[:12]
    with FaultProxy(s3_server, seed=7, error_rate=0, reset_rate=0, delay_rate=0) as proxy:
        yield (proxy, StorageConfig(root=f"s3://vaegen-test/{prefix}", s3_endpoint=proxy.url),
               StorageConfig(root=f"s3://vaegen-test/{prefix}", s3_endpoint=s3_server))


def heal_after(storage: Storage, proxy: FaultProxy, operation: str, tries: int) -> None:
    """Let the proxy fail `tries` sends of `operation`, then heal it (counted on the client's own sends)."""
    sent = []

    def count(**_):
        sent.append(1)
        if len(sent) > tries:
            proxy.set_rates(error_rate=0)
    storage.s3_client.meta.events.register(f"before-send.s3.{operation}", count)


def test_a_409_on_a_conditional_put_is_retried_not_fatal(faulty):
    proxy, through, _ = faulty
    storage = Storage(through)
    proxy.set_rates(error_rate=1.0)                   # every PUT fails (seed 7: a 409 among the first three)
    heal_after(storage, proxy, "PutObject", tries=3)
    assert storage.publish("claim.json", b"mine", if_absent=True) is True
    assert proxy.counts["409"] >= 1
    assert storage.read_bytes("claim.json") == b"mine"
    assert storage.publish("claim.json", b"theirs", if_absent=True) is False     # then 412: already there


def test_a_409_on_compare_and_swap_is_retried_then_decided(faulty):
    proxy, through, _ = faulty
    storage = Storage(through)
    storage.publish("ptr.json", b"v1")
    proxy.methods = ("PUT",)                          # the read of the current value passes
    proxy.set_rates(error_rate=1.0)
    heal_after(storage, proxy, "PutObject", tries=3)
    assert storage.compare_and_swap("ptr.json", b"v2", lambda current: current == b"v1") is True
    assert proxy.counts["409"] >= 1 and storage.read_bytes("ptr.json") == b"v2"


def test_publish_through_faults_lands_exactly_the_bytes(faulty):
    proxy, through, direct = faulty
    storage = Storage(through)
    proxy.set_rates(error_rate=0.25, reset_rate=0.1, delay_rate=0.1)
    want = {}
    for i in range(24):
        key, data = f"shards/part-{i:05d}.bin", os.urandom(2_000 + 37_000 * (i % 4))
        assert storage.publish(key, data, if_absent=i % 2 == 0) is True     # fresh keys: ours, even if retried
        want[key] = data
    for i in range(0, 24, 3):                         # overwrite some: the last bytes win
        key = f"shards/part-{i:05d}.bin"
        want[key] = os.urandom(5_000)
        assert storage.publish(key, want[key]) is True
    for i in range(0, 24, 4):                         # and an if_absent over an existing key changes nothing
        assert storage.publish(f"shards/part-{i:05d}.bin", b"late", if_absent=True) is False
    assert proxy.counts["reset"] and sum(proxy.counts[k] for k in ("409", "500", "503", "SlowDown"))
    clean = Storage(direct)
    assert {e.key: clean.read_bytes(e.key) for e in clean.list("shards")} == want


def test_concurrent_if_absent_publishers_have_exactly_one_winner(faulty):
    proxy, through, direct = faulty
    proxy.methods = ("PUT",)     # only the conditional PUTs draw faults: seed 7's second draw is a 409, for sure
    proxy.set_rates(error_rate=0.25, reset_rate=0.05, delay_rate=0.2)
    publishers, rounds = 4, 6
    storages = [Storage(through) for _ in range(publishers)]
    clean = Storage(direct)
    for r in range(rounds):                           # all four PUT the same fresh key at once
        won = all_at_once(publishers, lambda p: storages[p].publish(f"claims/v{r:04d}.json",
                                                                     f"publisher {p}".encode(), if_absent=True))
        winners = [p for p in range(publishers) if won[p]]
        assert len(winners) == 1, (r, won)
        assert clean.read_bytes(f"claims/v{r:04d}.json") == f"publisher {winners[0]}".encode()
    assert proxy.counts["409"] >= 1                   # the race met S3's own conflict answer, and survived it


def test_compare_and_swap_through_faults_loses_no_update(faulty):
    """Writers append their entry to one list with compare-and-swap, retrying until it takes: every write that
    returned True is in the final list, and every writer's entry got in."""
    proxy, through, direct = faulty
    Storage(direct).publish("log.json", b"[]")
    proxy.set_rates(error_rate=0.2, reset_rate=0.05, delay_rate=0.2)
    writers, entries_each = 3, 4
    accepted: list[list] = []

    def writer(w: int) -> None:
        storage = Storage(through)
        for n in range(entries_each):
            while True:
                seen = storage.read_bytes("log.json")
                mine = json.dumps(json.loads(seen) + [f"{w}.{n}.{uuid.uuid4().hex[:6]}"]).encode()
                if storage.compare_and_swap("log.json", mine, lambda current, seen=seen: current == seen):
                    accepted.append(json.loads(mine))
                    break
    all_at_once(writers, writer)
    final = json.loads(Storage(direct).read_bytes("log.json"))
    for state in accepted:                            # each accepted write is a prefix of what came after it
        assert final[:len(state)] == state
    got = {(e.split(".")[0], e.split(".")[1]) for e in final}
    assert got == {(str(w), str(n)) for w in range(writers) for n in range(entries_each)}


def test_reads_and_listings_through_faults_succeed(faulty):
    proxy, through, direct = faulty
    clean = Storage(direct)
    want = {f"ds/split{i % 3}/part-{i:05d}.bin": os.urandom(1_000 + 20_000 * (i % 3)) for i in range(15)}
    for key, data in want.items():
        clean.publish(key, data)
    storage = Storage(through)
    proxy.set_rates(error_rate=0.2, reset_rate=0.06, delay_rate=0.1)
    for _ in range(3):
        assert storage.list_dirs("ds") == ["split0", "split1", "split2"]
        assert {e.key: e.size for e in storage.list("ds", recursive=True)} == {k: len(v) for k, v in want.items()}
        for key, data in want.items():
            assert storage.exists(key) and storage.read_bytes(key) == data
    assert proxy.counts["reset"] and proxy.counts["500"] and proxy.counts["503"] + proxy.counts["SlowDown"]


# -- the proxy itself ---------------------------------------------------------------------------------

def test_the_fault_proxy_speaks_s3_errors_passes_bodies_through_and_stops_cleanly(s3_server):
    import http.client

    from botocore.config import Config
    from botocore.exceptions import ClientError
    threads_before = set(threading.enumerate())
    with FaultProxy(s3_server, seed=3, error_rate=1.0, reset_rate=0, delay_rate=0, methods=("GET",)) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                              config=Config(retries={"total_max_attempts": 1}))
        client.put_object(Bucket="vaegen-test", Key="proxy/a", Body=b"hello")        # PUTs pass here
        seen = set()
        for _ in range(12):
            with pytest.raises(ClientError) as failed:
                client.get_object(Bucket="vaegen-test", Key="proxy/a")
            seen.add((failed.value.response["ResponseMetadata"]["HTTPStatusCode"],
                      failed.value.response["Error"]["Code"]))
        assert seen <= {(500, "InternalError"), (503, "ServiceUnavailable"), (503, "SlowDown")} and len(seen) >= 2
        proxy.set_rates(error_rate=0)
        body = os.urandom(300_000)
        conn = http.client.HTTPConnection(proxy.url.removeprefix("http://"))      # a chunked upload, unsigned
        conn.putrequest("PUT", "/vaegen-test/proxy/chunked")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for at in range(0, len(body), 65_536):
            part = body[at:at + 65_536]
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.send(b"0\r\n\r\n")
        assert conn.getresponse().status == 200
        conn.close()
        assert client.get_object(Bucket="vaegen-test", Key="proxy/chunked")["Body"].read() == body
        assert client.head_object(Bucket="vaegen-test", Key="proxy/chunked")["ContentLength"] == len(body)
        client.close()
        idle = http.client.HTTPConnection(proxy.url.removeprefix("http://"))          # a kept-alive idle client
        idle.request("HEAD", "/vaegen-test/proxy/a")
        idle.getresponse().read()
    assert {t for t in threading.enumerate() if t.is_alive()} <= threads_before     # no handler thread left
    idle.close()


def test_an_s3_read_returns_one_whole_version_while_the_key_is_replaced(faulty):
    """A reader of a key another process replaces (a manifest, a pointer) gets the old or the new bytes,
    never the start of one version cut at the length of another. GETs are delayed to widen the window."""
    proxy, through, direct = faulty
    writer_storage, reader = Storage(direct), Storage(through)
    version = lambda n: json.dumps({"n": n, "pad": "x" * (100 * (n % 5))}).encode()    # noqa: E731
    writer_storage.publish("manifest.json", version(0))
    proxy.methods = ("GET",)
    proxy.set_rates(delay_rate=1.0)
    proxy.max_delay_s = 0.02
    stop = threading.Event()

    def replace_forever() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            writer_storage.publish("manifest.json", version(n))
    writer = threading.Thread(target=replace_forever)
    writer.start()
    try:
        for _ in range(40):
            body = reader.read_bytes("manifest.json")
            record = json.loads(body)                  # a torn read is not JSON, or has the wrong padding
            assert body == version(record["n"])
    finally:
        stop.set()
        writer.join()


# -- an endpoint that accepts connections and never answers ---------------------------------------

@pytest.fixture
def silent_endpoint():
    """http://127.0.0.1:PORT of a server that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    for conn in held:
        conn.close()


def test_ls_against_a_silent_endpoint_fails_in_one_line_within_its_timeout(silent_endpoint, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    started = time.monotonic()
    code = main(["ls", "--root", "s3://vaegen-test/x", "--s3-endpoint", silent_endpoint, "--s3-timeout", "1"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("vaegen: error:") and silent_endpoint in err[0] and "--s3-timeout" in err[0], err
    assert elapsed < 30, elapsed                       # 1 s asked: far from boto3's 8 tries of 60 s


def test_a_boto3_call_to_a_silent_endpoint_starts_no_try_after_the_deadline(silent_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage = Storage(StorageConfig(root="s3://vaegen-test/x", s3_endpoint=silent_endpoint, s3_timeout_s=1))
    started = time.monotonic()
    with pytest.raises(VaegenError, match="did not answer within 1 s") as failed:
        storage.publish("a", b"x")
    assert time.monotonic() - started < 10 and silent_endpoint in str(failed.value)


@pytest.mark.parametrize("timeout", ["0", "-1", "inf", "nan"])
def test_an_s3_timeout_that_is_no_positive_number_is_refused(timeout):
    with pytest.raises(VaegenError, match="--s3-timeout"):
        StorageConfig(root="s3://b/x", s3_timeout_s=float(timeout))
