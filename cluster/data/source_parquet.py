"""Tables of images: Parquet files (one, a folder, a Hugging Face Hub layout) and `datasets`' save_to_disk folders.

Splits come from file names as `datasets` finds them: `data/<split>-NNNNN-of-NNNNN.*` first, else the train/
validation/test keywords in folder names, then in file names, else everything is --split. The image column is
--image-column, else `image` (bytes, or Hugging Face's Image struct<bytes, path>), else `pixels` (C·H·W uint8
in CHW order) with `height`, `width`, `channels` columns or one shape in the `vaegen.image_shape` schema metadata
(vaegen's own dataset shards); the label column --label-column ("" for none), else `label` when there is one. Class names
come from the `huggingface` schema metadata (a ClassLabel), else are '0'..max label. Items: row ranges."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.data.source_io import (
    FileRef,
    IngestOptions,
    SourceImage,
    SourceItem,
    SourcePlan,
    absolute,
    bad_image,
    decode_image,
    file_info,
    fingerprint,
    list_files,
    open_file,
    read_file,
    shaped_array,
)
from vae_core.config import MAX_CLASSES, StorageConfig
from vae_core.errors import VaegenError

ROWS_PER_ITEM = 10_000
SHAPE_COLUMNS = ("height", "width", "channels")
IMAGE_SHAPE_METADATA = b"vaegen.image_shape"           # what cluster/data/readable.py writes: [C, H, W]
SHARDED = re.compile(r"^data/([^/]+?)-[0-9]{5}-of-[0-9]{5}[^/]*$")    # datasets' SPLIT_PATTERN_SHARDED
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
SEP = "[-._ 0-9]"


def infer_splits(relative: list[str], default: str) -> list[str | None]:
    """Each file's split, as `datasets` finds it (None: a file that it would leave out)."""
    sharded = [SHARDED.match(r) for r in relative]
    if any(sharded):
        return [m.group(1) if m else None for m in sharded]
    for in_dirs in (True, False):
        found = [_keyword_split(r, in_dirs) for r in relative]
        if any(found):
            return found
    return [default] * len(relative)


def _keyword_split(path: str, in_dirs: bool) -> str | None:
    parts = path.split("/")
    names = parts[:-1] if in_dirs else parts[-1:]
    for split, keywords in SPLIT_KEYWORDS.items():
        for keyword in keywords:
            pattern = re.compile(f"^(.*{SEP})?{keyword}({SEP}.*)?$")
            if any(pattern.match(n) for n in names):
                return split
    return None


# -- plan ----------------------------------------------------------------------------------------------
def plan_table_source(kind: str, uri: str, cfg: StorageConfig, options: IngestOptions) -> SourcePlan:
    root = absolute(uri)
    lone = file_info(root, cfg)
    if lone is not None:
        files, relative = [lone], [root.rsplit("/", 1)[-1]]
    else:
        listed = list_files(root, cfg)
        if any(f.uri.endswith("/state.json") for f in listed) and any(f.uri.endswith(".arrow") for f in listed):
            return _plan_saved_to_disk(kind, uri, root, listed, cfg, options)
        files = [f for f in listed if f.uri.endswith(".parquet")]
        if not files:
            raise VaegenError(f"no Parquet input at {uri} (a .parquet file, or a folder holding some)")
        relative = [f.uri[len(root) + 1:] for f in files]
    splits = infer_splits(relative, options.split)
    items, names, labelled = [], None, False
    chosen = [(s, f) for s, f in zip(splits, files) if s is not None]
    for split, ref in sorted(chosen, key=lambda c: (split_order(c[0]), c[1].uri)):
        meta = _parquet_metadata(ref.uri, cfg)
        columns = choose_columns(meta.schema.to_arrow_schema(), options, ref.uri)
        check_statistics(meta, columns, options, ref.uri)
        labelled |= columns[1] is not None
        names = names or (class_names(meta.schema.to_arrow_schema(), columns[1]) if columns[1] else None)
        raw = is_raw(meta.schema.to_arrow_schema(), columns[0])
        items += [SourceItem(split, ref.uri, start, min(start + ROWS_PER_ITEM, meta.num_rows), raw=raw)
                  for start in range(0, meta.num_rows, ROWS_PER_ITEM)]
    if not items:
        raise VaegenError(f"Parquet input {uri} holds no rows")
    if labelled and names is None:
        names = _numbered_names(items, cfg, options)
    return SourcePlan(kind, uri, tuple(items), names if labelled else None,
                      fingerprint(kind, root, items, files, names if labelled else None, options))


def split_order(split: str) -> tuple[int, str]:
    order = list(SPLIT_KEYWORDS)
    return (order.index(split) if split in order else len(order), split)


def _parquet_metadata(uri: str, cfg: StorageConfig) -> pq.FileMetaData:
    try:
        with open_file(uri, cfg) as f:
            return pq.ParquetFile(f).metadata
    except (OSError, ValueError, pa.ArrowException) as e:
        raise VaegenError(f"cannot read Parquet input {uri}: {str(e).splitlines()[0]}") from None


