"""The one rule for every name a user gives vaegen that becomes part of a storage key: dataset, split, model
name and version, run id, job id. A name is one path segment that cannot climb out of the root, so that
`--name ../../x` is refused where it enters, before anything is read or written (storage.py refuses a bad
key again as the last line of defence)."""
from __future__ import annotations

import re

from .errors import VaegenError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1-128 characters from letters, digits, '.', '_' and '-', starting with a letter or digit"


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None and ".." not in value


def check_name(value: object, what: str) -> str:
    """`value` if it is a safe name, else a one-line VaegenError naming the flag (`what`, e.g. '--name')."""
    if not is_valid_name(value):
        raise VaegenError(f"{what}={value!r} is not a valid name: {NAME_RULE}, and no '..'")
    return value
