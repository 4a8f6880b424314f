"""Turn a user's SHARDS argument into a list of shard URLs.

Accepted everywhere a command takes SHARDS: a folder (its *.tar and *.tar.gz: the readers unpack gzip),
a glob, a brace pattern (`data/shard-{000000..000099}.tar`), a URL (`http(s)://...`, `pipe:...`, or an
fsspec URL: `s3://bucket/prefix/` lists the prefix's *.tar and *.tar.gz, and globs list too), or
several of these. Local paths are checked up front, so a typo is one clear error
before any work starts. A job's input shard is identified (`input_id`, `same_input`) so that a
rerun notices a shard regenerated under the same name, and work splits over ranks by `rank_and_world`.
"""
from __future__ import annotations

import glob
import os
import shlex
from pathlib import Path
from urllib.parse import urlsplit

from braceexpand import braceexpand

from pixart.errors import PixArtError

from .manifest import file_sha256
from .remote import SHARD_SUFFIXES, is_fsspec, list_shards, remote_identity


def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def resolve_shards(specs: str | os.PathLike | list) -> list[str]:
    """Sorted, de-duplicated shard list of paths, folders, globs, brace patterns, URLs and object-store prefixes;
    raises PixArtError naming a spec that matches nothing."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    shards: list[str] = []
    for spec in map(str, specs):
        if is_url(spec):
            found = []
            for url in braceexpand(spec):
                listed = is_fsspec(url) and (glob.has_magic(url) or not url.endswith(SHARD_SUFFIXES))  # a prefix
                found.extend(list_shards(url) if listed else [url])
            if not found:
                raise PixArtError(f"{spec}: no shards found")
            shards.extend(found)
            continue
        if Path(spec).is_dir():
            found = sorted(str(p) for ext in SHARD_SUFFIXES for p in Path(spec).glob(f"*{ext}"))
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


def rank_and_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world size) of a job split over nodes: the arguments, else $RANK and $WORLD_SIZE, else (0, 1)."""
    def env(name: str, default: int) -> int:
        value = os.environ.get(name)
        try:
            return default if value is None else int(value)
        except ValueError:
            raise PixArtError(f"{name}={value!r} is not an integer") from None

    rank = env("RANK", 0) if rank is None else rank
    world = env("WORLD_SIZE", 1) if world is None else world
    if not 0 <= rank < world:
        raise PixArtError(f"RANK {rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def input_id(url: str) -> dict:
    """What identifies an input shard on resume. Local files: size and mtime_ns, checked on every
    run for free (`input_record` also keeps the sha256, so a copy with a new mtime but the same
    bytes is recognised without redoing the work). URLs: the URL with its ETag (or size and
    modification time), so a shard changed under the same URL is redone."""
    if is_url(url):
        return remote_identity(url)
    st = os.stat(url)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_record(url: str) -> dict:
    """`input_id` as a job records it when it starts on the input: with the sha256 of a local file."""
    return input_id(url) if is_url(url) else {**input_id(url), "sha256": file_sha256(url)}


def same_input(was: dict, url: str, now: dict | None = None) -> dict | None:
    """The input's identity now (`now`, when already known) when it is the one `was` describes (for a
    local file with a new mtime but the same bytes, the identity to record instead); None when it changed."""
    now = input_id(url) if now is None else now
    if all(was.get(k) == v for k, v in now.items()):
        return was
    if not is_url(url) and was.get("bytes") == now["bytes"] and was.get("sha256") == file_sha256(url):
        return {**now, "sha256": was["sha256"]}
    return None