def choose_columns(schema: pa.Schema, options: IngestOptions, name: str) -> tuple[str, str | None]:
    """(the image column, the label column or None): what the options name, else the defaults."""
    present = schema.names
    listed = ", ".join(present)
    if options.image_column is not None:
        if options.image_column not in present:
            raise VaegenError(f"{name} has no column {options.image_column!r} (--image-column); it has: {listed}")
        image = options.image_column
    elif "image" in present:
        image = "image"
    elif "pixels" in present and (set(SHAPE_COLUMNS) <= set(present) or fixed_shape(schema)):
        image = "pixels"
    else:
        raise VaegenError(f"{name} has no image column: name it with --image-column (columns: {listed}), or "
                          "give it 'image' (encoded bytes) or 'pixels' + height, width, channels")
    label = options.label_column
    if label is None:
        label = "label" if "label" in present else None
    elif label == "":
        label = None
    elif label not in present:
        raise VaegenError(f"{name} has no column {label!r} (--label-column); it has: {listed}")
    if label is not None and not pa.types.is_integer(schema.field(label).type):
        raise VaegenError(f"{name}: label column {label!r} must hold integers, not {schema.field(label).type}")
    for shape in shape_columns(schema, image):
        if not pa.types.is_integer(schema.field(shape).type):     # 8.5 or "8" would be truncated or parsed
            raise VaegenError(f"{name}: '{shape}' must be an integer column, not {schema.field(shape).type}")
    return image, label


def check_statistics(meta: pq.FileMetaData, columns: tuple[str, str | None], options: IngestOptions,
                     uri: str) -> None:
    """What a Parquet footer's statistics already say is wrong, in one line before any image is read: a shape
    column with nulls, and (unless --skip-bad) a label column with nulls or a label below 0."""
    image, label = columns
    checked = shape_columns(meta.schema.to_arrow_schema(), image) + \
        ([label] if label is not None and not options.skip_bad else [])
    leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]    # a struct column has several
    for group in range(meta.num_row_groups):
        for name in checked:
            stats = meta.row_group(group).column(leaves.index(name)).statistics
            if stats is None:
                continue
            if stats.null_count:
                what = "label column" if name == label else f"'{name}' must be an integer column without nulls:"
                raise VaegenError(f"{uri}: {what} {name!r} has {stats.null_count} empty value(s)"
                                  if name == label else f"{uri}: {what} it has {stats.null_count}")
            if name == label and stats.has_min_max and stats.min < 0:
                raise VaegenError(f"{uri}: label {stats.min} in column {label!r}: labels must be 0 or more (for "
                                  "unlabelled data: --label-column '')")


def shape_columns(schema: pa.Schema, image: str) -> list[str]:
    """The per-row shape columns of a `pixels` image column (none where the metadata gives one shape)."""
    return list(SHAPE_COLUMNS) if image == "pixels" and set(SHAPE_COLUMNS) <= set(schema.names) else []


def is_raw(schema: pa.Schema, image: str) -> bool:
    """Whether the image column holds pixels as they are (C·H·W bytes with a shape), not encoded images."""
    return bool(shape_columns(schema, image)) or (image == "pixels" and fixed_shape(schema) is not None)


def fixed_shape(schema: pa.Schema) -> tuple[int, int, int] | None:
    """The one (C, H, W) of every `pixels` value that the schema metadata declares, if it declares one."""
    try:
        shape = tuple(json.loads((schema.metadata or {}).get(IMAGE_SHAPE_METADATA, b"null")) or ())
    except ValueError:
        return None
    return shape if len(shape) == 3 and all(isinstance(v, int) for v in shape) else None


