"""Model versions on storage: models/<name>/v0001/ ... and the champion pointer models/<name>/champion.json.

A version number is claimed with a create-if-absent write of `v000N/_claim` (S3: PUT If-None-Match; local:
link), so two runs finishing together can never take the same number. config.json is written last: a
version without it is incomplete and invisible to readers.

A publish that names its run (`run_id`, e.g. a Ray Train run) is idempotent: right after claiming its number
it reserves `runs/<run-id>.json` (create-if-absent) naming the version, and a rerun of the same run (after a
crash anywhere in between) finds that reservation and finishes or returns the same version, never a second one.
A crash between the claim and the reservation leaves only an unused, invisible number.

A name is bound to one dataset and image shape (`models/<name>/dataset.json`, cluster/store/name_binding.py),
written by its first publish before any claim: a version of other data under the same name is refused.

The first version of a name becomes its champion when it is published (unless its recorded score is not a finite
number), recorded as a decision like a retrain's promotion and set with the same compare-and-swap; from then on
only `vaegen retrain` changes the champion. A bare name means the champion, and a name without one is an error
that says how to get one: nothing falls back to another version behind the user's back."""
from __future__ import annotations

import json
import math
import re
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.store.name_binding import bind, binding_of_config
from cluster.store.records import RECORD_ERRORS, CorruptRecord, FieldError, fields, read_record
from cluster.store.storage import Storage
from vae_core.config import ModelConfig
from vae_core.errors import VaegenError
from vae_core.names import CONFIG_FILE, WEIGHTS_FILE, check_name

if TYPE_CHECKING:
    from vae_core.models import VAE

VERSION_RE = re.compile(r"^v(\d{4,})$")
# What may follow '@' in a model spec: v0003, 3, latest, champion (ASCII digits only).
WANT_RE = re.compile(r"v[0-9]{4,}|[0-9]{1,9}|latest|champion")
CLAIM_FILE = "_claim"
CHAMPION_FILE = "champion.json"
METRICS_FILE = "metrics.json"
RUNS_DIR = "runs"               # models/<name>/runs/<run-id>.json: the version a named run published


def parse_model_spec(spec: object) -> tuple[str, str]:
    """'name', 'name@v0003', 'name@3', 'name@latest' or 'name@champion' → (name, what follows '@' or '');
    anything else is one line naming the accepted forms."""
    if not isinstance(spec, str):
        raise VaegenError(f"--model={spec!r} must be a string: name[@v0003|@3|@latest|@champion]")
    name, at, want = spec.partition("@")
    check_name(name, "--model")
    if at and not WANT_RE.fullmatch(want):
        raise VaegenError(f"--model={spec!r}: the version after '@' must be v0003, 3, latest or champion")
    return name, want


# What readers use of each record a model keeps, by kind (records.fields): a field here of another kind makes the
# record corrupt; other fields pass (a newer writer's). Optional fields are those some writer leaves out: a
# version published without a test split has no test_loss, a name's first champion no score.
CHAMPION_OPTIONAL = {"metric": (str, None), "value": ("loss", None), "promoted_at": str, "decision": str}
CONFIG_OPTIONAL = {"format_version": int, "vaegen_version": str, "weights_sha256": str, "train_job": dict,
                   "dataset_manifest_sha256": str}
MODEL_OPTIONAL = {"arch": str, "image_shape": ("ints", None), "hidden_dim": "count", "latent_dim": "count",
                  "num_classes": "count"}
METRICS_OPTIONAL = {"test_loss": "loss", "best_val_loss": "loss", "best_epoch": ("count", None),
                    "epochs_run": "count", "resumed_at_epochs": "ints", "stopped_early": bool, "history": list,
                    "evaluation": dict}
EPOCH_FIELDS = {"epoch": "count", "loss": "loss", "val_loss": "loss"}          # what the loss curves draw
DECISION_OPTIONAL = {"model": str, "rule": str, "reason": str, "metric": (str, None), "decided_at": str,
                     "run_id": str, "lost_race": bool, "champion": dict, "challenger": dict}
SIDE_OPTIONAL = {"version": (str, None), "metric": ("loss", str, None), "load_error": (str, None)}


def version_record(record) -> dict:
    """A record that names a version (v0001, ...): a run's reservation, and the start of champion.json."""
    fields(record, {"version": str})
    if not VERSION_RE.match(record["version"]):
        raise FieldError("field 'version' is not a version name (v0001, v0002, ...)")
    return record


def champion_record(record) -> dict:
    """champion.json: it names a version, and its score fields are of their kinds."""
    return fields(version_record(record), {}, CHAMPION_OPTIONAL)


def config_record(record) -> dict:
    """A version's config.json, as far as readers (ls, show) look into it."""
    fields(record, {"model": dict}, CONFIG_OPTIONAL)
    fields(record["model"], {}, MODEL_OPTIONAL)
    fields(record.get("train_job", {}), {}, {"dataset": str})        # what `ls` shows a version was trained on
    return record


