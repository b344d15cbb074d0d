"""What a model name stands for: `models/<name>/dataset.json` binds the name to one dataset and image shape, so
that `--model <name>` (its champion, its versions, a retrain's contest) always means models of the same data.

The first publish of a name writes the binding create-if-absent, before it claims a version number; every later
publish (and `train`, before it trains) checks against it, and a version of another dataset or shape is refused
in one line that suggests a name. A name with claimed versions but no binding was published by an earlier vaegen
(the binding precedes every claim): it is refused in one line, never guessed from its versions."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cluster.store.records import FieldError, OtherFormat, fields, read_record
from cluster.store.storage import Storage
from vae_core.errors import VaegenError
from vae_core.names import MAX_NAME, NAME_RE

BINDING_FILE = "dataset.json"
BINDING_FORMAT = 1
MODELS = "models"


@dataclass(frozen=True)
class Binding:
    dataset: str | None                 # None: a version made without a stored dataset (a test's, a benchmark's)
    image_shape: tuple[int, ...] | None

    def describe(self) -> str:
        shape = "images of unknown shape" if self.image_shape is None else \
            f"{'x'.join(map(str, self.image_shape))} images"
        return f"{'no dataset' if self.dataset is None else repr(self.dataset)}, {shape}"

    def record(self) -> dict:
        return {"format_version": BINDING_FORMAT, "dataset": self.dataset,
                "image_shape": None if self.image_shape is None else list(self.image_shape)}


def binding_of_config(config: dict) -> Binding:
    """What a version's config.json says it was trained on: train_job.dataset and model.image_shape."""
    job = config.get("train_job") or {}
    shape = config["model"].get("image_shape")
    return Binding(job.get("dataset"), None if shape is None else tuple(int(d) for d in shape))


def binding_record(record) -> dict:
    fields(record, {"format_version": int})
    if record["format_version"] != BINDING_FORMAT:
        raise OtherFormat(f"format_version {record['format_version']}; this vaegen reads {BINDING_FORMAT}")
    fields(record, {"dataset": (str, None), "image_shape": ("ints", None)})
    if record["dataset"] is not None and not NAME_RE.fullmatch(record["dataset"]):
        raise FieldError("field 'dataset' is not a dataset name")
    return record


def binding_key(name: str) -> str:
    return f"{MODELS}/{name}/{BINDING_FILE}"


def bound_to(storage: Storage, name: str) -> Binding | None:
    """The name's binding; None for a name nothing was published under yet."""
    key = binding_key(name)
    if not storage.exists(key):
        if not any(re.fullmatch(r"v[0-9]{4,}", d) for d in storage.list_dirs(f"{MODELS}/{name}")):  # none claimed
            return None
        # A claim found after the binding was looked for may be a concurrent first publish's, which bound the name
        # just before it claimed: only a binding still missing now means an earlier vaegen's name.
        if not storage.exists(key):
            raise VaegenError(f"model name {name!r} holds versions from an earlier vaegen, which bound no dataset to "
                              f"a name (no {storage.uri_of(key)}): train under a new --name")
    fix = (f"write {{\"format_version\": {BINDING_FORMAT}, \"dataset\": \"<name>\", \"image_shape\": [C, H, W]}} "
           f"naming what {name!r}'s versions were trained on")
    record = read_record(storage, key, fix, binding_record)
    shape = record["image_shape"]
    return Binding(record["dataset"], None if shape is None else tuple(shape))


def check_binding(storage: Storage, name: str, binding: Binding) -> None:
    """Refuse, in one line suggesting a name, a version of `binding` under a name bound to something else."""
    found = bound_to(storage, name)
    if found is not None and found != binding:
        raise VaegenError(f"model name {name!r} is bound to {found.describe()}; this model is {binding.describe()}: "
                          f"give it a name of its own, e.g. --name {suggested_name(name, found, binding)}")


def bind(storage: Storage, name: str, binding: Binding) -> None:
    """Bind `name` to `binding` if nothing is bound yet (create-if-absent: of two first publishes of different
    data, one wins and the other is refused), else check that it is bound to the same."""
    check_binding(storage, name, binding)
    if not storage.publish(binding_key(name), json.dumps(binding.record(), sort_keys=True).encode(), if_absent=True):
        check_binding(storage, name, binding)


def suggested_name(name: str, found: Binding, wanted: Binding) -> str:
    """`<name>-<dataset>` for another dataset, `<name>-<C>x<H>x<W>` for another shape of the same one."""
    if wanted.dataset is not None and wanted.dataset != found.dataset:
        tail = wanted.dataset
    elif wanted.image_shape is not None:
        tail = "x".join(map(str, wanted.image_shape))
    else:
        tail = "2"
    return f"{name}-{tail}"[:MAX_NAME]
