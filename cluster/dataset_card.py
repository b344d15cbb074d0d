"""A finished job's Hugging Face dataset card (README.md beside its manifest: YAML `configs`/`data_files` and
`dataset_info`, then how the data was made and how to load it). It is built from the manifest the commit
writes (plus the latent width, from the first Parquet shard's schema), so it says what the job holds."""
from __future__ import annotations

import json
import time

from .layout import MANIFEST, JobKeys, shard_glob
from .storage import Storage


def reproduce_command(manifest: dict, root_uri: str) -> str:
    """The `vaegen` command that makes (or resumes) this very job: same spec, same job id."""
    spec = manifest["spec"]
    common = f"--model {spec['model']} --format {spec['format']} --decode-batch {spec['decode_batch']}"
    if spec["kind"] == "samples":
        labels = f" --labels {' '.join(map(str, spec['labels']))}" if spec["labels"] else ""
        pixels = f" --pixels {spec['pixels']}" if spec.get("pixels", "sample") != "sample" else ""
        verb = (f"generate --count {spec['count']} --shard-size {spec['shard_size']} --seed {spec['seed']}"
                f"{labels}{pixels}")
    else:
        verb = f"reconstruct --dataset {spec['dataset']} --split {spec['split']}"
    return f"vaegen {verb} {common} --root {root_uri}"


def _features_yaml(label_names: list[str], latent_dim: int | None) -> list[str]:
    lines = ["  features:", "  - name: id", "    dtype: int64", "  - name: shard", "    dtype: int32",
             "  - name: seed", "    dtype: int64", "  - name: label"]
    if label_names:
        lines += ["    dtype:", "      class_label:", "        names:"]
        lines += [f"          '{i}': {json.dumps(name)}" for i, name in enumerate(label_names)]
    else:
        lines.append("    dtype: int64")
    if latent_dim:
        lines += ["  - name: latent", "    list: float32", f"    length: {latent_dim}"]
    lines += ["  - name: image", "    dtype: image"]
    lines += [f"  - name: {k}\n    dtype: int32" for k in ("height", "width", "channels")]
    return lines


def dataset_card(manifest: dict, latent_dim: int | None = None) -> str:
    """README.md for a finished job: the YAML header the Hub and `datasets.load_dataset(<job folder>)` read,
    then a human summary. Strings go into the YAML as JSON strings (valid YAML double-quoted scalars)."""
    fmt, totals, spec = manifest["format"], manifest["totals"], manifest["spec"]
    glob = shard_glob(fmt)
    root_uri = manifest["uri"][: -len(manifest["prefix"])].rstrip("/") or "."
    lines = ["---", f"pretty_name: {json.dumps('vaegen ' + manifest['job_id'])}",
             "tags:", "- synthetic", "- vaegen", "- image",
             "configs:", "- config_name: default", "  data_files:", "  - split: train", f"    path: {json.dumps(glob)}"]
    if fmt == "parquet":
        lines += ["dataset_info:", *_features_yaml(manifest.get("label_names", []), latent_dim),
                  "  splits:", "  - name: train", f"    num_bytes: {totals['bytes']}",
                  f"    num_examples: {totals['rows']}", f"  download_size: {totals['bytes']}"]
    lines += ["---", ""]
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(manifest["created_at"]))
    pixels = ("the decoder's mean image" if spec.get("pixels", "sample") == "mean"
              else "the model's own image for z, a Gaussian model's pixel noise included")
    what = (f"{totals['rows']:,} samples (z from the model's prior, then {pixels}) of" if spec["kind"] == "samples"
            else f"{totals['rows']:,} reconstructions of dataset `{spec['dataset']}` split `{spec['split']}` by")
    lines += [f"# {manifest['job_id']}", "",
              f"{what} the VAE `{manifest['model']}` (weights sha256 `{manifest['weights_sha256'][:16]}…`), "
              f"in {totals['shards']} {fmt} shards ({totals['bytes']:,} bytes), made {made} by vaegen "
              f"{manifest['libraries']['vaegen']}.", "",
              f"- seed: {spec['seed']} (shard i draws its latents from a generator seeded by (seed, i))",
              f"- labels: {', '.join(manifest.get('label_names', [])) or 'none'}",
              f"- shards: `{manifest.get('shard_pattern', glob)}`; checksums in `{MANIFEST}`", "",
              "Made (and resumable) with:", "", "```", reproduce_command(manifest, root_uri), "```", "",
              "## Load it", "", "```python"]
    if fmt == "parquet":
        lines += ["import glob, io, datasets, pandas, ray, PIL.Image",
                  'ds = datasets.load_dataset("<this folder>", split="train")   # image: PIL, label: ClassLabel',
                  f'files = sorted(glob.glob("<this folder>/{glob}"))',
                  "df = pandas.read_parquet(files)   # df.image[i]['bytes']: a PGM/PPM file",
                  "img = PIL.Image.open(io.BytesIO(df.image[0]['bytes']))",
                  "rd = ray.data.read_parquet(files)"]
    else:
        mode = "pill" if manifest["image_shape"][0] == 1 else "pil"      # webdataset's "pil" converts to RGB
        lines += ["import datasets, webdataset as wds",
                  'ds = datasets.load_dataset("<this folder>", split="train")   # png: PIL, json: dict',
                  f'wd = wds.WebDataset("<this folder>/{manifest.get("shard_pattern", glob)}").decode("{mode}")'
                  "   # keys: png, json (id, label, latent, ...)"]
    lines += ["```", ""]
    return "\n".join(lines)


def publish_dataset_card(storage: Storage, manifest: dict) -> str:
    """Write the job's README.md beside its manifest.json; returns its key."""
    keys = JobKeys(manifest["prefix"])
    latent_dim = None
    if manifest["format"] == "parquet" and manifest["shards"]:
        latent_dim = _latent_dim_of(storage, keys.shard(manifest["shards"][0]["name"]))
    key = keys.card
    storage.publish(key, dataset_card(manifest, latent_dim).encode())
    return key


def _latent_dim_of(storage: Storage, key: str) -> int:
    import pyarrow.parquet as pq
    with storage.fs.open_input_file(storage.path(key)) as f:
        return pq.read_schema(f).field("latent").type.list_size
