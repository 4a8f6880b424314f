"""`extract-features`: VAE latents and T5 features of raw shards, cached as sidecar shards.

Training on cached features skips the two frozen encoders (T5-XXL alone is 4.7B parameters),
so the cache must be right: `DIR/manifest.json` names what made it, finished shards are kept
across kills (`DIR/.done/<shard>.json` + the tar renamed into place), and a cache is
"complete" only when every shard is. Work is split by shard: over nodes by RANK/WORLD_SIZE
(shard i to rank i % world) and over local worker processes (`workers`), each of which
loads the encoders once.

Text features are stored compactly: only the valid tokens (n, D), in the encoder's dtype
(bf16 by default), instead of PixArt's padded (120, 4096) fp32 npz per image.

A finished shard is reused only while its input is the one it was made from (`input_id`), and
an input tar that breaks off early is not finished (a rerun retries it) unless `accept_damaged`;
one of which nothing could be read is never finished.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_pipelines.features_encode import Job, ShardResult, encode_shard, load_encoders
from pixart.atomic import atomic_write, check_out_folder, remove_dead_writers
from pixart.data.manifest import MANIFEST, Manifest, ShardEntry, config_hash, file_sha256
from pixart.data.shards import check_unique_names, input_record, is_url, rank_and_world, resolve_shards, same_input
from pixart.errors import PixArtError
from pixart.lifetime import die_with
from pixart.progress import ShardBar

DONE = ".done"  # one record per finished shard: the ground truth the manifest is rebuilt from
MANIFEST_EVERY_S = 30.0  # how often a running job rewrites manifest.json (the records above stay the truth)
DEFAULT_RESOLUTION = 256


@dataclass
class FeatureConfig:
    text_encoder: str
    vae: str | None = None
    pixel_autoencoder: int | None = None  # factor f of the space-to-depth autoencoder (toy demo)
    pixel_lowpass: int | None = None  # its k x k lowest DCT frequencies per f x f block kept (None: all pixels)
    pixel_scale: float = 1.0  # its scaling factor (model latents = pixels * scale), recorded like a VAE's
    captions: tuple[str, ...] = ("txt",)
    captions_dir: str | None = None
    resolution: int | None = None  # square side; default DEFAULT_RESOLUTION unless `buckets`
    buckets: str | None = None  # aspect-bucket table name, e.g. "ms512"
    batch_size: int = 16  # recorded: a caption's features depend on its batch's padding at float rounding
    workers: int = 1
    dtype: str = "bf16"  # T5 compute and stored text dtype; latents are always fp32
    max_length: int = 120
    device: str = "cpu"
    text_encoder_subfolder: str | None = None
    tokenizer: str | None = None
    vae_subfolder: str | None = None
    local_files_only: bool = False
    accept_damaged: bool = False  # keep what a broken-off input tar yielded and mark it complete


@dataclass
class Extraction:
    manifest: Manifest
    results: list[ShardResult] = field(default_factory=list)  # shards encoded and kept by this call
    damaged: list[ShardResult] = field(default_factory=list)  # broken-off or unreadable inputs left unfinished
    seconds: float = 0.0

    def describe(self, out) -> str:
        """One line: what was encoded, what the cache at `out` now holds, and what was damaged or missing."""
        m, n = self.manifest, sum(r.count for r in self.results)
        skipped = sum(len(r.skipped) for r in self.results)  # samples, never shards
        kept = [r for r in self.results if r.damaged]
        missing = {}
        for r in self.results:
            for src, k in r.missing_captions.items():
                missing[src] = missing.get(src, 0) + k
        state = "complete" if m.complete else f"{m.done} of {len(m.shards)} shards done" + (
            "" if self.damaged else " (other ranks may still run)")
        return (f"encoded {n} samples in {len(self.results)} shards ({skipped} skipped) in {self.seconds:.1f}s; "
                f"{out}: {m.count} samples, {state}"
                + (f"; samples without caption {missing}" if missing else "")
                + (f"; {_shards(self.damaged)} damaged: {_damage(self.damaged)}; rerun to retry"
                   + (", or --accept-damaged to keep what was read" if any(r.read for r in self.damaged) else "")
                   if self.damaged else "")
                + (f"; {_shards(kept)} damaged, kept as read: {_damage(kept)}" if kept else ""))


def _shards(results) -> str:
    return f"{len(results)} shard{'s' * (len(results) != 1)}"


def _damage(results) -> str:
    return ", ".join(f"{r.name} ({r.damaged})" for r in results)


def bucket_table(name: str) -> dict[str, tuple[int, int]]:
    """PixArt's aspect-bucket table by name: "ASPECT_RATIO_512", or "ms<side>" / "<side>" for any
    side (the tables the raw-shard loader buckets with), "<side>/24" for sizes in multiples of 24
    (`pixart.data.buckets.table_for`)."""
    from pixart.data.buckets import bucket_spec, table_for

    return {k: tuple(hw) for k, hw in table_for(*bucket_spec(name)).items()}


def _encoder_info(cfg: FeatureConfig) -> dict:
    """Ids, config hashes and sizes of both encoders from their configs alone (no weights loaded)."""
    from diffusers import AutoencoderKL
    from transformers import AutoConfig

    from pixart.encoders.loading import check_source, config_kind, load_error, local_config, pipeline_part

    def ident(p: str) -> str:
        return str(Path(p).resolve()) if Path(p).exists() else p

    te = check_source(cfg.text_encoder, "T5 text encoder")
    tsub = pipeline_part(te, cfg.text_encoder_subfolder, "text_encoder")  # as the loaders read a pipeline folder
    tcfg = local_config(te, tsub)
    if tcfg is None or "model_type" in tcfg:  # not a diffusers folder (a VAE's), which AutoConfig cannot read
        try:
            tcfg = AutoConfig.from_pretrained(te, subfolder=tsub or "", local_files_only=cfg.local_files_only).to_dict()
        except Exception as e:
            raise load_error("T5 text encoder", te, tsub, e) from e
    if "d_model" not in tcfg or "model_type" not in tcfg:  # a VLM's or a VAE's folder: no T5 width
        raise PixArtError(f"T5 text encoder: '{te}' is not a T5 encoder (its config, {config_kind(tcfg)}, "
                          "has no d_model)")
    info = {"text_encoder": ident(te), "text_dim": int(tcfg["d_model"]),
            "text_encoder_hash": config_hash(tcfg, ("transformers_version", "torch_dtype", "dtype"))}
    if cfg.vae:
        vae = check_source(cfg.vae, "VAE")
        vsub = pipeline_part(vae, cfg.vae_subfolder, "vae")
        try:
            vcfg = dict(AutoencoderKL.load_config(vae, subfolder=vsub, local_files_only=cfg.local_files_only))
        except Exception as e:
            raise load_error("VAE", vae, vsub, e) from e
        missing = [k for k in ("latent_channels", "block_out_channels") if k not in vcfg]
        if missing:  # a T5's or a VLM's folder
            raise PixArtError(f"VAE: '{vae}' is not a VAE (its config has no {missing[0]})")
        info.update(image_encoder=ident(vae), image_encoder_hash=config_hash(vcfg),
                    latent_channels=int(vcfg["latent_channels"]),
                    scaling_factor=float(vcfg.get("scaling_factor", 0.18215)),  # AutoencoderKL's default
                    shift_factor=float(vcfg.get("shift_factor") or 0.0),
                    downsample_factor=2 ** (len(vcfg["block_out_channels"]) - 1))
    else:
        from pixart.encoders.pixel import PixelAutoencoder

        ae = PixelAutoencoder(cfg.pixel_autoencoder, lowpass=cfg.pixel_lowpass)
        settings = {"pixel_unshuffle": ae.factor, **({"dct_lowpass": ae.lowpass} if ae.lowpass else {})}
        info.update(image_encoder=ae.id, image_encoder_hash=config_hash(settings),
                    latent_channels=ae.latent_channels, downsample_factor=ae.factor,
                    scaling_factor=float(cfg.pixel_scale), shift_factor=0.0)
    return info


def _caption_files(urls: list[str], names: list[str], cfg: FeatureConfig) -> list[dict]:
    """Per shard, {source: sidecar jsonl or None for "txt"}; a missing sidecar is an error up front."""
    out = []
    for url, name in zip(urls, names, strict=True):
        files: dict[str, str | None] = {}
        for src in cfg.captions:
            if src == "txt":
                files[src] = None
                continue
            places = [Path(d) / f"{name}.{src}.jsonl" for d in
                      ([cfg.captions_dir] if cfg.captions_dir else []) + ([] if is_url(url) else [Path(url).parent])]
            found = next((p for p in places if p.is_file()), None)
            if found is None:
                raise PixArtError(f"captions {src!r}: no {name}.{src}.jsonl next to {url}"
                                  + (f" or in {cfg.captions_dir}" if cfg.captions_dir else ""))
            files[src] = str(found)
        out.append(files)
    return out


def _plan(shards, out: Path, cfg: FeatureConfig) -> tuple[list[str], list[str], Manifest, Job, list[dict]]:
    """Check everything that can be checked before any work: shards, names, captions, encoders."""
    if bool(cfg.vae) == (cfg.pixel_autoencoder is not None):
        raise PixArtError("give exactly one of --vae PATH or --pixel-autoencoder")
    if cfg.pixel_autoencoder is not None and cfg.pixel_autoencoder < 1:
        raise PixArtError(f"--pixel-factor must be positive, got {cfg.pixel_autoencoder}")
    if cfg.resolution is not None and cfg.resolution < 1:
        raise PixArtError(f"--resolution must be positive, got {cfg.resolution}")
    if cfg.resolution and cfg.buckets:
        raise PixArtError("give --resolution or --buckets, not both")
    if not cfg.pixel_scale > 0:
        raise PixArtError(f"--pixel-scale must be positive, got {cfg.pixel_scale}")
    if cfg.batch_size < 1 or cfg.workers < 1:
        raise PixArtError("--batch-size and --workers must be positive")
    if not cfg.captions:
        raise PixArtError("--captions: name at least one caption source (e.g. txt)")
    from pixart.encoders import TextEncoderConfig

    tcfg = TextEncoderConfig(cfg.text_encoder, cfg.text_encoder_subfolder, cfg.tokenizer, None, cfg.max_length,
                             cfg.dtype, cfg.device, local_files_only=cfg.local_files_only)  # validates dtype
    check_out_folder(out)
    urls = resolve_shards(shards)
    names = check_unique_names(urls)
    for url, name in zip(urls, names, strict=True):
        if not is_url(url) and Path(url).resolve() == (out / f"{name}.tar").resolve():
            raise PixArtError(f"--out {out} would overwrite the input shard {url}")
    captions = _caption_files(urls, names, cfg)
    info = _encoder_info(cfg)
    resolution = None if cfg.buckets else (cfg.resolution or DEFAULT_RESOLUTION)
    table = bucket_table(cfg.buckets) if cfg.buckets else None
    f = info["downsample_factor"]
    sizes = [(resolution, resolution)] if resolution else list(table.values())
    bad = next((s for s in sizes if s[0] % f or s[1] % f), None)
    if bad:
        raise PixArtError(f"image size {bad[0]}x{bad[1]} is not divisible by the autoencoder's factor {f}")
    header = Manifest(dtype=cfg.dtype, max_length=cfg.max_length, resolution=resolution, buckets=cfg.buckets,
                      caption_sources=list(cfg.captions), batch_size=cfg.batch_size,
                      shards=[ShardEntry(n) for n in names], **info)
    vae = ({"path": cfg.vae, "subfolder": cfg.vae_subfolder, "dtype": "fp32", "device": cfg.device,
            "local_files_only": cfg.local_files_only} if cfg.vae else None)
    pixel = None if cfg.vae else info["image_encoder"]
    job = Job(str(out), dataclasses.asdict(tcfg), vae, pixel, sorted(cfg.captions), resolution,
              table, cfg.batch_size, accept_damaged=cfg.accept_damaged)
    return urls, names, header, job, captions


def _prepare_out(out: Path, urls: list[str], names: list[str], header: Manifest, captions: list[dict],
                 overwrite: bool, world: int) -> tuple[Path, list[str]]:
    """Where this run writes, and the names of the shards a cache there already lists (a run on a subset of
    shards keeps them). A cache made with the same settings is resumed. One made with other settings is
    replaced only when asked, and then built beside it (`.NAME.new`, which a rerun resumes) and moved in
    whole: until then the old cache stays as it was. A folder that is not a feature cache is never replaced."""
    ours = {f"{n}.tar" for n in names} | {DONE, MANIFEST}
    _finish_move_in(out)
    stale, known = None, []
    if (out / MANIFEST).exists():
        try:
            old = Manifest.load(out)
        except PixArtError:  # an older version or a broken file: only --overwrite replaces it
            if any(p.name not in (DONE, MANIFEST) and p.suffix != ".tar" and not p.name.startswith(".")
                   for p in out.iterdir()):  # another program's manifest.json
                raise PixArtError(f"--out {out} is not empty and is not a feature cache; choose another --out") \
                    from None
            if not overwrite:
                raise
            old, stale = None, MANIFEST
        if old is not None and _finished(out):  # settings bind the folder once a shard's features are there
            known = [s.name for s in old.shards]
            stale = _differs(old, header)
            if stale and not overwrite:
                raise PixArtError(f"--out {out} holds features made with {stale} {old.settings()[stale]} "
                                  f"(this run: {getattr(header, stale)}); pass --overwrite or choose another --out")
    elif out.is_dir() and any(p.name not in ours and not p.name.startswith(".") for p in out.iterdir()):
        raise PixArtError(f"--out {out} is not empty and is not a feature cache; choose another --out")
    if not stale:
        (out / DONE).mkdir(parents=True, exist_ok=True)
        return out, known + [p.name[:-5] for p in (out / DONE).glob("*.json") if not p.name.startswith(".")]
    if world > 1:
        raise PixArtError("--overwrite with WORLD_SIZE > 1 would race between ranks; empty --out first")
    inputs = [*urls, *(f for c in captions for f in c.values() if f)]
    inside = next((u for u in inputs if not is_url(u) and out.resolve() in Path(u).resolve().parents), None)
    if inside:
        raise PixArtError(f"--out {out} holds the input {inside}; --overwrite would delete it")
    new = _beside(out, "new")
    if new.exists():  # an earlier --overwrite's: resumed when it was toward these settings
        try:
            resumable = _differs(Manifest.load(new), header) is None
        except PixArtError:
            resumable = False
        if not resumable:
            shutil.rmtree(new)
    return _prepare_out(new, urls, names, header, captions, False, world)


def _finished(out: Path) -> bool:
    """Whether `out` holds a finished shard's record: until then its manifest names settings that no features
    were made with, and a run with other settings may take the folder over."""
    return any(not p.name.startswith(".") for p in (out / DONE).glob("*.json"))


def _differs(old: Manifest, new: Manifest) -> str | None:
    """The first setting `old` was made with that `new` does not match. Caption sources are a set: each one's
    features are stored under its name (and encoded in sorted order), so their order changes nothing."""
    have, want = old.settings(), new.settings()
    return next((k for k, v in want.items() if (set(have.get(k) or ()) != set(v) if k == "caption_sources"
                                                else have.get(k) != v)), None)


def _beside(out: Path, what: str) -> Path:
    """`.NAME.new` or `.NAME.old` next to the real folder (not next to a symlink to it)."""
    real = out.resolve()
    return real.with_name(f".{real.name}.{what}")


def _move_in(new: Path, out: Path) -> None:
    """The finished replacement takes the old cache's place; a kill in between is finished by the next run."""
    out, old = out.resolve(), _beside(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _finish_move_in(out: Path) -> None:
    old, new = _beside(out, "old"), _beside(out, "new")
    if not out.exists() and old.exists() and new.exists():  # killed between the two renames of _move_in
        os.replace(new, out.resolve())
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)


