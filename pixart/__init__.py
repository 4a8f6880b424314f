"""pixart: PixArt-alpha-style text-to-image diffusion transformers."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pixart")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.1.0+unknown"
