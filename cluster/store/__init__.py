"""Storage: the root (local folder or S3), every key's name, the model registry."""
