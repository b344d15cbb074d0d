"""The one rule for every name a user gives vaegen that becomes part of a storage key: dataset, split, model
name and version, run id, job id. A name is one path segment that cannot climb out of the root, so that
`--name ../../x` is refused where it enters, before anything is read or written (storage.py refuses a bad
key again as the last line of defence)."""
from __future__ import annotations

import re

from .errors import VaegenError

# A model version's two files (vae_core/checkpoint.py writes and reads them).
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_NAME = 128
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
NAME_RULE = f"1-{MAX_NAME} characters from letters, digits, '.', '_' and '-', starting with a letter or digit"
# What may follow '@' in a model spec: a version folder (v0001), its number, or a pointer. ASCII digits only,
# and at most 9 of them, so int() of it is cheap and exact (str.isdigit also accepts '²').
VERSION_RE = re.compile(r"v[0-9]{4,9}|[0-9]{1,9}|latest|champion")
VERSION_RULE = "v0001, a number, 'latest' or 'champion'"


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None and ".." not in value


def check_name(value: object, what: str) -> str:
    """`value` if it is a safe name, else a one-line VaegenError naming the flag (`what`, e.g. '--name')."""
    if not is_valid_name(value):
        raise VaegenError(f"{what}={value!r} is not a valid name: {NAME_RULE}, and no '..'")
    return value


def check_model_spec(spec: object, what: str = "--model") -> str:
    """`spec` if it is `name` or `name@version` with a safe name and a known kind of version, else a one-line
    VaegenError naming the flag. The registry turns the version part into a version folder, so it is checked
    as strictly as the name."""
    if not isinstance(spec, str) or not spec:
        raise VaegenError(f"{what} must name a model: name[@version|@latest|@champion], got {spec!r}")
    name, at, version = spec.partition("@")
    if not is_valid_name(name):
        raise VaegenError(f"{what}={spec!r}: model name {name!r} is not a valid name: {NAME_RULE}, and no '..'")
    if at and VERSION_RE.fullmatch(version) is None:
        raise VaegenError(f"{what}={spec!r}: version {version!r} must be {VERSION_RULE}")
    return spec


# The --model help of every verb that reads a model version: a bare name is the champion, never "the latest".
MODEL_SPEC_HELP = ("name[@v0003|@latest|@champion]; a bare name means the champion (the first version until "
                   "vaegen retrain promotes another)")
