"""Two sources of plain files: Fashion-MNIST's IDX files (items: row ranges) and a folder of images, labelled
`<folder>/<class>/<image>` or flat (unlabelled), optionally below split folders (train/, test/, ...), local or
under an s3:// prefix (items: one image file each)."""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image

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
    list_files,
    read_file,
    shaped_array,
)
from cluster.data.source_parquet import SPLIT_KEYWORDS, split_order
from vae_core.config import MAX_CLASSES, StorageConfig
from vae_core.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    FASHION_MNIST_LABELS,
    gunzip_if_gzip,
    parse_idx,
)
from vae_core.errors import VaegenError

IDX_ROWS_PER_ITEM = 10_000


# -- Fashion-MNIST ---------------------------------------------------------------------------------------
def plan_fashion_mnist(uri: str | None, cfg: StorageConfig, options: IngestOptions) -> SourcePlan:
    """Both splits in row ranges of IDX_ROWS_PER_ITEM; the label files are read here (they are small), the image
    files only by read_item."""
    folder = absolute(uri or FASHION_MNIST_DIR)
    items, files = [], []
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
        refs = [file_info(f"{folder}/{name}", cfg) for name in (image_file, label_file)]
        if None in refs:
            if not any(f.uri.startswith(folder + "/") for f in _listing_or_empty(folder, cfg)):
                raise VaegenError(f"Fashion-MNIST folder {folder} does not exist "
                                  "(apt-get install dataset-fashion-mnist, or pass its path)")
            missing = (image_file, label_file)[refs.index(None)]
            raise VaegenError(f"missing dataset file: {folder}/{missing}")
        files += refs
        labels = _read_idx(refs[1].uri, cfg)
        if labels.ndim != 1:
            raise VaegenError(f"{refs[1].uri} holds {labels.shape}, not one label per image")
        if labels.max(initial=0) >= len(FASHION_MNIST_LABELS):
            raise VaegenError(f"{split}: label {labels.max()} is outside the 10 Fashion-MNIST classes")
        items += [SourceItem(split, refs[0].uri, start, min(start + IDX_ROWS_PER_ITEM, len(labels)), raw=True)
                  for start in range(0, len(labels), IDX_ROWS_PER_ITEM)]
    return SourcePlan("fashion-mnist", uri or FASHION_MNIST_DIR, tuple(items), FASHION_MNIST_LABELS,
                      fingerprint("fashion-mnist", folder, items, files, FASHION_MNIST_LABELS, options))


def _listing_or_empty(folder: str, cfg: StorageConfig):
    try:
        return list_files(folder, cfg)
    except VaegenError:
        return []


def _read_idx(uri: str, cfg: StorageConfig) -> np.ndarray:
    """An IDX file's array. The last four files read (a split's images and labels, two splits) are kept, by name,
    size and time: each task reads its range of the same gzipped file, which it would otherwise unzip again."""
    ref = file_info(uri, cfg)
    return _parsed_idx(uri, cfg, *((ref.size, ref.mtime_ns) if ref else (-1, -1)))


@lru_cache(maxsize=4)
def _parsed_idx(uri: str, cfg: StorageConfig, size: int, mtime_ns: int) -> np.ndarray:
    return parse_idx(gunzip_if_gzip(read_file(uri, cfg), uri), uri)


def read_fashion_mnist_item(item: SourceItem, cfg: StorageConfig, options: IngestOptions) -> Iterator[SourceImage]:
    folder, _, image_file = item.uri.rpartition("/")
    label_file = dict(FASHION_MNIST_FILES.values())[image_file]
    images, labels = _read_idx(item.uri, cfg), _read_idx(f"{folder}/{label_file}", cfg)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise VaegenError(f"{item.split}: images {images.shape} and labels {labels.shape} do not match")
    stop = len(labels) if item.stop < 0 else item.stop
    for row in range(item.start, stop):
        yield shaped_array(images[row][None], f"{item.uri} row {row}", int(labels[row]), options)


