"""A finished job's Hugging Face dataset card: YAML metadata (licence, source, size and task categories,
`configs`/`data_files`, `dataset_info` features) built with huggingface_hub's DatasetCardData, then how the data
was made and how to load it. It is built from the manifest the commit writes, the model's config.json (its prior)
and the source dataset's manifest (its licence), so it says what the job holds. It is the job folder's README.md
(layout.CARD), in every format: the folder uploaded to the Hub as it is has its card."""
from __future__ import annotations

import dataclasses
import html
import json
import re
import tarfile
import time

import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData

from cluster.data.datasets import read_manifest
from cluster.store.layout import DATA_DIR, MANIFEST, JobKeys, shard_glob
from cluster.store.registry import ModelRef, Registry
from cluster.store.storage import Storage
from vae_core.data import FASHION_MNIST_LABELS
from vae_core.errors import VaegenError
from vae_core.names import CONFIG_FILE, is_valid_name
from vae_core.use_configs import GenerateConfig

UNKNOWN_LICENSE = "unknown"
# Sources vaegen ingests by name, recognised by what their manifest holds (the ingest records a folder path as the
# source, not a name): licence, Hub id, home page.
KNOWN_SOURCES = {(tuple(FASHION_MNIST_LABELS), (1, 28, 28)): {
    "license": "mit", "hub_id": "zalando-datasets/fashion_mnist", "title": "Fashion-MNIST",
    "url": "https://github.com/zalandoresearch/fashion-mnist"}}
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
# The verbs' own flags (jobs/generate_cmds.py): every GenerateConfig field except `kind` is hashed into the job id,
# so the command spells out each one the verb takes, defaults included (a later default cannot change the job).
VERB_FIELDS = {"samples": ("generate", ("count", "shard_size", "seed", "labels", "pixels")),
               "reconstructions": ("reconstruct", ("dataset", "split"))}
COMMON_FIELDS = ("model", "format", "decode_batch")


