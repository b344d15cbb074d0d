"""The image encoders of the tar formats: PNG (NumPy-built chunks, libdeflate) decodes to exactly its pixels
in every reader; JPEG (torchvision's libjpeg-turbo) stays within a PSNR bound; both are
deterministic; `vaegen generate --format png|jpeg` jobs read in `webdataset` as `.to_tuple(<image>, "cls")`."""
import hashlib
import io
import json
import os
import tarfile
import warnings
from importlib.metadata import version

import numpy as np
import pytest
import torch
from conftest import rng_images, start_local_ray
from generate_support import publish_tiny_model
from PIL import Image
from test_writers import batches, write
from torchvision.io import decode_image

from cluster.generate.plan import plan_job
from cluster.generate.writers import (
    JpegTarShardWriter,
    PngTarShardWriter,
    image_encoder,
    jpeg_tar_writer,
    tar_member_count,
    writer_for,
)
from cluster.store.storage import open_storage
from vae_core.config import StorageConfig
from vae_core.errors import VaegenError
from vae_core.images import jpeg_files, png_bytes, png_encoder, png_files
from vae_core.use_configs import GenerateConfig

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 7, 300), (3, 1, 1)]


def pixels_by_pil(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        array = np.asarray(im)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def pixels_by_torchvision(data: bytes) -> np.ndarray:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8)).numpy()     # checks CRCs, adler32


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, in dB."""
    mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


def fashion_like(small_fashion, channels: int) -> np.ndarray:
    """Real Fashion-MNIST images; in 3 channels, tinted and padded to 32x32 (a CIFAR-sized colour image)."""
    grey = small_fashion[1][0][:64]
    if channels == 1:
        return grey
    rgb = np.zeros((len(grey), 3, 32, 32), np.uint8)
    tint = np.array([1.0, 0.75, 0.45], np.float32)[None, :, None, None]
    rgb[:, :, 2:30, 2:30] = (grey.astype(np.float32) * tint).astype(np.uint8)
    return rgb


@pytest.mark.parametrize("shape", SHAPES)
def test_png_files_decode_to_exactly_their_pixels_in_pil_and_torchvision(shape):
    images = rng_images(5, shape)
    files = png_files(images)
    assert len(files) == 5
    for image, data in zip(images, files):
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.mode == ("L" if shape[0] == 1 else "RGB") and not im.info
        np.testing.assert_array_equal(pixels_by_pil(data), image)
        np.testing.assert_array_equal(pixels_by_torchvision(data), image)


def test_png_files_are_deterministic_whatever_the_batch():
    images = rng_images(9, (3, 32, 32), seed=3)
    files = png_files(images)
    assert files == png_files(images.copy())
    assert files[4:] == png_files(images[4:]) and png_bytes(images[2]) == files[2]
    assert png_files(images[:, :, ::-1][:, :, ::-1]) == files           # a strided view encodes the same


def test_png_files_refuse_other_channel_counts():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        png_files(rng_images(2, (2, 8, 8)))


def test_png_encoder_names_the_pinned_library_and_its_settings():
    assert png_encoder() == {"format": "png", "deflate": "libdeflate", "package": f"deflate {version('deflate')}",
                             "level": 4, "filter": "none"}
    assert PngTarShardWriter.encoder() == png_encoder()


def test_png_stays_about_as_small_as_pillow_zlib_level_6(small_fashion):
    """The faster deflate must not buy its speed with bigger files (what the PNG format shipped with before)."""
    images = small_fashion[0][0][:300]
    ours = sum(map(len, png_files(images)))
    theirs = 0
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image[0]).save(buf, format="PNG", compress_level=6)
        theirs += len(buf.getvalue())
    assert ours <= 1.05 * theirs


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_at_q95_decodes_close_to_its_pixels_with_its_channel_count(small_fashion, channels):
    images = fashion_like(small_fashion, channels)
    files = jpeg_files(images, quality=95)
    for data in files[:4]:
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.mode == ("L" if channels == 1 else "RGB")     # grey stays 1 channel
    decoded = np.stack([pixels_by_torchvision(data) for data in files])
    assert decoded.shape == images.shape
    # q95 keeps grey within 38 dB; colour loses more to 4:2:0 chroma subsampling (libjpeg's default, as with
    # img2dataset's encoder), yet a swapped or shifted channel would fall far below 27 dB
    assert psnr(decoded, images).min() > (38 if channels == 1 else 27)
    np.testing.assert_array_equal(np.stack([pixels_by_pil(data) for data in files]), decoded)


def test_jpeg_is_deterministic_from_numpy_or_torch_and_follows_its_quality(small_fashion):
    images = fashion_like(small_fashion, 3)
    files = jpeg_files(images, 95)
    assert files == jpeg_files(images.copy(), 95) == jpeg_files(torch.from_numpy(images), 95)
    low = jpeg_files(images, 50)
    assert sum(map(len, low)) < sum(map(len, files))
    assert psnr(np.stack([pixels_by_pil(d) for d in low]), images).mean() < psnr(
        np.stack([pixels_by_pil(d) for d in files]), images).mean()


def tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, as webdataset groups a tar's members."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.mark.parametrize("labels", [True, False])
def test_jpeg_tar_holds_jpg_cls_json_per_sample(labels):
    parts = batches(labels=labels)
    data = write(JpegTarShardWriter, parts)
    samples = tar_samples(data)
    assert list(samples) == [f"{i:010d}" for i in range(100, 110)]
    assert {tuple(sorted(s)) for s in samples.values()} == {("cls", "jpg", "json") if labels else ("jpg", "json")}
    assert tar_member_count(data) == (30 if labels else 20)
    for i, sample in zip(range(100, 110), samples.values()):
        meta = json.loads(sample["json"])
        assert meta["id"] == i and meta["label"] == (i % 3 if labels else None)
        if labels:
            assert sample["cls"] == str(i % 3).encode()
        assert pixels_by_pil(sample["jpg"]).shape == (1, 28, 28)
    assert data == write(JpegTarShardWriter, batches(labels=labels, size=3))        # batching does not matter


def test_the_spec_chooses_the_writer_and_its_quality():
    spec = GenerateConfig(model="m", count=10, format="jpeg", jpeg_quality=60)
    writer = writer_for(spec)
    assert writer is jpeg_tar_writer(60) and writer.quality == 60 and issubclass(writer, JpegTarShardWriter)
    assert writer_for(GenerateConfig(model="m", count=10, format="jpeg")) is JpegTarShardWriter
    assert writer_for(GenerateConfig(model="m", count=10, format="png")) is PngTarShardWriter
    assert image_encoder(spec) == {"format": "jpeg", "encoder": "libjpeg-turbo", "quality": 60,
                                   "package": image_encoder(spec)["package"]}
    assert image_encoder(GenerateConfig(model="m", count=10)) is None             # Parquet: stored PNG, no encoder choice
    low = write(writer, batches(labels=False))
    assert len(low) < len(write(JpegTarShardWriter, batches(labels=False)))
    with pytest.raises(VaegenError, match="--jpeg-quality=0 must be in 1..100"):
        GenerateConfig(model="m", count=10, format="jpeg", jpeg_quality=0)


def test_jpeg_quality_is_part_of_a_jpeg_job_id_only(tmp_path):
    storage = open_storage(StorageConfig(root=str(tmp_path)), for_writing=True)
    publish_tiny_model(storage, "tiny")

    def job(**kw) -> str:
        return plan_job(GenerateConfig(model="tiny", count=10, **kw), storage).job_id
    for fmt in ("parquet", "png"):                  # the flag does not move other formats' job ids
        assert job(format=fmt) == job(format=fmt, jpeg_quality=80)
    assert len({job(format="jpeg"), job(format="jpeg", jpeg_quality=80), job(format="png")}) == 3


@pytest.fixture(scope="module")
def wds_jobs(starts_ray, tmp_path_factory):
    """`vaegen generate` (the CLI) on one local root: a conditional model's samples as png and as jpeg, and an
    unconditional model's as jpeg."""
    from jobs.cli import main
    start_local_ray()
    root = str(tmp_path_factory.mktemp("wds") / "root")
    storage = open_storage(StorageConfig(root=root), for_writing=True)
    publish_tiny_model(storage, "cond", num_classes=10)
    publish_tiny_model(storage, "plain")
    jobs = {}
    for name, model, fmt in (("png", "cond", "png"), ("jpeg", "cond", "jpeg"), ("plain", "plain", "jpeg")):
        before = set(os.listdir(os.path.join(root, "outputs"))) if os.path.isdir(os.path.join(root, "outputs")) \
            else set()
        assert main(["generate", "--model", model, "--count", "30", "--shard-size", "12", "--format", fmt,
                     "--workers", "1", "--root", root, "--no-progress"]) == 0
        (job,) = set(os.listdir(os.path.join(root, "outputs"))) - before
        jobs[name] = os.path.join(root, "outputs", job)
    return jobs


