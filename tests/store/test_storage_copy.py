"""Storage.copy: on S3 one server-side CopyObject (no byte through the client), retried like every S3 call;
locally a publish of the source's bytes."""
import uuid

import pytest
from s3_fault_proxy import FaultProxy

from cluster.store.storage import Storage
from vae_core.config import StorageConfig

BODY = bytes(range(256)) * 4096                          # 1 MiB


@pytest.mark.s3
def test_an_s3_copy_reads_no_byte_through_the_client_and_survives_faults(s3_server):
    prefix = uuid.uuid4().hex[:12]
    direct = Storage(StorageConfig(root=f"s3://vaegen-test/{prefix}", s3_endpoint=s3_server))
    direct.publish("a/source.parquet", BODY)
    # Every GET through this proxy fails: a copy that needed the bytes here could not finish.
    with FaultProxy(s3_server, seed=1, error_rate=1.0, reset_rate=0, delay_rate=0, methods=("GET",)) as proxy:
        Storage(StorageConfig(root=f"s3://vaegen-test/{prefix}", s3_endpoint=proxy.url)).copy(
            "a/source.parquet", "b/view.parquet")
    assert direct.read_bytes("b/view.parquet") == BODY
    # Half of the copies fail with S3's retryable errors or resets: the bounded retries land it.
    with FaultProxy(s3_server, seed=4, error_rate=0.4, reset_rate=0.1, delay_rate=0, methods=("PUT",)) as proxy:
        faulty = Storage(StorageConfig(root=f"s3://vaegen-test/{prefix}", s3_endpoint=proxy.url))
        for i in range(4):
            faulty.copy("a/source.parquet", f"c/view-{i}.parquet")
        assert proxy.counts["passed"] >= 4 and sum(proxy.counts.values()) > proxy.counts["passed"]
    assert all(direct.read_bytes(f"c/view-{i}.parquet") == BODY for i in range(4))


def test_a_local_copy_holds_the_source_bytes(tmp_path):
    storage = Storage(StorageConfig(root=str(tmp_path / "root")))
    storage.publish("a/source", BODY)
    storage.copy("a/source", "b/copy")
    assert storage.read_bytes("b/copy") == BODY and storage.list("a") != []