def _drop_if_input_changed(out: Path, name: str, url: str, captions: dict[str, str | None]) -> None:
    """Forget a finished shard whose input shard or caption sidecars are not the ones it was encoded from
    (regenerated data, captions relabeled into another folder)."""
    path = out / DONE / f"{name}.json"
    try:
        rec = json.loads(path.read_text())
        was, old_captions = rec["input"], rec.get("captions")  # older versions' records have no captions
    except (OSError, ValueError, KeyError, TypeError):
        return  # no (readable) record: the shard is not done anyway
    try:
        now = same_input(was, url)
    except (OSError, PixArtError):  # cannot be checked now (a URL that answers no HEAD)
        if set(was) == {"url"}:  # known by its text alone since it was encoded, as a pipe: command: kept
            return
        now = None  # it could be checked when it was encoded: encoded again
    captions_now = None if not isinstance(old_captions, dict) else \
        {src: same_input(old_captions.get(src) or {}, p) for src, p in captions.items() if p}
    if now is None or (captions_now is not None and None in captions_now.values()):
        path.unlink(missing_ok=True)
    elif now != was or captions_now != old_captions:  # same bytes, new mtimes
        atomic_write(path, json.dumps({**rec, "input": now, "captions": captions_now}))


def _entry(out: Path, name: str) -> ShardEntry:
    """A shard counts as done only with its record and a tar of the recorded size."""
    rec, tar = out / DONE / f"{name}.json", out / f"{name}.tar"
    try:
        r = json.loads(rec.read_text())
        if tar.stat().st_size == r["bytes"]:
            return ShardEntry(name, r["count"], r["sha256"], True, r["skipped"], r["buckets"], r["damaged"])
    except (OSError, ValueError, KeyError):
        pass
    return ShardEntry(name)


