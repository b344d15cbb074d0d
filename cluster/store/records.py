"""The one way vaegen reads a JSON record it wrote (a manifest, a receipt, a run record, champion.json, ...) and
the one error for a record that is not what vaegen writes: `CorruptRecord`, one line naming the file, what is
wrong and the fix. Readers that list many entries (`vaegen ls`) catch it, mark that entry corrupt and go on."""
from __future__ import annotations

import json
from collections.abc import Callable

from cluster.store.storage import Storage
from vae_core.errors import VaegenError

# What a record of the wrong shape raises when parsed: a missing field (KeyError), a field of the wrong type
# (TypeError, AttributeError on a list where a dict belongs, ValueError from int("many")), an index off the end.
RECORD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError)


class CorruptRecord(VaegenError, ValueError):
    """A record a reader needs is unreadable. A ValueError too, so a parse that reads a nested record reports
    the inner file, not the outer one."""

    def __init__(self, uri: str, problem: str, fix: str) -> None:
        super().__init__(f"{uri} {problem}: {fix}")
        self.uri, self.problem, self.fix = uri, problem, fix


class OtherFormat(ValueError):
    """A record written in another format version (an older vaegen's): refused whole, never half-read."""


def problem_of(error: Exception) -> str:
    """What is wrong with a record, from what its parse raised."""
    if isinstance(error, OtherFormat):
        return f"is in another format ({error})"
    if isinstance(error, KeyError):
        return f"is corrupt (no field {error.args[0]!r})" if error.args else "is corrupt (a field is missing)"
    if isinstance(error, (TypeError, AttributeError, IndexError)):
        return "is corrupt (a field has the wrong type)"
    return "is corrupt (not the fields vaegen writes)"


def as_object(record) -> dict:
    if not isinstance(record, dict):
        raise TypeError("not a JSON object")
    return record


def fields_checked(check: Callable[[dict], bool]) -> Callable[[object], dict]:
    """A parse that accepts a JSON object for which `check` holds."""
    def parse(record) -> dict:
        if not check(as_object(record)):
            raise ValueError("not the fields vaegen writes")
        return record
    return parse


def parse_record(body: bytes, uri: str, fix: str, parse: Callable = lambda record: record):
    """`parse(json of body)`, or a CorruptRecord naming `uri` when the bytes or their fields are not what vaegen
    writes (a truncated write, a hand edit, another tool)."""
    try:
        record = json.loads(body)
    except ValueError:
        problem = "is corrupt (empty)" if not body.strip() else "is corrupt (not valid JSON; truncated or edited?)"
        raise CorruptRecord(uri, problem, fix) from None
    try:
        return parse(record)
    except CorruptRecord:
        raise
    except RECORD_ERRORS as e:
        raise CorruptRecord(uri, problem_of(e), fix) from None


def read_record(storage: Storage, key: str, fix: str, parse: Callable = lambda record: record):
    return parse_record(storage.read_bytes(key), storage.uri_of(key), fix, parse)
