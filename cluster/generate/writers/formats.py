"""The output formats by name: which writer a job's spec uses, what encodes its images, and what reads its
shards back."""
from cluster.generate.writers.parquet import ParquetShardWriter
from cluster.generate.writers.rows import ShardRows, ShardWriter
from cluster.generate.writers.tar import JpegTarShardWriter, PngTarShardWriter, jpeg_tar_writer

WRITERS: dict[str, type[ShardWriter]] = {"parquet": ParquetShardWriter, "png": PngTarShardWriter,
                                         "jpeg": JpegTarShardWriter}


def writer_for(spec) -> type[ShardWriter]:
    """The writer class of a job's spec (a GenerateConfig): its format's, with the spec's settings for it."""
    return jpeg_tar_writer(spec.jpeg_quality) if spec.format == "jpeg" else WRITERS[spec.format]


def image_encoder(spec) -> dict | None:
    """What encodes a job's images (library, version, settings): what its manifest records. None for Parquet, whose PNGs are stored-deflate (no encoder library or setting to record)."""
    encoder = getattr(writer_for(spec), "encoder", None)
    return None if encoder is None else encoder()


def read_shard_rows(data: bytes, fmt: str) -> ShardRows:
    """The rows of one output shard of format `fmt` (a job manifest's "format"), read by its writer's reader:
    ids, labels (None when the shard has none) and uint8 CHW images."""
    return WRITERS[fmt].read_rows(data)
