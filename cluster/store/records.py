"""The one way vaegen reads a JSON record it wrote (a manifest, a receipt, a run record, champion.json, ...) and
the one error for a record that is not what vaegen writes: `CorruptRecord`, one line naming the file, what is
wrong and the fix. Readers that list many entries (`vaegen ls`) catch it, mark that entry corrupt and go on."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable

from cluster.store.storage import Storage
from vae_core.errors import VaegenError

# What a record of the wrong shape raises when parsed: a missing field (KeyError), a field of the wrong type
# (TypeError, AttributeError on a list where a dict belongs, ValueError from int("many")), an index off the end.
RECORD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, IndexError)
# The largest number a record's field may hold: JSON's exact integers (and far beyond any time stamp, count or
# metric vaegen writes), so 1e308 or 2**63 from a hand edit is refused where it is read, not overflowed later.
MAX_NUMBER = 2 ** 53


class CorruptRecord(VaegenError, ValueError):
    """A record a reader needs is unreadable. A ValueError too, so a parse that reads a nested record reports
    the inner file, not the outer one."""

    def __init__(self, uri: str, problem: str, fix: str) -> None:
        super().__init__(f"{uri} {problem}: {fix}")
        self.uri, self.problem, self.fix = uri, problem, fix

    def __reduce__(self):                # pickled across Ray (a worker's refusal): rebuilt from its three parts
        return CorruptRecord, (self.uri, self.problem, self.fix)


class OtherFormat(ValueError):
    """A record written in another format version (an older vaegen's): refused whole, never half-read."""


class FieldError(ValueError):
    """A field of a record that is not what vaegen writes there; its message names the field."""


def problem_of(error: Exception) -> str:
    """What is wrong with a record, from what its parse raised."""
    if isinstance(error, OtherFormat):
        return f"is in another format ({error})"
    if isinstance(error, FieldError):
        return f"is corrupt ({error})"
    if isinstance(error, KeyError):
        return f"is corrupt (no field {error.args[0]!r})" if error.args else "is corrupt (a field is missing)"
    if isinstance(error, (TypeError, AttributeError, IndexError)):
        return "is corrupt (a field has the wrong type)"
    return "is corrupt (not the fields vaegen writes)"


def sha256_hex(data) -> str:
    """The digest every record uses to name the bytes it vouches for."""
    return hashlib.sha256(data).hexdigest()


def as_object(record) -> dict:
    if not isinstance(record, dict):
        raise TypeError("not a JSON object")
    return record


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= MAX_NUMBER)


# What a field of a record may be, by the name a schema gives it: what `fields` checks each value against.
KINDS: dict[object, tuple[str, Callable[[object], bool]]] = {
    int: ("an integer", lambda v: _is_number(v) and isinstance(v, int)),
    float: ("a number", _is_number),
    str: ("a string", lambda v: isinstance(v, str)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    dict: ("an object", lambda v: isinstance(v, dict)),
    list: ("a list", lambda v: isinstance(v, list)),
    None: ("null", lambda v: v is None),
    # A loss or score: a run that diverged records NaN or Infinity (JSON's extension), which readers show as such.
    "loss": ("a number, NaN or Infinity", lambda v: _is_number(v) or (isinstance(v, float) and not math.isfinite(v))),
    "count": ("a count (an integer >= 0)", lambda v: _is_number(v) and isinstance(v, int) and v >= 0),
    "ints": ("a list of integers", lambda v: isinstance(v, list) and all(KINDS[int][1](x) for x in v)),
    "strs": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "numbers": ("an object of numbers", lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values())),
}


def fields(record, schema: dict[str, object], optional: dict[str, object] | None = None) -> dict:
    """`record`, checked to be a JSON object whose fields in `schema` are there and of their kind (a KINDS key,
    or a tuple of them for any one: (int, None) is an integer or null), and whose fields in `optional` are of
    their kind when present. Other fields pass: a newer writer may add some. A bool is no integer or number; a
    number must be finite and at most MAX_NUMBER. Raises KeyError or FieldError (a CorruptRecord's problem)."""
    as_object(record)
    for name, kind in list(schema.items()) + [(n, k) for n, k in (optional or {}).items() if n in record]:
        value = record[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not any(KINDS[k][1](value) for k in kinds):
            raise FieldError(f"field {name!r} is not {' or '.join(KINDS[k][0] for k in kinds)}")
    return record


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
