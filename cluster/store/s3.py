"""S3's side of Storage: the endpoint and its clients, and every boto3 call retried a bounded number of times.

Every wait on S3 ends, and all of its bounds are here, derived from one number: --s3-timeout (T, default 60 s).
A boto3 try waits at most T for each answer; _s3_call starts no new try once T has passed since its first, so a
call that meets an endpoint that never answers fails after about T (one that is merely slow, under 2 T). pyarrow's
client takes no deadline: its tries are capped so that their per-try waits add up to T at most.

S3 is allowed to fail transiently (409 ConditionalRequestConflict on concurrent conditional PUTs, 500, 503,
SlowDown, a connection reset mid-request): every boto3 call is retried with capped exponential backoff and full
jitter (S3Requests._s3_call), and pyarrow's own client retries reads and listings. A conditional PUT that may
have landed on an earlier try is read back before a 412 is believed."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vae_core.config import StorageConfig
from vae_core.errors import VaegenError

DEFAULT_REGION = "us-east-1"
# How pyarrow (aws-sdk-cpp) and S3 name a refusal of the caller's credentials in an error's text.
REFUSED_CREDENTIALS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId",
                       "SignatureDoesNotMatch", "AccessDenied")
S3_ATTEMPTS = 8                 # boto3 calls: at most this many tries in all (then the error is the user's)
S3_BACKOFF_BASE_S = 0.05        # backoff before try n+1: uniform(0, min(cap, base * 2**n)), "full jitter"
S3_BACKOFF_CAP_S = 2.0
ARROW_S3_RETRIES = 6            # pyarrow (aws-sdk-cpp) reads and listings: retries after the first try, at most
# How pyarrow (curl) says that its tries all went unanswered past their timeout.
ARROW_TIMED_OUT = "curlCode: 28"
CONNECT_TIMEOUT_S = 2.0         # a TCP connection not made in this long (or T, if shorter) is a dead endpoint
# S3 asks the client to retry these; 409 ConditionalRequestConflict means a concurrent conditional write to the
# same key was in progress, and the retry is then decided like any other conditional write (412 or success).
RETRYABLE_CODES = frozenset({"ConditionalRequestConflict", "OperationAborted", "InternalError", "ServiceUnavailable",
                             "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException"})
RETRYABLE_STATUSES = frozenset({"500", "502", "503", "504"})


@dataclass(frozen=True)


class S3Endpoint:
    url: str | None   # e.g. http://127.0.0.1:9000; None = AWS itself
    region: str
    timeout_s: float = 60.0   # --s3-timeout: see the module's docstring

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> "S3Endpoint":
        url = cfg.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if url and urlparse(url).scheme not in ("http", "https"):
            raise VaegenError(f"--s3-endpoint={url!r} must start with http:// or https://")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        return cls(url.rstrip("/") if url else None, region, cfg.s3_timeout_s)

    @property
    def name(self) -> str:
        return self.url or "AWS"

    def unanswered(self) -> str:
        """The one line for an endpoint that stayed silent past the deadline."""
        return (f"the S3 endpoint {self.name} did not answer within {self.timeout_s:g} s; check it, or wait longer "
                "with --s3-timeout")

    def arrow_tries(self) -> tuple[int, float]:
        """(retries, per-try timeout) for pyarrow: the SDK waits whole seconds (at least 1) per try, so a short T
        gets fewer tries rather than more waiting than T."""
        retries = max(0, min(ARROW_S3_RETRIES, int(self.timeout_s) - 1))
        return retries, max(1.0, self.timeout_s / (retries + 1))

    def arrow_fs(self) -> pafs.S3FileSystem:
        _skip_instance_metadata()
        # The default strategy (exponential backoff, no retry quota): the standard one's token bucket could run
        # dry in a long-lived worker under sustained 503s and then stop retrying at all.
        retries, per_try = self.arrow_tries()
        kwargs: dict = {"region": self.region, "connect_timeout": min(CONNECT_TIMEOUT_S, per_try),
                        "request_timeout": per_try,
                        "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=retries)}
        if self.url:
            parsed = urlparse(self.url)
            kwargs.update(scheme=parsed.scheme, endpoint_override=parsed.netloc)
        return pafs.S3FileSystem(**kwargs)

    def boto3_client(self):
        _skip_instance_metadata()
        import boto3
        from botocore.config import Config
        # Checksums only where an operation requires one: a PUT then carries no CRC32 (botocore's default), and
        # without a checksum header botocore signs the body's sha256 into the request instead (over https too),
        # which the server checks: the same end-to-end guarantee, one hash on each side instead of two.
        # botocore's own retries are off: Storage._s3_call retries every call itself, because botocore does not
        # retry 409 and because a conditional PUT must know whether an earlier try may have landed.
        config = Config(connect_timeout=min(CONNECT_TIMEOUT_S, self.timeout_s), read_timeout=self.timeout_s, retries={"total_max_attempts": 1, "mode": "standard"},
                        request_checksum_calculation="when_required")
        return boto3.client("s3", endpoint_url=self.url, region_name=self.region, config=config)


def _skip_instance_metadata() -> None:
    """pyarrow's and boto3's credential chains probe the EC2 metadata service when no keys are set: seconds lost.
    Neither takes a setting for it but this variable, set (unless the user set it) when an S3 client is made."""
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


class S3Requests:
    """What Storage does on S3 with boto3 (it provides bucket, endpoint, s3_client, object_key and _jitter)."""

    def _compare_and_swap_s3(self, key: str, data: bytes, accept: Callable[[bytes | None], bool]) -> bool:
        from botocore.exceptions import ClientError
        object_key = self.object_key(key)
        etag, body = self._get(key)
        if not accept(body):
            return False
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        uncertain: list[str] = []
        try:
            self._s3_call(lambda c: c.put_object(Bucket=self.bucket, Key=object_key, Body=data, **condition),
                          what=key, passthrough=("PreconditionFailed", "412", "NoSuchKey", "404"),
                          uncertain=uncertain)
        except ClientError:                            # someone else wrote (or deleted) between our read and write
            return self._landed_after_all(key, data, uncertain)
        return True

    def _put(self, key: str, data: bytes, if_absent: bool) -> bool:
        from botocore.exceptions import ClientError
        object_key = self.object_key(key)
        kwargs = {"IfNoneMatch": "*"} if if_absent else {}
        uncertain: list[str] = []
        try:
            self._s3_call(lambda c: c.put_object(Bucket=self.bucket, Key=object_key, Body=data, **kwargs),
                          what=key, passthrough=("PreconditionFailed", "412"), uncertain=uncertain)
        except ClientError:                            # 412: an object is there
            return self._landed_after_all(key, data, uncertain)
        return True

    def _copy(self, source: str, dest: str) -> None:
        """One CopyObject: S3 copies the object itself (no byte passes through here), atomically, as a PUT does."""
        copy_source = {"Bucket": self.bucket, "Key": self.object_key(source)}
        self._s3_call(lambda c: c.copy_object(Bucket=self.bucket, Key=self.object_key(dest), CopySource=copy_source),
                      what=dest)

    def _get(self, key: str) -> tuple[str | None, bytes | None]:
        """(ETag, bytes) of an S3 object, (None, None) if absent; the body read is retried with the request."""
        from botocore.exceptions import ClientError
        object_key = self.object_key(key) if key else self.prefix         # "": the root itself
        if not object_key:
            return None, None

        def get(client):
            response = client.get_object(Bucket=self.bucket, Key=object_key)
            return response["ETag"], response["Body"].read()
        try:
            return self._s3_call(get, what=key, passthrough=("NoSuchKey", "404"))
        except ClientError:
            return None, None

    def _landed_after_all(self, key: str, data: bytes, uncertain: list[str]) -> bool:
        """After a 412: did an earlier try of ours (one that may have taken effect) write `data` there?"""
        return bool(uncertain) and self._get(key)[1] == data

    def _s3_call(self, call, *, what: str, passthrough: tuple[str, ...] = (), uncertain: list[str] | None = None):
        """call(self.s3_client), tried up to S3_ATTEMPTS times with capped, jittered exponential backoff while S3
        answers a retryable error or the connection fails mid-request, and no new try once --s3-timeout has passed. A ClientError whose code or status is in
        `passthrough` is raised as it is; any other failure becomes one VaegenError line. `uncertain` collects a
        note for each failed try that may have taken effect (sent, then reset, timed out or answered 5xx)."""
        import http.client

        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            ReadTimeoutError,
        )
        from urllib3.exceptions import HTTPError as URLLib3Error
        uncertain = [] if uncertain is None else uncertain
        deadline = time.monotonic() + self.endpoint.timeout_s
        for attempt in range(S3_ATTEMPTS):
            try:
                return call(self.s3_client)
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
                if (code in RETRYABLE_CODES or status in RETRYABLE_STATUSES) and self._again(attempt, deadline):
                    if code != "ConditionalRequestConflict" and status[:1] == "5":
                        uncertain.append(code or status)
                    continue
                if code in passthrough or status in passthrough:
                    raise
                raise VaegenError(self._explain(code or status, what)) from None
            except NoCredentialsError:
                raise VaegenError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            except (EndpointConnectionError, ConnectTimeoutError):
                # Nothing was sent. On the first try that means a wrong or dead endpoint: say so at once.
                if attempt == 0 or not self._again(attempt, deadline):
                    hint = "" if self.endpoint.url else (" (no --s3-endpoint or AWS_ENDPOINT_URL given: is the root "
                                                         "on another S3?)")
                    raise VaegenError(f"cannot reach the S3 endpoint {self.endpoint.name}{hint}") from None
            except (HTTPClientError, IncompleteReadError, URLLib3Error, http.client.HTTPException,
                    ConnectionError) as e:           # reset, closed or timed out mid-request or mid-response
                uncertain.append(type(e).__name__)
                if not self._again(attempt, deadline):
                    if isinstance(e, ReadTimeoutError):
                        raise VaegenError(self.endpoint.unanswered()) from None
                    message = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise VaegenError(f"S3 request for {what} failed {attempt + 1} times: {message}") from None
            except BotoCoreError as e:
                raise VaegenError(f"S3 request for {what} failed: {e}") from None
        raise AssertionError("unreachable: the last try returns or raises")

    def _again(self, attempt: int, deadline: float) -> bool:
        """After failed try number `attempt`: wait out the backoff and say True, or False when no try is left
        (S3_ATTEMPTS made, or the wait would end past the deadline)."""
        if attempt == S3_ATTEMPTS - 1:
            return False
        pause = self._jitter.uniform(0, min(S3_BACKOFF_CAP_S, S3_BACKOFF_BASE_S * 2 ** attempt))
        if time.monotonic() + pause >= deadline:
            return False
        time.sleep(pause)
        return True

    def _explain(self, code: str, what: str) -> str:
        where = f"s3://{self.bucket} at {self.endpoint.name}"
        if code in ("NoSuchBucket", "404"):
            return f"bucket {self.bucket!r} does not exist at {self.endpoint.name}"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"S3 credentials were refused by {where} ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        return f"S3 error {code} on {what} in {where}"
