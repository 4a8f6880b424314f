"""Caption cleaning before T5: PixArt-α's `clean_caption` (from DeepFloyd IF), applied twice, as its
T5Embedder does to every training caption and diffusers' PixArt pipelines do to prompts (their default
`clean_caption=True`). It runs diffusers' own implementation, so that a caption is cleaned the same way in
training, in our sampler and in an exported pipeline, and an official checkpoint sees the text it was
trained on.
"""
from __future__ import annotations

import warnings
from functools import cache

from pixart.errors import PixArtError


@cache
def _cleaner():
    from diffusers import PixArtAlphaPipeline
    from diffusers.utils import is_bs4_available, is_ftfy_available

    if not (is_bs4_available() and is_ftfy_available()):  # diffusers would only lowercase, and say so in a log
        raise PixArtError("caption cleaning needs beautifulsoup4 and ftfy: pip install beautifulsoup4 ftfy")
    from bs4 import MarkupResemblesLocatorWarning

    # a caption that looks like a file name or URL is still text; diffusers' cleaner reads no pipeline state
    warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)
    return object.__new__(PixArtAlphaPipeline)


def clean_caption(text: str) -> str:
    """One caption as PixArt feeds it to T5: urls, markup, handles, ids and junk punctuation gone, lowercased."""
    return _cleaner()._text_preprocessing(str(text), clean_caption=True)[0]