def class_names(schema: pa.Schema, label: str) -> tuple[str, ...] | None:
    """The ClassLabel names of `label` in the schema's `huggingface` metadata, if it declares them."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(raw)["info"]["features"][label] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return tuple(str(n) for n in feature["names"])
    return None


def _numbered_names(items, cfg: StorageConfig, options: IngestOptions) -> tuple[str, ...]:
    """'0'..max label, from the label columns alone (read, not decoded images)."""
    high = -1
    for uri in dict.fromkeys(i.uri for i in items):
        with open_file(uri, cfg) as f:
            if uri.endswith(".arrow"):                 # a stream: its label column comes with the rest
                reader = pa.ipc.open_stream(f)
                label = choose_columns(reader.schema, options, uri)[1]
                column = reader.read_all().column(label)
            else:
                pf = pq.ParquetFile(f)
                label = choose_columns(pf.schema_arrow, options, uri)[1]
                column = pf.read(columns=[label]).column(label)
        high = max(high, pc.max(column).as_py() if column.length() > column.null_count else -1)
    if high >= MAX_CLASSES:
        raise VaegenError(f"input has label {high}: at most {MAX_CLASSES:,} classes (labels 0..{MAX_CLASSES - 1})")
    return tuple(str(i) for i in range(high + 1))


# -- save_to_disk ------------------------------------------------------------------------------------------
def _plan_saved_to_disk(kind: str, uri: str, root: str, listed: list[FileRef], cfg: StorageConfig,
                        options: IngestOptions) -> SourcePlan:
    """A `datasets` save_to_disk folder: a Dataset (state.json + data-*.arrow) or a DatasetDict (one such folder
    per split, named by the split). One item per Arrow stream file, read whole."""
    items, names, labelled = [], None, False
    states = [f.uri for f in listed if f.uri.endswith("/state.json")]
    for state_uri in states:
        folder = state_uri[: -len("/state.json")]
        split = options.split if folder == root else folder.rsplit("/", 1)[-1]
        state = json.loads(read_file(state_uri, cfg))
        for entry in state.get("_data_files", []):
            file_uri = f"{folder}/{entry['filename']}"
            schema = _arrow_schema(file_uri, cfg)
            label = choose_columns(schema, options, file_uri)[1]
            labelled |= label is not None
            names = names or (class_names(schema, label) if label else None)
            items.append(SourceItem(split, file_uri))
    items.sort(key=lambda i: (split_order(i.split), i.uri))
    if labelled and names is None:
        names = _numbered_names(items, cfg, options)
    return SourcePlan(kind, uri, tuple(items), names if labelled else None,
                      fingerprint(kind, root, items, listed, names if labelled else None, options))


def _arrow_schema(uri: str, cfg: StorageConfig) -> pa.Schema:
    try:
        with open_file(uri, cfg) as f:
            return pa.ipc.open_stream(f).schema
    except (OSError, ValueError, pa.ArrowException) as e:
        raise VaegenError(f"cannot read Arrow file {uri}: {str(e).splitlines()[0]}") from None


# -- read --------------------------------------------------------------------------------------------------
def read_table_item(item: SourceItem, cfg: StorageConfig, options: IngestOptions) -> Iterator[SourceImage]:
    """Every row of the item's range, in order."""
    row = item.start
    for batch, image, label, shape in _batches(item, cfg, options):
        labels = [-1] * batch.num_rows if label is None else batch.column(label).to_pylist()
        columns = {k: batch.column(k).to_pylist() for k in shape_columns(batch.schema, image)}
        for i, value in enumerate(batch.column(image).to_pylist()):
            name = f"{item.uri} row {row}"
            row += 1
            if label is not None and (labels[i] is None or labels[i] < 0):
                yield bad_image(name, f"label {labels[i]} is not an integer >= 0", -1, options)
            elif columns or shape:
                yield _pixels(value, shape or [columns[k][i] for k in ("channels", "height", "width")], name,
                              labels[i], options)
            else:
                data = value.get("bytes") if isinstance(value, dict) else value
                yield (decode_image(data, name, labels[i], options) if isinstance(data, bytes)
                       else bad_image(name, f"column {image!r} holds no image bytes", labels[i], options))


def _batches(item: SourceItem, cfg: StorageConfig, options: IngestOptions):
    """(record batch, image column, label column, the one shape of raw pixels or None) over the item's rows."""
    with open_file(item.uri, cfg) as f:
        if item.uri.endswith(".arrow"):
            reader = pa.ipc.open_stream(f)
            image, label = choose_columns(reader.schema, options, item.uri)
            shape = fixed_shape(reader.schema) if image == "pixels" and not shape_columns(reader.schema, image) \
                else None
            for batch in reader:
                yield batch, image, label, shape
            return
        pf = pq.ParquetFile(f)
        image, label = choose_columns(pf.schema_arrow, options, item.uri)
        wanted = [image] + ([label] if label else []) + shape_columns(pf.schema_arrow, image)
        shape = fixed_shape(pf.schema_arrow) if image == "pixels" and not shape_columns(pf.schema_arrow, image) \
            else None
        stop = pf.metadata.num_rows if item.stop < 0 else item.stop
        first = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if first < stop and first + rows > item.start:
                table = pf.read_row_group(group, columns=wanted)
                lo, hi = max(item.start - first, 0), min(stop - first, rows)
                for batch in table.slice(lo, hi - lo).to_batches(max_chunksize=1024):
                    yield batch, image, label, shape
            first += rows


def _pixels(value, shape, name: str, label: int, options: IngestOptions) -> SourceImage:
    c, h, w = shape
    if not isinstance(value, bytes) or None in shape or c not in (1, 3) or h <= 0 or w <= 0 \
            or len(value) != c * h * w:
        return bad_image(name, f"'pixels' is not {c}x{h}x{w} bytes (channels x height x width, 1 or 3 channels)",
                         label, options)
    return shaped_array(np.frombuffer(value, np.uint8).reshape(c, h, w), name, label, options)
