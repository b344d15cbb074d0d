"""Shard writers: one class per output format, one interface (rows.ShardWriter). A writer collects decoded rows in
memory and `close()` returns the finished shard as bytes, checked; the caller publishes it as one object. Nothing
here touches storage, so an exception anywhere in a writer publishes nothing.

Every format is deterministic: the same rows give the same bytes for a given encoder and version (fixed Parquet
settings; tar members with a fixed mtime, owner and mode, in id order; PNGs without timestamps, from a pinned
libdeflate; JPEGs from torchvision's libjpeg-turbo: image_encoder names it)."""
from cluster.generate.writers.formats import WRITERS, image_encoder, read_shard_rows, writer_for
from cluster.generate.writers.parquet import (
                      PARQUET_MAX_IMAGE_BYTES,
                      ParquetShardWriter,
                      decode_image_column,
                      hf_features,
                      parquet_image_bytes,
                      png_images,
)
from cluster.generate.writers.rows import (
                      DecodedBatch,
                      ShardInfo,
                      ShardRows,
                      ShardWriter,
                      concat_batches,
                      sample_key,
)
from cluster.generate.writers.tar import (
                      JpegTarShardWriter,
                      PngTarShardWriter,
                      TarShardWriter,
                      jpeg_tar_writer,
                      latent_texts,
                      tar_member_count,
)

__all__ = ["WRITERS", "DecodedBatch", "JpegTarShardWriter", "PARQUET_MAX_IMAGE_BYTES", "ParquetShardWriter",
           "PngTarShardWriter", "ShardInfo", "ShardRows", "ShardWriter", "TarShardWriter", "image_encoder",
           "jpeg_tar_writer", "writer_for", "concat_batches", "decode_image_column", "hf_features", "latent_texts",
           "parquet_image_bytes", "png_images", "read_shard_rows", "sample_key", "tar_member_count"]
