"""The output formats by name: which writer a job's spec uses, and what encodes its images."""
from cluster.generate.writers.parquet import ParquetShardWriter
from cluster.generate.writers.rows import ShardWriter
from cluster.generate.writers.tar import JpegTarShardWriter, PngTarShardWriter, jpeg_tar_writer

WRITERS: dict[str, type[ShardWriter]] = {"parquet": ParquetShardWriter, "png": PngTarShardWriter,
                                         "jpeg": JpegTarShardWriter}


def writer_for(spec) -> type[ShardWriter]:
    """The writer class of a job's spec (a GenerateConfig): its format's, with the spec's settings for it."""
    return jpeg_tar_writer(spec.jpeg_quality) if spec.format == "jpeg" else WRITERS[spec.format]


def image_encoder(spec, device: str = "cpu") -> dict | None:
    """What encodes a job's images (library, version, settings) when its workers run on `device`: what its
    manifest records. None for Parquet, whose PNGs are stored-deflate (no encoder library or setting to record)."""
    encoder = getattr(writer_for(spec), "encoder", None)
    return None if encoder is None else encoder(device)
