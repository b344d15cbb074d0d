"""Model versions on storage: models/<name>/v0001/ ... and the champion pointer models/<name>/champion.json.

A version number is claimed with a create-if-absent write of `v000N/_claim` (S3: PUT If-None-Match; local:
link), so two runs finishing together can never take the same number. config.json is written last: a
version without it is incomplete and invisible to readers."""
from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from vae_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint
from vae_core.config import ModelConfig
from vae_core.errors import VaegenError
from vae_core.models import VAE

from .storage import Storage

VERSION_RE = re.compile(r"^v(\d{4,})$")
CLAIM_FILE = "_claim"
CHAMPION_FILE = "champion.json"


def version_name(number: int) -> str:
    return f"v{number:04d}"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str            # v0001 ...

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class LoadedModel:
    ref: ModelRef
    model: VAE
    config: dict            # config.json as read (with "model" re-typed)
    weights_sha256: str


class Registry:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def key(self, name: str, *parts: str) -> str:
        return "/".join(("models", name, *parts))

    def names(self) -> list[str]:
        return self.storage.list_dirs("models")

    def versions(self, name: str) -> list[str]:
        """Complete versions (config.json present), oldest first."""
        found = [e.key.split("/")[-2] for e in self.storage.list(self.key(name), recursive=True)
                 if e.key.endswith(f"/{CONFIG_FILE}")]
        return sorted((v for v in found if VERSION_RE.match(v)), key=lambda v: int(v[1:]))

    def _claimed_numbers(self, name: str) -> list[int]:
        return [int(m.group(1)) for d in self.storage.list_dirs(self.key(name)) if (m := VERSION_RE.match(d))]

    def publish(self, name: str, files: Mapping[str, bytes]) -> ModelRef:
        """Claim the next free version number, write every file, config.json last."""
        if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
            raise ValueError("a model version needs config.json and the weights")
        number = max(self._claimed_numbers(name), default=0) + 1
        claim = json.dumps({"host": socket.gethostname(), "at": time.time()}).encode()
        while not self.storage.publish(self.key(name, version_name(number), CLAIM_FILE), claim, if_absent=True):
            number += 1                                          # lost a race: take the next one
        version = version_name(number)
        for fname, data in files.items():
            if fname != CONFIG_FILE:
                self.storage.publish(self.key(name, version, fname), data)
        self.storage.publish(self.key(name, version, CONFIG_FILE), files[CONFIG_FILE])
        return ModelRef(name, version)

    def champion(self, name: str) -> dict | None:
        key = self.key(name, CHAMPION_FILE)
        return json.loads(self.storage.read_bytes(key)) if self.storage.exists(key) else None

    def resolve(self, spec: str) -> ModelRef:
        """'name' (champion, else latest), 'name@latest', 'name@champion', 'name@v0003' or 'name@3'."""
        name, _, want = spec.partition("@")
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise VaegenError(f"no model named {name!r} in {self.storage.uri} (models there: {known})")
        if want in ("", "champion"):
            champ = self.champion(name)
            if champ:
                return ModelRef(name, champ["version"])
            if want == "champion":
                raise VaegenError(f"model {name!r} has no champion yet (run `vaegen retrain`, or name a version)")
            return ModelRef(name, versions[-1])
        if want == "latest":
            return ModelRef(name, versions[-1])
        version = version_name(int(want)) if want.isdigit() else want
        if version not in versions:
            raise VaegenError(f"model {name!r} has no version {want!r} (versions: {', '.join(versions)})")
        return ModelRef(name, version)

    def read_file(self, ref: ModelRef, fname: str) -> bytes:
        return self.storage.read_bytes(self.key(ref.name, ref.version, fname))

    def load(self, spec: str | ModelRef, expected: ModelConfig | None = None) -> LoadedModel:
        ref = spec if isinstance(spec, ModelRef) else self.resolve(spec)
        files = {f: self.read_file(ref, f) for f in (CONFIG_FILE, WEIGHTS_FILE)}
        try:
            model, config = load_checkpoint(files, expected)
        except VaegenError as e:
            raise VaegenError(f"{ref}: {e}") from None
        return LoadedModel(ref, model, config, config["weights_sha256"])

    def metrics(self, ref: ModelRef) -> dict:
        return json.loads(self.read_file(ref, "metrics.json"))


# -- the champion pointer and retraining decisions (used by `vaegen retrain`) ------------------------------
DECISIONS_DIR = "decisions"


def decision_file_name(at: float, run_id: str) -> str:
    """Sortable by time; the run id keeps two runs in the same microsecond apart."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at))
    return f"{stamp}.{int(at % 1 * 1e6):06d}Z-{run_id}.json"


def _json_bytes(record: Mapping) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode()


def record_decision(registry: Registry, name: str, record: Mapping, run_id: str, at: float) -> str:
    """Write models/<name>/decisions/<timestamp>.json in one atomic write; returns its key.
    Any failure is a VaegenError: the caller must then promote nothing."""
    key = registry.key(name, DECISIONS_DIR, decision_file_name(at, run_id))
    try:
        registry.storage.publish(key, _json_bytes(record))
    except (OSError, VaegenError) as e:
        raise VaegenError(f"cannot write the decision record {registry.storage.uri_of(key)} "
                          f"({e}); nothing was promoted") from None
    return key


def rewrite_decision(registry: Registry, key: str, record: Mapping) -> None:
    registry.storage.publish(key, _json_bytes(record))


def decisions(registry: Registry, name: str) -> list[dict]:
    """Every decision record of a model, oldest first."""
    entries = registry.storage.list(registry.key(name, DECISIONS_DIR))
    return [json.loads(registry.storage.read_bytes(e.key)) for e in entries if e.key.endswith(".json")]


def swap_champion(registry: Registry, name: str, pointer: Mapping, expected_version: str | None) -> bool:
    """Point champion.json at pointer["version"] only if it still names `expected_version` (None: no champion
    yet): a compare-and-swap, one whole-object write, so readers never see half a pointer. False means another
    run changed the champion first and nothing was written."""
    return registry.storage.compare_and_swap(
        registry.key(name, CHAMPION_FILE), _json_bytes(pointer),
        lambda current: _pointed_version(current) == expected_version)


def _pointed_version(data: bytes | None) -> str | None:
    return json.loads(data)["version"] if data is not None else None
