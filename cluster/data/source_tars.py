"""WebDataset tars: a file, a folder of them, or a brace pattern (`shards-{0000..0003}.tar`), local or s3://.

Members are grouped into samples as webdataset does (the key is the member's name up to the first '.' of its
base name, the rest, lower-cased, is the extension; consecutive members with one key are one sample). The image
is the first of --image-key's ';'-separated extensions a sample has, the label the first of --label-key's
(a decimal text member such as `cls`, or `json`: the `label` field of the sample's .json), as webdataset's
`.to_tuple("png;jpg", "cls")` picks them. The dataset is labelled or not as a whole: by --label-key, else by
whether the first sample has a `cls`; in a labelled dataset a sample without its label is one line naming it
(--label-key '' ingests every sample unlabelled), or with --skip-bad is skipped. Splits come from the file names
as for Parquet; class names from the dataset card beside the tars (README.md, `datasets`' cls ClassLabel: vaegen's
own tar jobs write one), else are '0'..max label, which planning finds by reading the label members alone (a
local tar's other members are seeked over). Items: one tar each, read as a stream."""
from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.data.source_io import (
    IngestOptions,
    SourceImage,
    SourceItem,
    SourcePlan,
    absolute,
    bad_image,
    decode_image,
    file_info,
    fingerprint,
    is_s3,
    list_files,
    open_file,
    open_stream,
    read_file,
)
from cluster.data.source_parquet import infer_splits, split_order
from vae_core.config import MAX_CLASSES, StorageConfig
from vae_core.errors import VaegenError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` → a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}` → x, y; nested or
    unbalanced braces, or a range that is not two integers, are one line."""
    match = BRACES.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise VaegenError(f"bad brace pattern {pattern!r}: unbalanced or nested braces")
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    if ".." in body:
        low, _, high = body.partition("..")
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise VaegenError(f"bad brace pattern {pattern!r}: {{{body}}} is not a range of integers low..high")
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        choices = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def _tar_files(uri: str, cfg: StorageConfig):
    """(the folder the names are relative to, the tars' FileRefs) for a file, folder or brace pattern."""
    if "{" in uri or "}" in uri:
        names = expand_braces(absolute(uri))
        root = absolute(uri.split("{", 1)[0]).rsplit("/", 1)[0]
        refs = []
        for name in names:
            ref = file_info(name, cfg)
            if ref is None:
                raise VaegenError(f"{name} (from the pattern {uri}) does not exist")
            refs.append(ref)
        return root, refs
    root = absolute(uri)
    lone = file_info(root, cfg)
    if lone is not None:
        return root.rsplit("/", 1)[0], [lone]
    refs = [f for f in list_files(root, cfg) if f.uri.lower().endswith(TAR_SUFFIXES)]
    if not refs:
        raise VaegenError(f"no WebDataset tars at {uri} (a .tar file, a folder of them, or a brace pattern "
                          "such as shards-{0000..0003}.tar)")
    return root, refs


def plan_webdataset(uri: str, cfg: StorageConfig, options: IngestOptions) -> SourcePlan:
    root, refs = _tar_files(uri, cfg)
    splits = infer_splits([r.uri[len(root) + 1:] for r in refs], options.split)
    chosen = sorted(((s, r) for s, r in zip(splits, refs) if s is not None), key=lambda c: (split_order(c[0]), c[1].uri))
    first = next(samples(chosen[0][1].uri, cfg), None) if chosen else None
    if first is None:
        raise VaegenError(f"{chosen[0][1].uri if chosen else uri} holds no samples (members named <key>.<extension>)")
    image_choice(first, options, chosen[0][1].uri)
    label_ext = label_choice(first, options, chosen[0][1].uri)
    label_key = "" if label_ext is None else options.label_key or label_ext
    items = tuple(SourceItem(split, ref.uri, label_key=label_key) for split, ref in chosen)
    names = None
    if label_ext is not None:
        names = card_class_names(root, label_ext, cfg) or _numbered_names(items, cfg)
    return SourcePlan("webdataset", uri, items, names, fingerprint("webdataset", uri, items, refs, names, options))


# -- samples --------------------------------------------------------------------------------------------
def samples(uri: str, cfg: StorageConfig, only: frozenset[str] | None = None) -> Iterator[dict]:
    """A tar's samples as webdataset groups them: {'__key__': key, ext: bytes, ...}, read as one stream. With
    `only`, a sample holds only those extensions' members, and a local tar's others are seeked over, never read."""
    try:
        with _open_tar(uri, cfg, seekable=only is not None) as tar:
            sample: dict | None = None
            for member in tar:
                if not member.isreg() or (member.name.startswith("__") and member.name.endswith("__")):
                    continue
                match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member.name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key}
                if only is None or ext in only:
                    sample[ext] = tar.extractfile(member).read()
                tar.members = []                       # a stream: keep no index of what went by
            if sample is not None:
                yield sample
    except (tarfile.TarError, EOFError, OSError) as e:
        raise VaegenError(f"cannot read tar {uri}: {str(e).splitlines()[0] or type(e).__name__}") from None


@contextmanager
def _open_tar(uri: str, cfg: StorageConfig, seekable: bool) -> Iterator[tarfile.TarFile]:
    """The tar as one forward stream; `seekable` on a local file: opened so that skipped members are seeked over
    (on S3 a seek is a request, so it stays a stream)."""
    if seekable and not is_s3(uri):
        with open_file(uri, cfg) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            yield tar
        return
    with open_stream(uri, cfg) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        yield tar


