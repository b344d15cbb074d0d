"""`vaegen show`: one static _gallery.html (layout.GALLERY) beside a job's shards (or a model version's
files). Every image is inline (a data: URI), so the file opens anywhere with no server and no network. A job
without _SUCCESS is shown too, marked PARTIAL (or FAILED), from the shards its receipts list. The page's pieces
are in html.py, the model's part (metrics, settings, plots, per-epoch grids, evaluation) in model_page.py."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.data.datasets import read_manifest, table_arrays
from cluster.data.datasets import read_shard as read_dataset_shard
from cluster.generate.card import reproduce_command
from cluster.generate.commit import RERUN_JOB
from cluster.generate.writers import ShardRows, read_shard_rows
from cluster.show.html import esc, facts, img, page, settings_table
from cluster.show.inventory import JobStatus, champion_version, job_status
from cluster.show.model_page import model_section
from cluster.store.layout import GALLERY, JOB_ID, OUTPUTS, SUCCESS, JobKeys, shard_index
from cluster.store.records import RECORD_ERRORS, CorruptRecord
from cluster.store.registry import ModelRef, Registry
from cluster.store.storage import Storage, open_storage
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError
from vae_core.names import check_name, is_valid_name
from vae_core.use_configs import GenerateConfig

SAMPLED_SHARDS = 3            # shards read for the contact sheets, picked at random (fixed seed)
RECON_PAIRS = 24              # original/reconstruction pairs shown
PER_CLASS = 16                # tiles per class on a labelled job's contact sheet
UNLABELLED = 64               # tiles on an unlabelled job's one sheet (8 x 8)
GALLERY_SEED = 0


@dataclass
class GalleryResult:
    location: str           # where _gallery.html was written (path or s3:// URI)
    title: str
    summary: str
    partial: bool


# -- finding the target ---------------------------------------------------------------------------------------
# A target given as a path: everything after the root's outputs/ or models/ folder must be names (check_name),
# so `R/outputs/../../elsewhere` is refused instead of writing _gallery.html outside R.
JOB_PATH = re.compile(rf"(?:(?P<root>.*)/)?{OUTPUTS}/(?P<job>[^/]+)")
MODEL_PATH = re.compile(r"(?:(?P<root>.*)/)?models/(?P<name>[^/]+)(?:/(?P<version>[^/]+))?")
TARGET_FORMS = (f"<root>/{OUTPUTS}/<job-id>, <root>/models/<name>[/<version>], "
                "or a job id or model name[@version] under --root")


def _checked(target: str, *parts: tuple[str | None, str]) -> None:
    for value, what in parts:
        if value is not None:
            try:
                check_name(value, what)
            except VaegenError as e:
                raise VaegenError(f"show target {target!r}: {e}") from None


def resolve_target(target: str, storage_cfg: StorageConfig) -> tuple[Storage, str, str]:
    """(storage, 'job' | 'model', job id | name[@version]) from a path or URI, or from a name under --root."""
    stripped = target.rstrip("/")
    if "/" in stripped:
        for pattern, kind in ((JOB_PATH, "job"), (MODEL_PATH, "model")):
            found = pattern.fullmatch(stripped)
            if not found:
                continue
            root = found["root"]
            storage = open_storage(dataclasses.replace(storage_cfg, root="." if root is None else root or "/"))
            if kind == "job":
                _checked(target, (found["job"], "job id"))
                return storage, "job", found["job"]
            _checked(target, (found["name"], "model name"), (found["version"], "version"))
            return storage, "model", f"{found['name']}@{found['version']}" if found["version"] else found["name"]
        raise VaegenError(f"show target {target!r} is not one of: {TARGET_FORMS}")
    name, at, version = stripped.partition("@")
    _checked(target, (name, "name"), (version if at else None, "version"))
    storage = open_storage(storage_cfg)
    if at:
        return storage, "model", stripped
    if name in storage.list_dirs(OUTPUTS):
        return storage, "job", name
    if JOB_ID.fullmatch(name) and not Registry(storage).versions(name):
        return storage, "job", name                        # a job id that is not there: say that, not "no model"
    return storage, "model", name


def out_storage(out: str) -> tuple[Storage, str]:
    """(storage, key) for `--out FILE`: a local file in an existing, writable folder (refused otherwise, before
    any work), written through Storage.publish so a reader never sees half a page."""
    if "://" in out and not out.startswith("file://"):
        raise VaegenError(f"--out={out!r} must be a local file path (leave --out off to write beside the job)")
    path = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
    folder, fname = os.path.split(path)
    if os.path.isdir(path) or fname in ("", ".", ".."):
        raise VaegenError(f"--out={out!r} is a folder: name the file to write, e.g. {os.path.join(out, GALLERY)}")
    if not os.path.isdir(folder):
        raise VaegenError(f"--out={out!r}: the folder {folder} does not exist (create it first)")
    return open_storage(StorageConfig(root=folder), for_writing=True), fname


def write_gallery(target: str, storage_cfg: StorageConfig, *, per_class: int | None = None,
                  out: str | None = None) -> GalleryResult:
    """Write _gallery.html beside the job's shards or the model version's files (or to the local path `out`).
    per_class: tiles per class on a contact sheet (None: PER_CLASS, or UNLABELLED for a job without labels)."""
    storage, kind, name = resolve_target(target, storage_cfg)
    destination = out_storage(out) if out else None
    if kind == "job":
        if not storage.list(JobKeys.of(name).prefix, recursive=True):
            raise VaegenError(f"no job {name!r} under {storage.uri_of(OUTPUTS)}: that job does not exist "
                              "(`vaegen ls` lists the jobs there)")
        text, result = job_page(storage, job_status(storage, name, with_receipts=True), per_class)
        key = JobKeys.of(name).gallery
    else:
        registry = Registry(storage)
        ref = registry.resolve(name)
        text, result = model_page(registry, ref)
        key = registry.key(ref.name, ref.version, GALLERY)
    if destination:
        storage, key = destination
    storage.publish(key, text.encode())
    result.location = storage.uri_of(key)
    return result


# -- reading shards -------------------------------------------------------------------------------------------
def read_shard(storage: Storage, job_id: str, entry: dict, fmt: str) -> ShardRows:
    """The rows of one shard of a job (read_shard_rows), checked against the sha256 its manifest entry (or
    receipt) records: a truncated shard can still parse, and the page must not show it as if it were whole."""
    key = JobKeys.of(job_id).shard(entry["name"])
    data = storage.read_bytes(key)
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptRecord(storage.uri_of(key), "does not match the sha256 its job recorded", RERUN_JOB)
    try:
        return read_shard_rows(data, fmt)
    except (pa.ArrowException, tarfile.TarError, OSError, *RECORD_ERRORS) as e:
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptRecord(storage.uri_of(key), f"is not a readable {fmt} shard ({problem})", RERUN_JOB) from None


# -- pages ----------------------------------------------------------------------------------------------------
def model_page(registry: Registry, ref: ModelRef) -> tuple[str, GalleryResult]:
    body = model_section(registry, ref)
    champion = champion_version(registry, ref.name)
    summary = f"champion: {'yes' if champion == ref.version else 'no'}"
    return page(f"vaegen model {ref}", [f"<p>{summary}</p>", *body]), GalleryResult("", str(ref), summary, False)


def job_page(storage: Storage, status: JobStatus, per_class: int | None) -> tuple[str, GalleryResult]:
    if status.corrupt:                                    # never shown as if it were finished (or partial)
        raise status.corrupt
    manifest = status.manifest or {}
    shards = status.receipts                      # manifest entries when finished, receipts otherwise
    rows_done = sum(s["rows"] for s in shards)
    planned = "?" if status.shards_planned is None else str(status.shards_planned)
    summary = f"{rows_done:,} images in {len(shards)} of {planned} shards"
    body = []
    if status.state != "finished":
        css = " failed" if status.state == "failed" else ""
        error = f" — last run: {status.error}" if status.error else ""
        body.append(f'<p class="banner{css}" id="state" data-state="{status.state}">{status.state.upper()}: no '
                    f"{SUCCESS}; showing the {len(shards)} of {planned} shards finished so far{esc(error)}</p>")
    items = [("Job", status.job_id, None), ("State", status.state, None), ("Kind", status.kind, None),
             ("Model", status.model, None), ("Format", status.format, None),
             ("Shards", f"{len(shards)} of {planned}", len(shards)), ("Rows", f"{rows_done:,}", rows_done)]
    if manifest:
        spec = manifest["spec"]
        items += [("Bytes", f"{manifest['totals']['bytes']:,}", None), ("Seed", str(spec["seed"]), None),
                  ("Command", reproduce_command(manifest), None)]
    body += ["<h2>summary</h2>", facts(items)]
    if isinstance(manifest.get("spec"), dict):
        body += ['<h3 id="job-settings">settings</h3>', settings_table(GenerateConfig, manifest["spec"], "job-spec")]
    if shards:
        body += contact_sheets(storage, status, shards, manifest.get("label_names", []), per_class)
    if status.kind == "reconstructions" and shards and manifest.get("spec"):
        body += reconstruction_pairs(storage, status, manifest, shards[0])
    name, _, version = status.model.partition("@")
    if is_valid_name(name) and is_valid_name(version):        # a record names it: read nothing outside the root
        try:
            body += model_section(Registry(storage), ModelRef(name, version))
        except VaegenError as e:                              # the job is fine; only its model's files are not
            body.append(f"<h2>model {esc(status.model)}</h2><p>{esc(e)}</p>")
    title = f"vaegen job {status.job_id}"
    return page(title, body), GalleryResult("", status.job_id, summary, status.state != "finished")


def contact_sheets(storage: Storage, status: JobStatus, shards: list[dict], label_names: list[str],
                   per_class: int | None) -> list[str]:
    """A sheet per label (one for unlabelled rows) of images from up to SAMPLED_SHARDS shards picked at random."""
    rng = np.random.default_rng(GALLERY_SEED)
    picked = sorted(rng.choice(len(shards), size=min(SAMPLED_SHARDS, len(shards)), replace=False).tolist())
    by_label: dict = {}
    for i in picked:
        rows = read_shard(storage, status.job_id, shards[i], status.format)
        labels = [None] * len(rows.ids) if rows.labels is None else rows.labels.tolist()
        for sample_id, label, image in zip(rows.ids.tolist(), labels, rows.images):
            group = by_label.setdefault(label, [])
            if len(group) < (per_class or (UNLABELLED if label is None else PER_CLASS)):
                group.append((sample_id, image))
    names = ", ".join(shards[i]["name"] for i in picked)
    what = "reconstructions" if status.kind == "reconstructions" else "generated images"
    out = [f"<h2>contact sheets</h2><p>{what} from {len(picked)} shard(s) picked at random ({esc(names)}), in id "
           "order, 8 a row; hover over an image for its id</p>"]
    for label in sorted(by_label, key=lambda v: (v is None, v)):
        heading = "all images (no labels)" if label is None else (
            f"{label}: {label_names[label]}" if label < len(label_names) else str(label))
        tiles = "".join(img(image, f"id {sample_id}") for sample_id, image in by_label[label])
        out.append(f"<h3>{esc(heading)}</h3><div class=\"sheet\">{tiles}</div>")
    return out


def reconstruction_pairs(storage: Storage, status: JobStatus, manifest: dict, shard: dict) -> list[str]:
    """Originals (top) above their reconstructions, from the input dataset's matching shard. The job is shown
    without them (and says why) when that dataset is gone, unreadable or no longer the one the job read."""
    spec = manifest["spec"]
    rows = read_shard(storage, status.job_id, shard, status.format)
    try:
        dataset = read_manifest(storage, check_name(spec["dataset"], "dataset"))
        source = dataset["splits"][spec["split"]]["shards"][shard_index(shard["name"])]
        body = read_dataset_shard(storage, spec["dataset"], check_name(spec["split"], "split"), source)
        table = pq.read_table(io.BytesIO(body))
        ids, _, originals = table_arrays(table, tuple(dataset["image_shape"]))
    except (VaegenError, pa.ArrowException, *RECORD_ERRORS) as e:
        return [f"<h2>reconstructions</h2><p>the originals cannot be shown: {esc(str(e))}</p>"]
    original_of = dict(zip(ids.tolist(), originals))
    pairs = [f'<span class="pair">{img(original_of[i], f"original {i}")}{img(r, f"reconstruction {i}")}</span>'
             for i, r in list(zip(rows.ids.tolist(), rows.images))[:RECON_PAIRS] if i in original_of]
    return [f"<h2>reconstructions</h2><p>each column: an image of {esc(spec['dataset'])}/{esc(spec['split'])} (top) "
            f"and its reconstruction (bottom), the first {len(pairs)} of {esc(shard['name'])}</p>",
            f"<div>{''.join(pairs)}</div>"]