def size_category(rows: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1B")


# What the command says for the storage root: a root is copied and synced, and what is written in it must stay
# right wherever it lands, so no record or page under it names the place it was written in.
ROOT_PLACEHOLDER = "<root>"
ROOT_NOTE = (f"`{ROOT_PLACEHOLDER}`: the storage root (a folder or s3://bucket/prefix) this job's folder is "
             "`outputs/<job-id>` in.")


def reproduce_command(manifest: dict) -> str:
    """The `vaegen` command that makes (or resumes) this very job: every flag of the spec, so the job id is the
    same (the model as it was asked for: `name@champion` resolves to the version of the day), and --root as
    ROOT_PLACEHOLDER."""
    spec = manifest["spec"]
    verb, fields = VERB_FIELDS[spec["kind"]]
    fields_of = {f.name: f for f in dataclasses.fields(GenerateConfig) if "flag" in f.metadata}
    words = []
    for name in (*fields, *COMMON_FIELDS):
        value = spec.get(name, fields_of[name].default)       # a spec from before the field existed: its default
        value = list(value) if isinstance(value, tuple) else value
        if isinstance(value, list):
            if value:                                    # an empty --labels means every class: leave it out
                words.append(f"{fields_of[name].metadata['flag']} {' '.join(map(str, value))}")
        else:
            words.append(f"{fields_of[name].metadata['flag']} {value}")
    return f"vaegen {verb} {' '.join(words)} --root {ROOT_PLACEHOLDER}"


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """What one row of the job holds, read from its first shard."""
    labelled: bool                      # rows carry a label (none for an unconditional model's samples)
    latent_dim: int | None
    tar_members: tuple[str, ...] = ()   # tar jobs: the extensions of one sample's members (png, json, cls, ...)
    tar_json: dict | None = None        # tar jobs: the first sample's .json


# Markdown's inline markup; with < and & escaped as HTML, a class name is shown as the text it is, never as a link,
# an emphasis, a table cell or a tag (class names come from the user's dataset).
MARKDOWN_MARKUP = re.compile(r"([\\`*_\[\]{}()|~!#])")


def markdown_text(text: str) -> str:
    """`text` as literal Markdown: HTML escaped, markup characters backslashed, control characters shown escaped
    (a newline would start a block of its own)."""
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return MARKDOWN_MARKUP.sub(r"\\\1", html.escape(shown, quote=False))


def _label_feature(label_names: list[str]):
    if label_names:
        return {"class_label": {"names": {str(i): name for i, name in enumerate(label_names)}}}
    return "int64"


JSON_TYPES = {bool: "bool", int: "int64", float: "float64", str: "string"}


def _json_feature(name: str, value) -> dict:
    """A .json field as `datasets` infers it (a null is an int64 label left empty)."""
    if isinstance(value, list):
        return {"name": name, "list": "float64"}
    return {"name": name, "dtype": JSON_TYPES.get(type(value), "int64")}


def features(manifest: dict, rows: RowLayout) -> list[dict]:
    """`dataset_info.features` as `datasets` writes them in YAML: the Parquet columns, or a WebDataset tar's
    members (image, cls, json, as webdataset's keys) and the __key__/__url__ that `datasets` adds."""
    names = manifest.get("label_names", [])
    if manifest["format"] == "parquet":
        out = [{"name": "id", "dtype": "int64"}, {"name": "shard", "dtype": "int32"},
               {"name": "seed", "dtype": "int64"}]
        if rows.labelled:
            out.append({"name": "label", "dtype": _label_feature(names)})
        if rows.latent_dim:
            out.append({"name": "latent", "list": "float32", "length": rows.latent_dim})
        out.append({"name": "image", "dtype": "image"})
        return out + [{"name": k, "dtype": "int32"} for k in ("height", "width", "channels")]
    out = []
    for ext in rows.tar_members:
        if ext == "cls":
            out.append({"name": ext, "dtype": _label_feature(names)})
        elif ext == "json":
            out.append({"name": ext, "struct": [_json_feature(k, v) for k, v in (rows.tar_json or {}).items()]})
        else:
            out.append({"name": ext, "dtype": "image"})
    return out + [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What the card says about where the data comes from."""
    dataset: str | None                 # the vaegen dataset the model was trained on / the job reconstructs
    license: str = UNKNOWN_LICENSE
    hub_id: str | None = None
    title: str | None = None
    url: str | None = None
    prior_components: int = 0           # > 0: samples come from the mixture fitted to the aggregate posterior
    conditional: bool = False


def provenance(storage: Storage, manifest: dict) -> Provenance:
    """The source dataset and its licence (a licence the dataset manifest states, else a known source's, else
    unknown) and the model's prior, each read where it is, and left unknown when it is gone."""
    model: dict = {}
    trained_on = None
    try:
        name, version = manifest["model"].split("@", 1)
        config = json.loads(Registry(storage).read_file(ModelRef(name, version), CONFIG_FILE))
        model, trained_on = config.get("model") or {}, (config.get("train_job") or {}).get("dataset")
    except (VaegenError, ValueError, AttributeError):            # a model deleted or unreadable: say less
        pass
    dataset = manifest["spec"]["dataset"] or trained_on
    base = {"prior_components": int(model.get("prior_components") or 0),
            "conditional": bool(model.get("num_classes"))}
    if not is_valid_name(dataset):
        return Provenance(None, **base)
    try:
        source = read_manifest(storage, dataset)
    except VaegenError:                                          # gone or unreadable: the licence is unknown
        return Provenance(dataset, **base)
    known = KNOWN_SOURCES.get((tuple(source.get("label_names", ())), tuple(source.get("image_shape", ()))), {})
    return Provenance(dataset, source.get("license") or known.get("license", UNKNOWN_LICENSE),
                      source.get("hub_id") or known.get("hub_id"), known.get("title"), known.get("url"), **base)


def card_data(manifest: dict, rows: RowLayout, source: Provenance) -> DatasetCardData:
    fmt, totals, spec, split = manifest["format"], manifest["totals"], manifest["spec"], manifest["split"]
    samples = spec["kind"] == "samples"
    tasks = ["unconditional-image-generation" if samples else "image-to-image"]
    if rows.labelled:
        tasks.append("image-classification")
    return DatasetCardData(
        pretty_name=f"vaegen {manifest['job_id']}", license=source.license,
        size_categories=size_category(totals["rows"]), task_categories=tasks,
        source_datasets=[f"extended|{source.hub_id}"] if source.hub_id else None,
        tags=["synthetic", "vaegen", "image", "parquet" if fmt == "parquet" else "webdataset"],
        configs=[{"config_name": "default", "data_files": [{"split": split, "path": shard_glob(fmt, split)}]}],
        dataset_info={"features": features(manifest, rows),
                      "splits": [{"name": split, "num_bytes": totals["bytes"], "num_examples": totals["rows"]}],
                      "download_size": totals["bytes"], "dataset_size": totals["bytes"]})


def how_made(manifest: dict, source: Provenance) -> str:
    spec, totals = manifest["spec"], manifest["totals"]
    if spec["kind"] == "samples":
        given = " given the class label" if source.conditional else ""
        prior = (f"a mixture of {source.prior_components} Gaussians fitted to the training images' latent codes"
                 f"{' (one per class)' if source.conditional else ''}" if source.prior_components
                 else f"the standard normal prior N(0, I){given}")
        pixels = ("the decoder's mean image" if spec.get("pixels", "sample") == "mean"
                  else "the model's own image for z, a Gaussian model's pixel noise included")
        what = f"{totals['rows']:,} samples (z drawn from {prior}; the image is {pixels}) of"
    else:
        what = (f"{totals['rows']:,} reconstructions (the decoder's mean image for the posterior mean) of dataset "
                f"`{spec['dataset']}` split `{spec['split']}` by")
    return what


def card_text(manifest: dict, rows: RowLayout, source: Provenance) -> str:
    """The whole card: the YAML header the Hub and `datasets` read, then a human summary."""
    fmt, totals, spec, labelled = manifest["format"], manifest["totals"], manifest["spec"], rows.labelled
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest["created_at"]))
    pattern = manifest["shard_pattern"]
    if source.dataset is None:
        origin = "The model's training data is not known here; its licence is unknown."
    else:
        named = f" ({source.title}, {source.url})" if source.title else ""
        origin = (f"Source: vaegen dataset `{source.dataset}`{named}; licence: {source.license}. Generated data "
                  "carries its source's terms.")
    class_names = ", ".join(map(markdown_text, manifest.get("label_names", [])))
    lines = [f"# {manifest['job_id']}", "",
             f"{how_made(manifest, source)} the VAE `{manifest['model']}` (weights sha256 "
             f"`{manifest['weights_sha256'][:16]}…`), in {totals['shards']} {fmt} shard{'' if totals['shards'] == 1 else 's'} ({totals['bytes']:,} "
             f"bytes), made {made} by vaegen {manifest['libraries']['vaegen']}.", "", origin, "",
             *([f"- seed: {spec['seed']} (shard i draws its latents from a generator seeded by (seed, i))"]
               if spec["kind"] == "samples" else []),
             f"- labels: {class_names if labelled else 'none (no label column)'}",
             f"- shards: `{pattern}`; checksums in `{MANIFEST}`", "",
             "Made (and resumable) with:", "", "```", reproduce_command(manifest), "```", "", ROOT_NOTE, "",
             "## Load it", "", "```python"]
    lines += load_recipe(manifest, rows)
    header = card_data(manifest, rows, source).to_yaml()
    return f"---\n{header}\n---\n\n" + "\n".join(lines)


