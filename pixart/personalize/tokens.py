"""The concept's word as one dedicated token: added to the tokenizer (whole word, so "coin" never splits), its row of
T5's input embedding taken from the concept file (T5-XXL has 28 unused rows past its tokenizer; a tokenizer without
spare rows gets the table grown). Prompts name the concept by its word; the super-category word must be one piece."""
from __future__ import annotations

import re

import torch
from torch import Tensor
from transformers import AddedToken

from pixart.encoders.captions import clean_caption
from pixart.errors import PixArtError

_WORD = re.compile(r"^[a-z][a-z0-9_]*$")


def check_new_name(name: str) -> None:
    """A new concept's name: a word that PixArt's caption cleaning, which every prompt goes through, keeps whole
    (it drops product-code-like words such as "sks1234", and turns "_" into a space in a caption with more than
    three of "-" and "_")."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", name):
        raise PixArtError(f"--concept {name!r}: a new concept's name is one lower-case word of letters and digits")
    if clean_caption(name) != name:
        raise PixArtError(f"--concept {name!r}: PixArt's caption cleaning turns it into {clean_caption(name)!r}; "
                          "choose another word")


def super_token(tokenizer, word: str) -> int:
    """The id of the super-category word, which must be one piece of the tokenizer's vocabulary."""
    pieces = tokenizer.tokenize(word)
    if len(pieces) != 1:
        raise PixArtError(f"--super {word!r}: the tokenizer splits it into {len(pieces)} pieces {pieces}; "
                          "choose a super-category word that is one token")
    return tokenizer.convert_tokens_to_ids(pieces[0])


def add_concept_token(tokenizer, text_model, name: str) -> int:
    """Add `name` as one token (a whole lower-case word, eating the space before it as T5's pieces do);
    returns its id, growing the embedding table when the tokenizer has no spare row for it."""
    if not _WORD.match(name):
        raise PixArtError(f"concept {name!r}: a concept name is one lower-case word (letters, digits, _)")
    if name not in tokenizer.get_added_vocab() and (name in tokenizer.get_vocab() or len(tokenizer.tokenize(name)) < 2):
        raise PixArtError(f"--concept {name!r} is already a word of the tokenizer's vocabulary, which the concept "
                          "would take over in every prompt; choose a new word")
    tokenizer.add_tokens([AddedToken(name, single_word=True, lstrip=True, rstrip=False, normalized=False)])
    token_id = tokenizer.convert_tokens_to_ids(name)
    rows = text_model.get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        text_model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    return token_id


def set_embedding(text_model, token_id: int, embedding: Tensor) -> None:
    with torch.no_grad():
        text_model.get_input_embeddings().weight[token_id] = embedding.to(text_model.dtype)


def embed_with(text_model, ids: Tensor, token_id: int, embedding: Tensor) -> Tensor:
    """T5's input embeddings of `ids` with the concept token's row replaced by `embedding` (which may require
    grad): how training reaches the one row it learns while the table stays frozen."""
    table = text_model.get_input_embeddings()
    out = table(ids)
    return torch.where((ids == token_id)[..., None], embedding.to(out.dtype), out)


def _word(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")


def mentions(prompt: str, name: str) -> bool:
    return _word(name).search(prompt) is not None


def as_super(prompt: str, words: dict[str, str]) -> str:
    """The prompt with each concept's word replaced by its super-category word (`words`: name -> super)."""
    for name, super_word in words.items():
        prompt = _word(name).sub(super_word, prompt)
    return prompt