def metrics_record(record) -> dict:
    """A version's metrics.json: the scores ls, show and retrain read, and each epoch the curves draw."""
    fields(record, {}, METRICS_OPTIONAL)
    fields(record.get("evaluation", {}), {}, {"nll": "loss"})         # `vaegen evaluate`'s, shown by `ls`
    for epoch in record.get("history", []):
        fields(epoch, EPOCH_FIELDS)
    return record


def decision_record(record) -> dict:
    """A decision record: what was decided and, for each side, the version and its score."""
    fields(record, {"decision": str}, DECISION_OPTIONAL)
    for side in ("champion", "challenger"):
        if side in record:
            fields(record[side], {}, SIDE_OPTIONAL)
    return record


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

    def is_complete(self, name: str, version: str) -> bool:
        return self.storage.exists(self.key(name, version, CONFIG_FILE))

    def publish(self, name: str, files: Mapping[str, bytes], *, run_id: str | None = None) -> ModelRef:
        """Claim the next free version number, write every file, config.json last. With `run_id`, the run's
        version: the one it published (or began to publish) before, else a new one reserved for it. The name must
        be bound to the dataset and image shape config.json names (name_binding.py), or be new."""
        if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
            raise ValueError("a model version needs config.json and the weights")
        check_name(name, "--name")
        bind(self.storage, name, binding_of_config(json.loads(files[CONFIG_FILE])))   # before any claim
        if run_id is None:
            return self._crowned_if_first(self._write_version(name, self._claim_next(name, None), files), files)
        check_name(run_id, "--run-id")
        version = self.published_by(name, run_id)
        if version is None:
            version = self._claim_next(name, run_id)
            reservation = _json_bytes({"run_id": run_id, "version": version})
            if not self.storage.publish(self._run_key(name, run_id), reservation, if_absent=True):
                # Another driver of the same run reserved first: ours stays an unused, invisible number.
                version = self.published_by(name, run_id)
                if not self.is_complete(name, version):
                    raise VaegenError(f"another driver of run {run_id!r} is publishing it as {name}@{version}; "
                                      f"rerun with --run-id {run_id} once it has ended")
                return self._crowned_if_first(ModelRef(name, version), files)
        elif self.is_complete(name, version):
            # A rerun after the publish: nothing to write, but a crash may have come before the crowning.
            return self._crowned_if_first(ModelRef(name, version), files)
        # A new version, or a rerun after a crash mid-publish: finish it.
        return self._crowned_if_first(self._write_version(name, version, files), files)

    def _crowned_if_first(self, ref: ModelRef, files: Mapping[str, bytes]) -> ModelRef:
        crown_first_version(self, ref, files.get(METRICS_FILE))
        return ref

    def published_by(self, name: str, run_id: str) -> str | None:
        """The version run `run_id` reserved (complete or not), or None."""
        key = self._run_key(name, run_id)
        if not self.storage.exists(key):
            return None
        fix = (f"delete it if run {run_id!r} never published (its next rerun then publishes a new version), or "
               f"write {{\"version\": \"v000N\"}} naming the version it published")
        return read_record(self.storage, key, fix, version_record)["version"]

    def _run_key(self, name: str, run_id: str) -> str:
        return self.key(name, RUNS_DIR, f"{run_id}.json")

    def _claim_next(self, name: str, run_id: str | None) -> str:
        number = max(self._claimed_numbers(name), default=0) + 1
        claim = json.dumps({"host": socket.gethostname(), "at": time.time(), "run_id": run_id}).encode()
        while not self.storage.publish(self.key(name, version_name(number), CLAIM_FILE), claim, if_absent=True):
            number += 1                                          # lost a race: take the next one
        return version_name(number)

    def _write_version(self, name: str, version: str, files: Mapping[str, bytes]) -> ModelRef:
        for fname, data in files.items():
            if fname != CONFIG_FILE:
                self.storage.publish(self.key(name, version, fname), data)
        self.storage.publish(self.key(name, version, CONFIG_FILE), files[CONFIG_FILE])
        return ModelRef(name, version)

    def champion(self, name: str) -> dict | None:
        """champion.json ({"version": ..., ...}) or None when there is none; a corrupt pointer is one line
        naming the file and the fix."""
        key = self.key(name, CHAMPION_FILE)
        if not self.storage.exists(key):
            return None
        fix = (f"delete it (the next `vaegen retrain --name {name}` then picks a champion) or write "
               f"{{\"version\": \"v000N\"}} into it")
        return read_record(self.storage, key, fix, champion_record)

    def resolve(self, spec: str) -> ModelRef:
        """'name' and 'name@champion' (the champion: an error when the name has none), 'name@latest' (the newest
        version), 'name@v0003' or 'name@3'."""
        name, want = parse_model_spec(spec)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise VaegenError(f"no model named {name!r} in {self.storage.uri} (models there: {known})")
        if want in ("", "champion"):
            champ = self.champion(name)
            if champ:
                return ModelRef(name, champ["version"])
            said = f"--model {spec}" + (" (a bare name means the champion)" if not want else "")
            raise VaegenError(f"{said}: model {name!r} has no champion (its first version was not made one: "
                              f"see models/{name}/decisions/); run `vaegen retrain --name {name}` to pick one, or "
                              f"name a version: {name}@latest ({versions[-1]}) or {name}@v0001")
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
            from vae_core.checkpoint import load_checkpoint  # torch, on first load: `vaegen ls` needs none
            model, config = load_checkpoint(files, expected)
        except VaegenError as e:
            raise VaegenError(f"{ref}: {e}") from None
        return LoadedModel(ref, model, config, config["weights_sha256"])

    def metrics(self, ref: ModelRef) -> dict:
        return read_record(self.storage, self.key(ref.name, ref.version, METRICS_FILE),
                           f"retrain to publish a new version, or delete {ref} if it is unusable", metrics_record)

    def config(self, ref: ModelRef) -> dict:
        """config.json as readers see it; loading the model checks it further (load_checkpoint)."""
        return read_record(self.storage, self.key(ref.name, ref.version, CONFIG_FILE),
                           "the version cannot be loaded: publish it again, or show another version", config_record)


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
    """Every decision record of a model, oldest first; an unreadable one is {"file": uri, "corrupt": why}."""
    found = []
    for entry in registry.storage.list(registry.key(name, DECISIONS_DIR)):
        if entry.key.endswith(".json"):
            try:
                found.append(read_record(registry.storage, entry.key, "", decision_record))
            except CorruptRecord as e:
                found.append({"file": registry.storage.uri_of(entry.key), "corrupt": str(e).rstrip(": ")})
    return found