def _refresh(out: Path, header: Manifest) -> Manifest:
    m = dataclasses.replace(header, shards=[_entry(out, s.name) for s in header.shards])
    m.save(out)
    return m


def _commit(out: Path, res: ShardResult, url: str, captions: dict[str, str | None]) -> None:
    """The shard's record; no timings, so identical runs leave byte-identical records."""
    tar = out / f"{res.name}.tar"
    try:
        source = input_record(url)
    except (OSError, PixArtError):  # a URL that answers no HEAD (presigned GET-only): known by its text, as pipe:
        source = {"url": url}
    rec = {"count": res.count, "sha256": file_sha256(tar), "bytes": tar.stat().st_size, "skipped": res.skipped,
           "input": source, "captions": {src: input_record(path) for src, path in captions.items() if path},
           **{k: v for k, v in dataclasses.asdict(res).items()
              if k not in ("name", "count", "skipped", "seconds", "read")}}
    atomic_write(out / DONE / f"{res.name}.json", json.dumps(rec))


_WORKER: tuple | None = None  # (job with this worker's device, progress queue), set once per process


def _init_worker(job: Job, progress_q, slots, job_pid: int) -> None:
    """Pick this worker's GPU (worker i -> cuda:i mod count) and load the encoders once."""
    global _WORKER
    die_with(job_pid)
    # tqdm's default lock (loading bars) is a semaphore a killed worker never unlinks: its warning at exit
    # would follow the one-line "worker died"
    tqdm.set_lock(threading.RLock())
    slot = slots.get()
    for part in (job.text_encoder, job.vae or {}):
        if part.get("device") == "cuda":
            import torch
            part["device"] = f"cuda:{slot % max(1, torch.cuda.device_count())}"
    load_encoders(job)
    _WORKER = job, progress_q


