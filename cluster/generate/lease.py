"""A per-job lease: one object, the job's `_lease.json` (cluster/store/layout.py) = {owner, expires_at}, that lets one
driver of a generation job work at a time while the others wait. It is an efficiency and UX layer only:
correctness never depends on it (leases expire, clocks drift, a stalled driver can outlive its lease), it comes
from idempotent shards (cluster/generate/shards.py) and the sha-checked commit (cluster/generate/commit.py).

- Taken with a create-if-absent write (S3: PUT If-None-Match: *; local: link), so two drivers cannot both
  create it.
- An expired (or unreadable) lease is taken over with a compare-and-swap that accepts exactly the bytes that were
  read, so of two drivers taking over the same dead lease only one wins.
- Renewed by a daemon thread every ttl/3 with a compare-and-swap that accepts only a lease naming this owner: a
  driver whose lease was taken over (it stalled past the expiry) stops renewing and carries on unprotected.
- Released by a compare-and-swap to an already-expired lease naming this owner, never by a delete: a release can
  then never remove someone else's lease.
- Expiry compares wall clocks of different hosts: the TTL (VAEGEN_LEASE_TTL_S, default 60 s) must stay well
  above their skew. A killed driver's lease blocks the job for at most one TTL.
- A lease that is not what a driver writes (unreadable, or expiring later than its TTL, the longest TTL allowed,
  plus CLOCK_SLACK_S from now: no driver renews that far ahead) is treated as expired: nothing waits on it."""
from __future__ import annotations

import json
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable

from cluster.store.records import RECORD_ERRORS, fields, parse_record
from cluster.store.storage import Storage
from vae_core.errors import VaegenError

LEASE_TTL_ENV = "VAEGEN_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0


TTL_BOUNDS_S = (1.0, 86_400.0)     # under a second every renewal races its expiry; over a day a dead lease blocks
CLOCK_SLACK_S = 30.0               # how far ahead of this host's clock another host's may run


def lease_ttl() -> float:
    """The lease TTL from $VAEGEN_LEASE_TTL_S (default 60 s), or a one-line VaegenError naming the variable."""
    text = os.environ.get(LEASE_TTL_ENV) or ""
    if not text.strip():
        return DEFAULT_TTL_S
    low, high = TTL_BOUNDS_S
    try:
        ttl = float(text)
    except ValueError:
        ttl = math.nan
    if not low <= ttl <= high:                      # nan and inf fail this too
        raise VaegenError(f"{LEASE_TTL_ENV}={text!r} must be a number of seconds in {low:g}..{high:g}")
    return ttl


def _parse(body: bytes | None, ttl_s: float) -> dict | None:
    """The lease in `body`, or None when there is none or it is not what a driver writes (see the docstring);
    ttl_s: the TTL of a lease that does not state its own."""
    if body is None:
        return None
    try:
        lease = parse_record(body, "_lease.json", "taken over",
                             lambda r: fields(r, {"owner": str, "expires_at": float}, {"ttl_s": float}))
    except RECORD_ERRORS:
        return None
    ttl = lease.get("ttl_s", ttl_s)
    if not 0 < ttl <= TTL_BOUNDS_S[1]:
        return None
    latest = time.time() + ttl + CLOCK_SLACK_S
    return lease if lease["expires_at"] <= latest else None


class JobLease:
    def __init__(self, storage: Storage, key: str, ttl_s: float | None = None) -> None:
        self.storage, self.key = storage, key
        self.ttl = ttl_s if ttl_s is not None else lease_ttl()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self, expires_at: float) -> bytes:
        return json.dumps({"owner": self.owner, "expires_at": expires_at, "ttl_s": self.ttl}).encode()

    def _mine(self, current: bytes | None) -> bool:
        lease = _parse(current, self.ttl)
        return lease is not None and lease.get("owner") == self.owner

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free or expired: None when taken, else the lease that holds the job ({} when
        it changed while we looked: look again)."""
        if not self.storage.publish(self.key, self._body(time.time() + self.ttl), if_absent=True):
            seen = self.storage.read_bytes(self.key) if self.storage.exists(self.key) else None
            lease = _parse(seen, self.ttl)
            if lease is not None and lease["expires_at"] > time.time() and lease.get("owner") != self.owner:
                return lease
            if seen is None or not self.storage.compare_and_swap(
                    self.key, self._body(time.time() + self.ttl), lambda current: current == seen):
                return {}
        self.held = True
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="vaegen-lease", daemon=True)
        self._renewer.start()
        return None

    def acquire(self, on_wait: Callable[[dict], None] | None = None) -> None:
        """Take the lease, waiting while another driver holds a live one; on_wait(lease) is called once."""
        waited = False
        while (holder := self.try_acquire()) is not None:
            if holder and not waited and on_wait is not None:
                on_wait(holder)
                waited = True
            time.sleep(min(2.0, self.ttl / 4) * (0.5 + random.random()))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.storage.compare_and_swap(self.key, self._body(time.time() + self.ttl), self._mine):
                    self.held = False                     # taken over after we stalled: carry on without it
                    return
            except Exception:                             # storage hiccup: the next tick tries again
                continue

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.ttl)
        if self.held:
            self.held = False
            try:
                self.storage.compare_and_swap(self.key, self._body(0.0), self._mine)
            except Exception:                             # it expires by itself
                pass

    def __enter__(self) -> "JobLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
