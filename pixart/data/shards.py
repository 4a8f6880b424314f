"""Turn a user's SHARDS argument into a list of shard URLs.

Accepted everywhere a command takes SHARDS: a folder (its *.tar), a glob, a brace
pattern (`data/shard-{000000..000099}.tar`), a URL (`http(s)://...`, `pipe:...`, or an
fsspec URL: `s3://bucket/prefix/` lists the prefix's *.tar, and globs list too), or
several of these. Local paths are checked up front, so a typo is one clear error
before any work starts.
"""
from __future__ import annotations

import glob
import os
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from braceexpand import braceexpand

from pixart.errors import PixArtError

from .remote import is_fsspec, list_shards


def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def resolve_shards(specs: str | os.PathLike | list) -> list[str]:
    """Sorted, de-duplicated shard list; raises PixArtError naming a spec that matches nothing."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    shards: list[str] = []
    for spec in map(str, specs):
        if is_url(spec):
            found = []
            for url in braceexpand(spec):
                listed = is_fsspec(url) and (url.endswith("/") or glob.has_magic(url))
                found.extend(list_shards(url) if listed else [url])
            if not found:
                raise PixArtError(f"{spec}: no shards found")
            shards.extend(found)
            continue
        if Path(spec).is_dir():
            found = sorted(str(p) for p in Path(spec).glob("*.tar"))
        else:
            found = []
            for pattern in braceexpand(spec):
                if glob.has_magic(pattern):
                    found.extend(sorted(glob.glob(pattern)))
                elif Path(pattern).is_file():
                    found.append(pattern)
                else:
                    raise PixArtError(f"{pattern}: no such shard")
        if not found:
            raise PixArtError(f"{spec}: no shards found")
        shards.extend(found)
    return list(dict.fromkeys(shards))


def shard_name(url: str) -> str:
    """The shard's file name without `.tar`: the key for its sidecar outputs. For `pipe:CMD`, the last word
    of the command that names a `.tar` (`pipe:aws s3 cp s3://b/sa-000000.tar -` is `sa-000000`); for a URL, its
    path's (no query string); for a local path, its file name, spaces and all."""
    if url.startswith("pipe:"):
        try:
            words = shlex.split(url[5:])  # a presigned URL is quoted for its "&"
        except ValueError:
            words = url[5:].split()
        words = [w for w in words if ".tar" in w]
        if not words:
            raise PixArtError(f"{url}: the pipe: command names no .tar file, so its outputs would have no name")
        url = words[-1]
    if "://" in url:
        url = urlsplit(url).path
    name = url.rstrip("/").split("/")[-1]
    return name[:-4] if name.endswith(".tar") else name


def check_unique_names(urls: list[str]) -> list[str]:
    """Each shard's name, refusing two shards of one name: their sidecar outputs would overwrite each other."""
    seen: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        if name in seen:
            raise PixArtError(f"two input shards are both named {name}.tar: {seen[name]} and {url}; "
                              "their outputs would collide")
        seen[name] = url
    return list(seen)
