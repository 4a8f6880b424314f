"""The frozen encoders a stage needs: the feature cache's (for validation prompts and decoding) or
the config's (raw shards encoded on the fly). Loaded by the same code as T5-XXL and the SD VAE."""
from __future__ import annotations

from pixart.data.manifest import Manifest, find_manifest, shard_folder
from pixart.data.shards import resolve_shards
from pixart.errors import PixArtError

from .config import EncodersSection, TrainConfig


def cache_manifest(cfg: TrainConfig) -> Manifest | None:
    """The manifest beside the first feature shard, local or http(s)/s3 (None for raw or `pipe:` shards)."""
    try:
        shards = resolve_shards(cfg.data.shards)
    except PixArtError as e:
        raise PixArtError(f"data.shards: {e}") from None
    folder = shard_folder(shards[0]) if shards else None
    return find_manifest(folder) if folder is not None else None


def load_text_encoder(enc: EncodersSection, manifest: Manifest | None, device: str = "cpu"):
    """A config's `encoders.text_encoder`, else the one its feature cache was encoded with (and that cache's caption
    length and dtype)."""
    from pixart.encoders.text import TextEncoder, TextEncoderConfig

    path = text_encoder_source(enc, manifest)
    dtype = manifest.dtype if manifest and not enc.text_encoder else enc.dtype
    max_length = manifest.max_length if manifest and not enc.text_encoder else enc.max_length
    return TextEncoder(TextEncoderConfig(path=path, dtype=dtype, max_length=max_length, device=device))


def load_autoencoder(enc: EncodersSection, manifest: Manifest | None, device: str = "cpu",
                     scale: float | None = None):
    """The VAE, or the toy pixel autoencoder a cache names as `pixel:<factor>[:<lowpass>]`. The scaling factor is the
    cache's, else `scale` (a checkpoint's encoders.json), else the VAE's own (1 for the pixel one)."""
    from pixart.encoders.pixel import PixelAutoencoder
    from pixart.encoders.vae import ImageAutoencoder, VAEConfig

    source = autoencoder_source(enc, manifest)
    scale = manifest.scaling_factor if manifest and not enc.vae else scale
    if source.startswith("pixel:"):
        return PixelAutoencoder.from_id(source, device=device, scale_factor=scale or 1.0)
    return ImageAutoencoder(VAEConfig(path=source, device=device, scale_factor=scale))


def text_encoder_source(enc: EncodersSection, manifest: Manifest | None) -> str:
    """Where the text encoder comes from; checked before the run folder is written, loaded when needed."""
    path = enc.text_encoder or (manifest.text_encoder if manifest else None)
    if path is None:
        raise PixArtError("encoders.text_encoder: needed (raw shards or validation prompts) and no feature manifest "
                          "names one")
    return path


def autoencoder_source(enc: EncodersSection, manifest: Manifest | None) -> str:
    """Where the VAE (or pixel autoencoder) comes from, for decoding validation grids or encoding raw shards."""
    source = enc.vae or (manifest.image_encoder if manifest else None)
    if source is None:
        raise PixArtError("encoders.vae: needed (raw shards or validation images) and no feature manifest names one")
    return source


def check_named(enc: EncodersSection, manifest: Manifest | None, text: bool) -> None:
    """Before the run folder is written: the decoder (and, with `text`, the text encoder) that validation grids or
    LPIPS will load is named by the config or the feature manifest."""
    autoencoder_source(enc, manifest)
    if text:
        text_encoder_source(enc, manifest)