def job_manifest(folder: str) -> dict:
    from cluster.store.layout import MANIFEST
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


@pytest.mark.parametrize("job, ext", [("png", "png"), ("jpeg", "jpg")])
def test_webdataset_reads_a_generated_job_as_image_and_class_without_warnings(wds_jobs, job, ext):
    import webdataset as wds
    folder = wds_jobs[job]
    manifest = job_manifest(folder)
    url = os.path.join(folder, manifest["shard_pattern"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = list(wds.WebDataset(url, shardshuffle=False).decode("pil").to_tuple(ext, "cls"))
        ids = [json.loads(meta)["id"] for (meta,) in wds.WebDataset(url, shardshuffle=False).to_tuple("json")]
    assert len(pairs) == 30 and ids == list(range(30))
    assert [label for _, label in pairs] == [i % 10 for i in range(30)]      # classes cycled over the ids
    assert all(isinstance(image, Image.Image) and image.size == (28, 28) for image, _ in pairs)
    if job == "png":                        # lossless: each shard's PNGs hold exactly the pixels its record hashed
        for shard in manifest["shards"]:
            with open(os.path.join(folder, shard["name"]), "rb") as f:
                samples = tar_samples(f.read())
            pixels = np.stack([pixels_by_torchvision(s["png"]) for s in samples.values()])
            assert hashlib.sha256(pixels.tobytes()).hexdigest() == shard["pixels_sha256"]


def test_an_unconditional_jpeg_job_has_no_cls(wds_jobs):
    import webdataset as wds
    folder = wds_jobs["plain"]
    url = os.path.join(folder, job_manifest(folder)["shard_pattern"])
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert len(samples) == 30 and all("cls" not in s and "jpg" in s and "json" in s for s in samples)
