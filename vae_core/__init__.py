"""vae_core: the VAE itself, in pure PyTorch (+ NumPy, Pillow). Never imports Ray, pyarrow or boto3."""

__version__ = "0.1.0"