def _work(url: str, name: str, captions: dict) -> ShardResult:
    job, progress_q = _WORKER
    return encode_shard(url, name, job, captions, progress=progress_q.put)


def extract_features(shards, out: str | os.PathLike, cfg: FeatureConfig, overwrite: bool = False,
                     rank: int | None = None, world: int | None = None, progress: bool = True,
                     on_shard: Callable[[Manifest], None] | None = None) -> Extraction:
    """Encode this rank's unfinished shards into `out`; returns the manifest as it stands after."""
    t0 = time.perf_counter()
    rank, world = rank_and_world(rank, world)
    target = Path(out)
    urls, names, header, job, captions = _plan(shards, target, cfg)
    out, known = _prepare_out(target, urls, names, header, captions, overwrite, world)
    job = dataclasses.replace(job, out=str(out))
    # the manifest describes the whole folder: shards of earlier runs on other subsets stay listed
    header = dataclasses.replace(header, shards=[ShardEntry(n) for n in sorted(set(names) | set(known))])
    mine = [i for i in range(len(urls)) if i % world == rank]
    for folder in (out, out / DONE):  # a killed run's temps (atomic_write clears a folder once per process)
        remove_dead_writers(folder)
    for i in mine:
        _drop_if_input_changed(out, names[i], urls[i], captions[i])
    manifest = _refresh(out, header)
    done = {s.name for s in manifest.shards if s.complete}
    todo = [i for i in mine if names[i] not in done]
    url_of, captions_of = dict(zip(names, urls, strict=True)), dict(zip(names, captions, strict=True))
    unfinished = {names[i] for i in todo}
    for tmp in out.glob(".*.tar.tmp*"):  # a killed run's half-written tar is never trusted
        if tmp.name[1:].rpartition(".tar.tmp")[0] in unfinished:
            tmp.unlink(missing_ok=True)
    position = {s.name: j for j, s in enumerate(manifest.shards)}
    saved_at = time.monotonic()
    results: list[ShardResult] = []
    damaged: list[ShardResult] = []
    bar = ShardBar(len(todo), desc=f"features {len(todo)} shards", unit="img", disable=not progress)

    def finish(res: ShardResult) -> None:
        """The shard's record, its manifest entry, and the manifest on disk when complete or every
        MANIFEST_EVERY_S: rewriting the whole of it after every shard grew as shards squared."""
        nonlocal saved_at
        if res.damaged and not (cfg.accept_damaged and res.read):  # no record: the shard stays unfinished
            damaged.append(res)
            return
        _commit(out, res, url_of[res.name], captions_of[res.name])
        results.append(res)
        bar.shard_done(res.count)  # as the bar counts: encoded samples
        manifest.shards[position[res.name]] = _entry(out, res.name)
        if manifest.complete or time.monotonic() - saved_at > MANIFEST_EVERY_S:
            manifest.save(out)
            saved_at = time.monotonic()
        bar.set_postfix(shards=f"{manifest.done}/{len(names)}", skipped=sum(len(r.skipped) for r in results))
        if on_shard:
            on_shard(manifest)

    try:
        workers = min(cfg.workers, len(todo))
        if workers <= 1:
            if todo:
                load_encoders(job)
            for i in todo:
                finish(encode_shard(urls[i], names[i], job, captions[i], progress=bar.update))
        else:
            _run_pool(workers, job, [(urls[i], names[i], captions[i]) for i in todo], bar, finish)
    finally:
        bar.close()
        if results:  # also when stopped; and with the other ranks' shards: the last rank to finish completes it
            manifest = _refresh(out, header)
    if out != target and manifest.complete:
        _move_in(out, target)
    return Extraction(manifest, results, damaged, time.perf_counter() - t0)