# -- a folder of images ------------------------------------------------------------------------------------
def image_suffixes() -> set[str]:
    """Every file name extension Pillow can open."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def plan_image_folder(uri: str, cfg: StorageConfig, options: IngestOptions) -> SourcePlan:
    """`<uri>/<class>/.../<image>` (labelled, classes sorted by name) or `<uri>/<image>` (unlabelled): one item
    per image file, any format Pillow opens; other files (and names starting with '.' or '_') are skipped.
    Top-level folders named as splits (`train/`, `test/`, `validation/` and `datasets`' other keywords for them,
    such as `val/`) are splits, each holding classes or flat images as above, as `datasets`' imagefolder reads
    them; otherwise every image is in --split."""
    folder = absolute(uri)
    suffixes = image_suffixes()
    # A file name's suffix from its last '.' (a '.' only in a folder's name gives a slice with a '/': no suffix).
    files = [f for f in list_files(folder, cfg) if f.uri[f.uri.rfind("."):].lower() in suffixes]
    if not files:
        raise VaegenError(f"image folder {uri} holds no images (<folder>/<class>/<image>.png, or "
                          "<folder>/<image>.png unlabelled)")
    splits, relative = _folder_splits(uri, [f.uri[len(folder) + 1:] for f in files], options.split)
    labels, label_names = _folder_labels(uri, relative)
    rank = {split: split_order(split) for split in set(splits)}
    order = sorted(zip(map(rank.__getitem__, splits), labels, relative, range(len(files)), strict=True))
    items = tuple(SourceItem(splits[i], files[i].uri, 0, 1, label) for _, label, _, i in order)   # one image each
    return SourcePlan("image-folder", uri, items, label_names,
                      fingerprint("image-folder", folder, items, files, label_names, options))


SPLIT_FOLDERS = {keyword: split for split, keywords in SPLIT_KEYWORDS.items() for keyword in keywords}


def _folder_splits(uri: str, relative: list[str], default: str) -> tuple[list[str], list[str]]:
    """Each image's split and its path below the split's folder: the top-level folders when one of them is named
    as a split (then every image must be in one), else `default` and the path as it is."""
    tops = [r.split("/", 1)[0] if "/" in r else None for r in relative]
    if not any(t is not None and t.lower() in SPLIT_FOLDERS for t in tops):
        return [default] * len(relative), relative
    for top, path in zip(tops, relative, strict=True):
        if top is None or top.lower() not in SPLIT_FOLDERS:
            split_folder = next(t for t in tops if t is not None and t.lower() in SPLIT_FOLDERS)
            raise VaegenError(f"image folder {uri} has a split folder ({split_folder}/) and {path} outside any: "
                              f"put every image under a split folder ({', '.join(SPLIT_KEYWORDS)}), or none")
    return [SPLIT_FOLDERS[t.lower()] for t in tops], [r.split("/", 1)[1] for r in relative]


def _folder_labels(uri: str, relative: list[str]) -> tuple[list[int], tuple[str, ...] | None]:
    """Each image's label and the class names: `<class>/.../<image>` labelled, `<image>` unlabelled (-1)."""
    nested = ["/" in r for r in relative]
    if not any(nested):
        return [-1] * len(relative), None
    if not all(nested):
        top, sub = relative[nested.index(False)], relative[nested.index(True)]
        raise VaegenError(f"image folder {uri} holds images both at its top ({top}) and in subfolders ({sub}): "
                          "put every image in a class subfolder (labelled) or all at the top (unlabelled)")
    classes = sorted({r.split("/", 1)[0] for r in relative})
    if len(classes) > MAX_CLASSES:
        raise VaegenError(f"image folder {uri} has {len(classes):,} class subfolders: at most {MAX_CLASSES:,}")
    index = {c: i for i, c in enumerate(classes)}
    return [index[r.split("/", 1)[0]] for r in relative], tuple(classes)


def read_image_file_item(item: SourceItem, cfg: StorageConfig, options: IngestOptions) -> Iterator[SourceImage]:
    try:
        data = read_file(item.uri, cfg)
    except VaegenError as e:                           # gone or unreadable since it was listed
        yield bad_image(item.uri, e, item.label, options)
        return
    yield decode_image(data, item.uri, item.label, options)