def image_choice(sample: dict, options: IngestOptions, uri: str) -> str | None:
    """The sample's image extension: the first of --image-key's that it has."""
    for ext in options.image_key.lower().split(";"):
        if ext in sample:
            return ext
    if uri:
        seen = ", ".join(k for k in sample if k != "__key__")
        raise VaegenError(f"{uri}: sample {sample['__key__']} has no {options.image_key.replace(';', ' or ')} "
                          f"member (--image-key); its keys: {seen}")
    return None


def label_choice(sample: dict, options: IngestOptions, uri: str) -> str | None:
    """The label's extension, or None when the tars are unlabelled (no --label-key and no `cls`, or '')."""
    if options.label_key == "":
        return None
    wanted = (options.label_key or "cls").lower().split(";")
    for ext in wanted:
        if ext in sample:
            return ext
    if options.label_key is None:
        return None
    seen = ", ".join(k for k in sample if k != "__key__")
    raise VaegenError(f"{uri}: sample {sample['__key__']} has no {options.label_key.replace(';', ' or ')} member "
                      f"(--label-key); its keys: {seen}")


def sample_label(sample: dict, ext: str) -> int:
    """The label a member holds: decimal text, or a .json's `label` field; ValueError if neither."""
    if ext == "json":
        record = json.loads(sample[ext])
        value = record.get("label") if isinstance(record, dict) else None
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"its .json has label {value!r}, not an integer")
        label = value
    else:
        label = int(sample[ext].decode().strip())
    if label < 0:
        raise ValueError(f"label {label} is below 0")
    return label


def card_class_names(root: str, label_ext: str, cfg: StorageConfig) -> tuple[str, ...] | None:
    """The class names the dataset card beside the tars (or above their data/ folder) declares for `label_ext`."""
    from huggingface_hub import DatasetCard
    folders = [root] + ([root.rsplit("/", 1)[0]] if root.endswith("/data") else [])
    for folder in folders:
        card = file_info(f"{folder}/README.md", cfg)
        if card is None:
            continue
        info = DatasetCard(read_file(card.uri, cfg).decode("utf-8", "replace")).data.to_dict().get("dataset_info")
        for config in info if isinstance(info, list) else [info or {}]:
            for feature in config.get("features") or []:
                dtype = feature.get("dtype") if isinstance(feature, dict) else None
                if feature.get("name") == label_ext and isinstance(dtype, dict) and "class_label" in dtype:
                    names = dtype["class_label"].get("names", {})
                    return tuple(str(names[k]) for k in sorted(names, key=int)) if isinstance(names, dict) \
                        else tuple(map(str, names))
    return None


def _numbered_names(items, cfg: StorageConfig) -> tuple[str, ...]:
    high = -1
    for item in items:
        exts = item.label_key.split(";")
        for sample in samples(item.uri, cfg, only=frozenset(exts)):
            ext = next((e for e in exts if e in sample), None)
            try:
                high = max(high, sample_label(sample, ext)) if ext is not None else high
            except (ValueError, UnicodeDecodeError):
                continue                                   # read_item names it
    if high >= MAX_CLASSES:
        raise VaegenError(f"input has label {high}: at most {MAX_CLASSES:,} classes (labels 0..{MAX_CLASSES - 1})")
    return tuple(str(i) for i in range(high + 1))


def read_tar_item(item: SourceItem, cfg: StorageConfig, options: IngestOptions) -> Iterator[SourceImage]:
    """Every sample of the tar (or of its sample range [start, stop)), in order."""
    label_exts = item.label_key.split(";") if item.label_key else []
    for index, sample in enumerate(samples(item.uri, cfg)):
        if index < item.start or (0 <= item.stop <= index):
            continue
        name = f"{item.uri}:{sample['__key__']}"
        label = -1
        if label_exts:
            ext = next((e for e in label_exts if e in sample), None)
            if ext is None:
                yield missing_label(item, sample, options)
                continue
            try:
                label = sample_label(sample, ext)
            except (ValueError, UnicodeDecodeError) as e:
                yield bad_image(name, f"bad label ({e})", -1, options)
                continue
        ext = image_choice(sample, options, "")
        if ext is None:
            seen = ", ".join(k for k in sample if k != "__key__")
            yield bad_image(name, f"no {options.image_key.replace(';', ' or ')} member; its keys: {seen}", label,
                            options)
            continue
        yield decode_image(sample[ext], f"{name}.{ext}", label, options)


def missing_label(item: SourceItem, sample: dict, options: IngestOptions) -> SourceImage:
    """A labelled dataset's sample without its label: skipped with --skip-bad, else the one line that says why the
    dataset is labelled and how to ingest it unlabelled."""
    wanted = item.label_key.replace(";", " or ")
    why = (f"(--label-key {options.label_key})" if options.label_key else
           f"(the first sample has a {wanted}, so the dataset is labelled: --label-key {item.label_key})")
    if options.skip_bad:
        return SourceImage(f"{item.uri}:{sample['__key__']}", None, -1, f"no {wanted} member {why}")
    seen = ", ".join(k for k in sample if k != "__key__")
    raise VaegenError(f"{item.uri}: sample {sample['__key__']} has no {wanted} member {why}; its keys: {seen}. "
                      "Give every sample one, or pass --label-key '' to ingest all of them unlabelled")
