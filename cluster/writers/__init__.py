"""Shard writers: one class per output format, one interface (rows.ShardWriter). A writer collects decoded rows in
memory and `close()` returns the finished shard as bytes, checked; the caller publishes it as one object. Nothing
here touches storage, so an exception anywhere in a writer publishes nothing.

Every format is deterministic: the same rows give the same bytes (fixed Parquet settings; tar members with a fixed
mtime, owner and mode, in id order; PNGs without timestamps)."""
from .parquet import (PARQUET_MAX_IMAGE_BYTES, ParquetShardWriter, hf_features, netpbm_images,
                      parquet_image_bytes)
from .rows import DecodedBatch, ShardInfo, ShardWriter, concat_batches, sample_key
from .tar import PngTarShardWriter, latent_texts, tar_member_count

WRITERS: dict[str, type[ShardWriter]] = {"parquet": ParquetShardWriter, "png": PngTarShardWriter}

__all__ = ["WRITERS", "DecodedBatch", "PARQUET_MAX_IMAGE_BYTES", "ParquetShardWriter", "PngTarShardWriter",
           "ShardInfo", "ShardWriter", "concat_batches", "hf_features", "latent_texts", "netpbm_images",
           "parquet_image_bytes", "sample_key", "tar_member_count"]