def load_recipe(manifest: dict, rows: RowLayout) -> list[str]:
    """The card's "Load it" code, run as written against the job's own folder (tests/generate/test_reader_recipes.py
    does): `datasets` on the folder (the card says which files and features), pyarrow's readers on data/ (which
    holds the shards alone), webdataset with the members every sample of this job has."""
    fmt, split, pattern = manifest["format"], manifest["split"], manifest["shard_pattern"]
    if fmt == "parquet":
        return ["import io, datasets, pandas, ray, torch, torchvision, PIL.Image",
                f'ds = datasets.load_dataset("<this folder>", split="{split}")   # image: PIL'
                + (", label: ClassLabel" if rows.labelled else ""),
                f'df = pandas.read_parquet("<this folder>/{DATA_DIR}")   # df.image[i]["bytes"]: a PNG file',
                'img = PIL.Image.open(io.BytesIO(df.image[0]["bytes"]))',
                'x = torchvision.io.decode_image(torch.frombuffer(bytearray(df.image[0]["bytes"]), dtype=torch.uint8))',
                f'rd = ray.data.read_parquet("<this folder>/{DATA_DIR}")', "```", ""]
    mode = "pill" if manifest["image_shape"][0] == 1 else "pil"      # webdataset's "pil" converts to RGB
    image = next((m for m in rows.tar_members if m not in ("cls", "json")), "png")
    keys = f'"{image}", "cls"' if "cls" in rows.tar_members else f'"{image}", "json"'
    return ["import datasets, webdataset as wds",
            f'ds = datasets.load_dataset("<this folder>", split="{split}")   # {image}: PIL'
            + (", cls: ClassLabel" if "cls" in rows.tar_members else ""),
            f'wd = wds.WebDataset("<this folder>/{pattern}", shardshuffle=False).decode("{mode}")'
            f".to_tuple({keys})", "```", ""]


def dataset_card(manifest: dict, rows: RowLayout, source: Provenance | None = None) -> DatasetCard:
    return DatasetCard(card_text(manifest, rows, source or Provenance(None)))


def publish_dataset_card(storage: Storage, manifest: dict) -> str:
    """Write the job's card beside its manifest; returns its key. Whether rows carry labels, the latent width and
    a tar's members come from the first shard (a Parquet schema, or a tar's first sample)."""
    key = JobKeys(manifest["prefix"]).card
    card = dataset_card(manifest, first_row_layout(storage, manifest), provenance(storage, manifest))
    storage.publish(key, str(card).encode())
    return key


def first_row_layout(storage: Storage, manifest: dict) -> RowLayout:
    if not manifest["shards"]:
        return RowLayout(bool(manifest.get("labels")), None)
    key = JobKeys(manifest["prefix"]).shard(manifest["shards"][0]["name"])
    if manifest["format"] == "parquet":
        with storage.fs.open_input_file(storage.path(key)) as f:
            schema = pq.read_schema(f)
        return RowLayout("label" in schema.names, schema.field("latent").type.list_size)
    members: dict[str, bytes] = {}
    first = None
    with storage.fs.open_input_stream(storage.path(key)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:                                   # streamed: only the first sample's members are read
            sample, _, ext = member.name.partition(".")
            if members and sample != first:
                break
            first = sample
            members[ext] = tar.extractfile(member).read()
    meta = json.loads(members.get("json", b"{}"))
    return RowLayout("cls" in members or meta.get("label") is not None, len(meta.get("latent") or []) or None,
                     tuple(members), meta)