CORRUPT_POINTER = "<corrupt champion.json>"     # what a pointer that does not parse "names", for the swap


def swap_champion(registry: Registry, name: str, pointer: Mapping, expected_version: str | None) -> bool:
    """Point champion.json at pointer["version"] only if it still names `expected_version` (None: no champion
    yet; CORRUPT_POINTER: still unreadable): a compare-and-swap, one whole-object write, so readers never see
    half a pointer. False means another run changed the champion first and nothing was written."""
    # A pointer that already names this version changes no champion, so that swap is allowed too: a retrain whose
    # challenger was crowned as the name's first version at its publish still records its promotion.
    return registry.storage.compare_and_swap(
        registry.key(name, CHAMPION_FILE), _json_bytes(pointer),
        lambda current: _pointed_version(current) in (expected_version, pointer["version"]))


def _pointed_version(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return champion_record(json.loads(data))["version"]
    except RECORD_ERRORS:                   # what Registry.champion refuses is what a swap sees as corrupt
        return CORRUPT_POINTER


# -- the first version of a name is its champion ---------------------------------------------------------------
FIRST_VERSION_RULE = "first-version"


def recorded_score(metrics: bytes | None) -> tuple[str | None, float | None]:
    """(which, value) of the score a training run recorded in metrics.json: the test split's loss, else the
    best validation loss; (None, None) when there is none (a version published without metrics)."""
    if not metrics:
        return None, None
    try:
        record = json.loads(metrics)
    except ValueError:
        return None, None
    for key in ("test_loss", "best_val_loss"):
        if isinstance(record, dict) and isinstance(record.get(key), (int, float)):
            return key, float(record[key])
    return None, None


def crown_first_version(registry: Registry, ref: ModelRef, metrics: bytes | None) -> bool:
    """Make `ref` its name's champion if it is the name's first complete version and the name has no champion.
    Written like a retrain's promotion: a "pending" decision record, the compare-and-swap from "no champion",
    then the final record ("promote", or "keep" when another first version won the swap). A version whose
    recorded score is not a finite number is not crowned (its record says so). True when this call crowned it."""
    name, version = ref.name, ref.version
    if registry.storage.exists(registry.key(name, CHAMPION_FILE)):
        return False                  # a champion (or a corrupt pointer, retrain's to replace) exists already
    if any(int(v[1:]) < int(version[1:]) for v in registry.versions(name)):
        return False                  # not the first: a name without a champion keeps waiting for retrain
    which, value = recorded_score(metrics)
    finite = value is None or math.isfinite(value)
    at, run_id = time.time(), uuid.uuid4().hex[:8]
    decided_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    reason = (f"{version} is the first version of {name!r}: its champion until a retrain promotes a better one"
              if finite else f"{version} is the first version of {name!r} but its {which} is {value} (not a finite "
                                 "number): not made champion")
    record = {"model": name, "decision": "pending" if finite else "keep", "rule": FIRST_VERSION_RULE,
              "reason": reason, "metric": which, "decided_at": decided_at, "run_id": run_id,
              "host": socket.gethostname(),
              "champion": {"version": None, "metric": None, "load_error": None},
              "challenger": {"version": version, "metric": value if value is None or finite else str(value)}}
    key = record_decision(registry, name, record, run_id, at)
    if not finite:
        return False
    pointer = {"version": version, "metric": which, "value": value, "promoted_at": decided_at,
               "decision": key.rsplit("/", 1)[-1]}
    if swap_champion(registry, name, pointer, expected_version=None):
        rewrite_decision(registry, key, {**record, "decision": "promote"})
        return True
    rewrite_decision(registry, key, {**record, "decision": "keep", "lost_race": True,
                                     "reason": f"{version} was published as a first version of {name!r}, but "
                                               "another version became its champion first"})
    return False
