"""Frozen pretrained parts PixArt-alpha trains against: the T5 text encoder and the SD VAE."""
from .captions import clean_caption
from .loading import EncoderLoadError
from .pixel import PixelAutoencoder
from .text import TextEncoder, TextEncoderConfig
from .tiny import TINY_VAE_DOWNSAMPLE, make_tiny_t5, make_tiny_vae
from .vae import ImageAutoencoder, LatentDist, VAEConfig

__all__ = ["clean_caption", "EncoderLoadError", "TextEncoder", "TextEncoderConfig", "ImageAutoencoder",
           "PixelAutoencoder", "LatentDist", "VAEConfig", "make_tiny_t5", "make_tiny_vae", "TINY_VAE_DOWNSAMPLE"]