def _run_pool(workers: int, job: Job, tasks: list, bar, finish) -> None:
    # forkserver: a fresh interpreter (no CUDA or thread-pool state inherited, as with spawn) that
    # imports torch/diffusers/transformers once and forks each worker from there; spawn elsewhere
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["data_pipelines.features", "pixart.encoders"])
    else:
        ctx = mp.get_context("spawn")
    progress_q, slots = ctx.Queue(), ctx.Queue()
    for s in range(workers):
        slots.put(s)
    job = dataclasses.replace(job, threads=max(1, (os.cpu_count() or 1) // workers))
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(job, progress_q, slots, os.getpid())) as pool:
            pending = {pool.submit(_work, url, name, caps) for url, name, caps in tasks}
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    while not progress_q.empty():
                        bar.update(progress_q.get())
                    for fut in finished:
                        finish(fut.result())
                while not progress_q.empty():
                    bar.update(progress_q.get())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    except BrokenProcessPool:  # killed (the OOM killer, kill -9): its shard has no record, so a rerun redoes it
        raise PixArtError("an extract-features worker died (killed: out of memory?); finished shards are kept, "
                          "rerun to resume") from None


def pixart_text_bytes(dim: int) -> int:
    """Bytes of one caption in PixArt's cache layout: an npz of the padded fp32 (1, 120, D) features
    and the int64 (1, 120) mask, as its extract_features tool saves them (exact, via numpy)."""
    import io

    import numpy as np
    buf = io.BytesIO()
    np.savez(buf, caption_feature=np.zeros((1, 120, dim), np.float32), attention_mask=np.zeros((1, 120), np.int64))
    return buf.getbuffer().nbytes


def ours_text_bytes(tokens: int, dim: int) -> int:
    """Bytes of `tokens` valid bf16 tokens of one caption in our layout, safetensors header included."""
    import torch
    from safetensors.torch import save
    return len(save({"text.s0": torch.zeros(tokens, dim, dtype=torch.bfloat16)}))
