"""`pixart relabel`: caption every sample of some shards with one captioner; kill it any time, rerun it.

For captioner NAME and input shard S, `DIR` holds
    S.NAME.jsonl             the finished shard: a line per sample, in input order (renamed into place)
    .S.NAME.jsonl.partial    work in progress: lines appended per batch and fsynced
    .S.NAME.stats.json       the finished shard's counts and text statistics (written just before)
    .S.NAME.input.json       the input shard's identity, recorded when captioning it starts
    NAME-job.json            the captioner's settings that shape captions (CaptionerConfig.settings)
    NAME-summary.json        the job's summary
A line is {"__key__", "caption" (null when failed), "model" (a local path absolute), "prompt",
"status": "ok" | "failed", "reason" and, for a rejected caption, "rejected" (when failed), "attempts"};
extract-features counts a failed sample as one without that caption. Input shards are only read.

Every run first compares its settings with NAME-job.json (a mismatch is refused: captions never mix),
which binds the folder once a line of NAME captions exists: a record without one (a run that failed or was
killed before its first line) is replaced by the next run's, written once its captioner loads. It then
forgets this rank's shards whose input changed since (regenerated under the same name; a local input
now shorter, a copy in progress, or a URL that cannot be checked, is left as it is). A rerun
reads the partial (a torn last line is cut off), skips the keys it holds, and finishes the shard;
finished shards are not touched. An input tar that breaks off early is not finished: its partial
stays and a rerun retries it, unless `accept_damaged`; one of which nothing could be read is never
finished. A captioner that raises on every sample of a batch stops the job (a rerun resumes), and so does a
shard whose samples' members are not adjacent (a raw SA-1B tar: `pixart data sam` first).
Shard i goes to global worker i % (WORLD_SIZE * workers), worker RANK * workers + j, so no two
workers caption one shard; an exclusive POSIX record lock (lockf, not inherited by forked
processes) on the partial keeps that true even under a misconfigured launch. Images are decoded and
resized in DataLoader worker processes, so the captioner in the job worker's main thread does not
wait on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import glob
import importlib
import inspect
import json
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipelines.relabel import quality
from data_pipelines.relabel.captioner import VLM_NAMES, Captioner, CaptionerConfig, build_captioner, model_name
from data_pipelines.relabel.stats import ShardStats, format_summary, summarize
from pixart.atomic import atomic_write, check_out_folder, remove_dead_writers
from pixart.data.manifest import file_sha256
from pixart.data.shards import check_unique_names, input_id, input_record, rank_and_world, resolve_shards, same_input
from pixart.data.tars import IMAGE_EXTS, decode_image, stable_reason
from pixart.errors import PixArtError
from pixart.lifetime import die_with, die_with_parent


@dataclass
class RelabelConfig:
    captioner: CaptionerConfig
    batch_size: int = 8  # samples per captioner call; halved on GPU out-of-memory
    workers: int = 1  # job processes on this node, each with its own captioner (one per GPU)
    decode_workers: int = 2  # DataLoader processes per job worker that read, decode and resize
    quality: quality.QualityConfig = field(default_factory=quality.QualityConfig)
    progress: bool = True
    accept_damaged: bool = False  # finish a shard whose input tar broke off with what was read


@dataclass
class ShardRun:
    """What one job worker did to one shard in this run."""
    name: str
    done: int = 0  # captioned ok
    failed: int = 0
    skipped: int = 0  # already in the partial from a killed run
    damaged: str = ""  # the input tar broke off; unless accept_damaged the shard stays unfinished
    visual_tokens: dict[int, int] = field(default_factory=dict)  # VLMs: visual tokens per image -> images


@dataclass
class Relabeling:
    shards: int  # in the job
    todo: int  # this rank's unfinished shards at the start
    runs: list[ShardRun]
    seconds: float
    summary: dict
    summary_path: Path | None = None

    @property
    def captioned(self) -> int:
        return sum(r.done + r.failed for r in self.runs)


# ---------------------------------------------------------------- captioners

def label(name: str) -> str:
    """The captioner's name in file names: NAME, or the callable's name of a `module:callable` spec."""
    return name.rsplit(":", 1)[-1]


PROTOCOL = ("model_id", "prompt")  # a captioner's attributes, beside its method caption(samples); its files are
# named by the --captioner spec (`label`), known before it loads


def load_captioner(config: CaptionerConfig) -> Captioner:
    """A registered captioner (`build_captioner`), or your own: `module:callable`, called with the config,
    which must return an object with the attributes `model_id`, `prompt` and a method `caption`."""
    if ":" not in config.name:
        return build_captioner(config)
    module, attr = config.name.rsplit(":", 1)
    try:
        captioner = getattr(importlib.import_module(module), attr)(config)
    except PixArtError:
        raise
    except Exception as e:
        raise PixArtError(f"--captioner {config.name}: its constructor failed: {type(e).__name__}: {e}") from None
    missing = [a for a in PROTOCOL if not hasattr(captioner, a)]
    missing += [] if callable(getattr(captioner, "caption", None)) else ["a method caption(samples)"]
    if missing:
        raise PixArtError(f"--captioner {config.name}: returned a {type(captioner).__name__}, not a captioner: it "
                          f"lacks {', '.join(missing)} (a captioner has {', '.join(PROTOCOL)} and caption(samples))")
    return captioner


def check_captioner(config: CaptionerConfig) -> None:
    """Everything about the captioner that can fail before work starts, without loading a model."""
    if ":" in config.name:
        module, attr = config.name.rsplit(":", 1)
        try:
            make = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise PixArtError(f"--captioner {config.name}: {type(e).__name__}: {e}") from None
        if not callable(make):
            raise PixArtError(f"--captioner {config.name}: {attr} is a {type(make).__name__}, not a callable that "
                              "builds a captioner from a CaptionerConfig")
    elif config.name in VLM_NAMES:
        from pixart.encoders.loading import check_source  # imports diffusers: VLMs only

        if not config.model:
            raise PixArtError(f"--captioner {config.name} needs --model PATH_OR_HUB_ID")
        check_source(config.model, f"--captioner {config.name} --model")
    elif config.name != "metadata":
        build_captioner(config)  # its one-line error for an unknown name
    if config.dtype not in ("bf16", "fp32", "fp16"):
        raise PixArtError(f"--dtype {config.dtype!r}: use bf16 or fp32")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class Batcher:
    """Calls the captioner: halves the batch on out-of-memory (and keeps it halved), and isolates a
    sample that makes a batch raise, so one bad sample fails alone. When every sample of a batch
    raises, also alone (or out of memory at batch 1), the captioner is broken, not the samples: a
    PixArtError stops the job."""

    def __init__(self, captioner: Captioner, batch_size: int, log: Callable[[str], None] = print):
        self.captioner, self.size, self.log = captioner, batch_size, log
        self.takes_seed = "seed" in inspect.signature(captioner.caption).parameters

    def _call(self, samples: list[dict], seed: int | None) -> list[str]:
        texts = self.captioner.caption(samples, seed=seed) if seed is not None and self.takes_seed \
            else self.captioner.caption(samples)
        if len(texts) != len(samples):
            raise RuntimeError(f"captioner returned {len(texts)} captions for {len(samples)} samples")
        return list(texts)

    def __call__(self, samples: list[dict], seed: int | None = None) -> list[str | BaseException]:
        out: list[str | BaseException] = []
        while len(out) < len(samples):
            chunk = samples[len(out):len(out) + self.size]
            try:
                out += self._call(chunk, seed)
            except Exception as e:
                if _is_oom(e) and len(chunk) > 1:
                    self.size = max(1, len(chunk) // 2)
                    self.log(f"out of memory at batch {len(chunk)}; retrying with batch {self.size}")
                    _empty_cache()
                    continue
                if _is_oom(e):
                    raise PixArtError(f"out of memory at batch 1 ({type(e).__name__}: {e}); the captioner does not "
                                      "fit this device: use a smaller model or more memory. Finished samples "
                                      "are kept; a rerun resumes") from e
                got = [self._one(s, seed) for s in chunk]
                if all(isinstance(g, BaseException) for g in got):
                    raise PixArtError(f"the captioner raised on every sample of a batch of {len(chunk)}, alone "
                                      f"too: {type(e).__name__}: {e}; stopping. Finished samples are kept; "
                                      "a rerun resumes") from e
                out += got
        return out

    def _one(self, sample: dict, seed: int | None) -> str | BaseException:
        try:
            return self._call([sample], seed)[0]
        except Exception as e:
            return e


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _reason(e: BaseException) -> str:

    what = "out of memory" if _is_oom(e) else "captioner error"
    return stable_reason(f"{what}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------- reading shards (DataLoader workers)

def _decode(sample: dict, image_size: int | None) -> dict:
    """The captioner's view of a sample: PIL image (longest side <= image_size), json, txt; or an error."""
    from PIL import Image


    out = {"__key__": sample["__key__"]}
    if not any(e in sample for e in IMAGE_EXTS):
        return {**out, "error": "bad image: the sample has no image"}
    try:
        img = decode_image(sample)
    except ValueError as e:
        return {**out, "error": str(e)}
    if image_size:
        img.thumbnail((image_size, image_size), Image.BICUBIC)
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:
        meta = None  # a captioner that needs it says so
    return {**out, "image": img, "json": meta}


def _shard_items(url: str, done: frozenset, image_size: int | None, worker: int = 0, workers: int = 1):
    """Every `workers`-th sample of a shard from `worker` on, with its position; samples already
    captioned pass undecoded (their alt-text still counts). Damage ends with one "__damage__" item."""
    from pixart.data.tars import TarDamage, iter_samples

    damage = TarDamage()
    for pos, sample in enumerate(iter_samples(url, damage)):
        if pos % workers != worker:
            continue
        txt = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
        item = {"__key__": sample["__key__"], "done": True} if sample["__key__"] in done \
            else _decode(sample, image_size)
        yield {**item, "pos": pos, "txt": txt}
    if damage.error and worker == 0:  # every worker saw it; one reports it
        yield {"__damage__": damage.reason()}


def _keep(item):
    return item


class _Items(torch.utils.data.IterableDataset):
    """A shard's items, split over DataLoader workers by position."""

    def __init__(self, url: str, done: frozenset, image_size: int | None):
        self.url, self.done, self.image_size = url, done, image_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        split = (info.id, info.num_workers) if info else ()
        return _shard_items(self.url, self.done, self.image_size, *split)


def _loader(url: str, done: frozenset, image_size: int | None, cfg: RelabelConfig):
    if cfg.decode_workers < 1:
        return _shard_items(url, done, image_size)
    fork = "fork" if "fork" in mp.get_all_start_methods() else None  # cheap: the captioner's memory is shared
    return torch.utils.data.DataLoader(_Items(url, done, image_size), batch_size=None, collate_fn=_keep,
                                       num_workers=cfg.decode_workers, prefetch_factor=max(2, cfg.batch_size),
                                       worker_init_fn=functools.partial(die_with_parent, os.getpid()),
                                       multiprocessing_context=fork)


# ---------------------------------------------------------------- one shard

def paths(out: Path, name: str, cap: str) -> tuple[Path, Path, Path]:
    """(final, partial, stats) of shard `name` captioned by `cap`."""
    return out / f"{name}.{cap}.jsonl", out / f".{name}.{cap}.jsonl.partial", out / f".{name}.{cap}.stats.json"


def input_path(out: Path, name: str, cap: str) -> Path:
    """The identity of the input shard `name` was captioned from (`pixart.data.shards.input_record`)."""
    return out / f".{name}.{cap}.input.json"


def job_path(out: Path, cap: str) -> Path:
    """The settings of the captioner that wrote the folder's `cap` captions."""
    return out / f"{cap}-job.json"


def read_partial(f) -> dict[str, str]:
    """key -> line of a partial file open in "a+b" mode; a torn last line is cut off so appends start clean."""
    f.seek(0)
    data, rows, end = f.read(), {}, 0
    while (nl := data.find(b"\n", end)) >= 0:
        try:
            row = json.loads(data[end:nl])
            key = row["__key__"]
        except (ValueError, KeyError, TypeError):
            break
        rows.setdefault(key, data[end:nl].decode())
        end = nl + 1
    f.truncate(end)
    return rows


def _first_row(path: Path) -> dict | None:
    """The first line of a finished caption file, or None when it is empty. A finished file is never rewritten:
    one that cannot be read is a one-line error naming it."""
    with open(path, "rb") as f:
        line = f.readline()
    if not line.strip():
        return None
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PixArtError(f"{path}:1: not UTF-8 ({e.reason} at byte {e.start}): fix it, or remove the file to "
                          "caption its shard again") from None
    except ValueError as e:
        raise PixArtError(f"{path}:1: not a JSON line ({e}): fix it, or remove the file to caption its shard "
                          "again") from None
    if not isinstance(row, dict):
        raise PixArtError(f"{path}:1: not a caption line (a JSON {type(row).__name__}): fix it, or remove the "
                          "file to caption its shard again")
    return row


def _check_same_source(out: Path, cap: str, rows: dict[str, str], base: dict) -> None:
    """One output folder holds one captioner's captions from one model and prompt, never a mix."""
    finished = next(iter(sorted(out.glob(f"*.{cap}.jsonl"))), None)
    olds = [json.loads(line) for line in list(rows.values())[:1]]
    if finished is not None:
        olds.append(_first_row(finished))
    for old in filter(None, olds):
        if (old.get("model"), old.get("prompt")) != (base["model"], base["prompt"]):
            raise PixArtError(f"{out}: holds {cap} captions by model {old.get('model')!r} with prompt "
                              f"{old.get('prompt')!r}; this run uses {base['model']!r} with {base['prompt']!r}: "
                              "use another --out")


def _lock(f, name: str, log: Callable[[str], None]) -> None:
    """An exclusive lockf record lock on the open file: held by this process only (forked decode
    processes do not inherit it), dropped when it dies. Says so when the wait passes a second."""
    t0, said = time.monotonic(), False
    while True:
        try:
            return fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if not said and time.monotonic() - t0 > 1:
            log(f"{name}: waiting for another process that holds its partial file's lock")
            said = True
        time.sleep(0.05)


def caption_shard(url: str, name: str, out: Path, captioner: Captioner, batcher: Batcher, cfg: RelabelConfig,
                  progress: Callable[[int], None] = lambda n: None) -> ShardRun | None:
    """Caption one shard's missing keys into its partial file, then write the finished file. None when
    another worker or run finished it first. A damaged input tar leaves the partial (ShardRun.damaged)
    unless cfg.accept_damaged; one of which nothing could be read always does."""
    cap = label(cfg.captioner.name)
    final, partial, stats_path = paths(out, name, cap)
    if final.exists():  # a kill between the final rename and removing the partial leaves one
        partial.unlink(missing_ok=True)
        return None
    with open(partial, "a+b") as f:
        _lock(f, partial.name, batcher.log)  # one writer per shard, however the job was launched
        if final.exists():  # finished while we waited for the lock
            partial.unlink(missing_ok=True)
            return None
        record = input_path(out, name, cap)
        for written in (final, stats_path, record):
            for stale in out.glob(f".{glob.escape(written.name)}.tmp-*"):
                stale.unlink(missing_ok=True)  # a kill during an atomic write
        if not record.exists():  # what a later run checks the input against
            try:
                atomic_write(record, json.dumps(input_record(url)))
            except (OSError, PixArtError):
                pass  # gone since the job started: reading it fails below, and the shard stays unfinished
        rows = read_partial(f)
        kept = os.fstat(f.fileno()).st_size  # the lines of earlier runs
        run, order, stats = ShardRun(name), {}, ShardStats()
        base = {"model": model_name(captioner.model_id), "prompt": captioner.prompt}  # as the job record says it
        if not job_path(out, cap).exists():  # an older job's output: its lines say what made it
            _check_same_source(out, cap, rows, base)
        batch: list[dict] = []

        def write(new: list[dict]) -> None:  # a batch's lines are kept once fsync returns
            for row in new:
                rows[row["__key__"]] = json.dumps(row, ensure_ascii=False)
                run.done, run.failed = run.done + (row["status"] == "ok"), run.failed + (row["status"] != "ok")
            f.write("".join(rows[row["__key__"]] + "\n" for row in new).encode())
            f.flush()
            os.fsync(f.fileno())
            progress(len(new))

        def flush() -> None:
            write(_caption_batch(batcher, batch, base, cfg))
            batch.clear()

        image_size = getattr(captioner, "image_size", None)
        for item in _loader(url, frozenset(rows), image_size, cfg):
            if "__damage__" in item:
                stats.damaged = item["__damage__"]
                continue
            key = item["__key__"]
            if key in order:  # its members were apart: the first "sample" was a fragment (e.g. a json, no image)
                f.truncate(kept)  # this run's lines: the fragments' "failures" are not the samples'
                raise PixArtError(f"{url}: the members of {key} are not adjacent (a raw SA-1B tar?): run "
                                  "`pixart data sam` first")
            order[key] = item["pos"]
            if item["txt"] is not None:
                stats.alt_text.add(item["txt"])
            if key in rows:
                run.skipped += 1
            elif "error" in item:
                write([{"__key__": key, "caption": None, **base, "status": "failed", "reason": item["error"],
                        "attempts": 0}])  # rare: a write of its own
            else:
                batch.append(item)
                if len(batch) >= batcher.size:
                    flush()
        if batch:
            flush()
        run.visual_tokens = _take_visual_tokens(captioner)
        if stats.damaged and not (cfg.accept_damaged and order):  # the partial stays: a rerun retries the shard
            run.damaged = stats.damaged
            return run
        keys = sorted(order, key=order.get)
        body = "".join(rows[k] + "\n" for k in keys if k in rows)
        for k in keys:
            if k in rows:
                stats.add_row(json.loads(rows[k]))
        atomic_write(stats_path, json.dumps(stats.to_json()))
        atomic_write(final, body)
        partial.unlink(missing_ok=True)
    return run



def _take_visual_tokens(captioner: Captioner) -> dict[int, int]:
    """The VLM's visual-token histogram since the last take (for the summary), cleared; {} for others."""
    counts = getattr(captioner, "visual_tokens", None)
    if counts is None:
        return {}
    taken = dict(counts)
    counts.clear()
    return taken


def _caption_batch(batcher: Batcher, batch: list[dict], base: dict, cfg: RelabelConfig) -> list[dict]:
    """A row per sample: captioned and checked; rejected captions are retried once with another seed."""
    def row(item, caption, reason, attempts, rejected=None):
        r = {"__key__": item["__key__"], "caption": caption if reason is None else None, **base,
             "status": "ok" if reason is None else "failed"}
        if reason is not None:
            r["reason"] = reason
            if rejected is not None:
                r["rejected"] = rejected[:300]  # what the captioner said, for a look
        return {**r, "attempts": attempts}

    def judge(item, out, attempts):
        if isinstance(out, BaseException):
            return row(item, None, _reason(out), attempts)
        if not isinstance(out, str):
            return row(item, None, f"captioner error: the caption is not a str ({type(out).__name__})", attempts)
        return row(item, out, quality.check(out, cfg.quality), attempts, out)

    rows = [judge(item, out, 1) for item, out in zip(batch, batcher(batch), strict=True)]
    again = [i for i, r in enumerate(rows) if r["status"] != "ok" and "rejected" in r]
    if again:
        outs = batcher([batch[i] for i in again], seed=cfg.captioner.seed + 1)
        for i, out in zip(again, outs, strict=True):
            rows[i] = judge(batch[i], out, 2)
    return rows


# ---------------------------------------------------------------- the job

def _on_device(cfg: RelabelConfig, slot: int) -> RelabelConfig:
    """Worker j of this node on cuda:(j mod GPUs)."""
    if cfg.captioner.device == "cuda" and cfg.workers > 1:
        dev = f"cuda:{slot % max(1, torch.cuda.device_count())}"
        cfg = dataclasses.replace(cfg, captioner=dataclasses.replace(cfg.captioner, device=dev))
    return cfg


def _worker(slot: int, tasks: list[tuple[str, str]], out: str, cfg: RelabelConfig, q, job_pid: int) -> None:
    die_with(job_pid)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.workers))
        cfg = _on_device(cfg, slot)
        captioner = load_captioner(cfg.captioner)
        _record_settings(Path(out), cfg)
        batcher = Batcher(captioner, cfg.batch_size, log=lambda m: q.put(("log", f"worker {slot}: {m}")))
        for url, name in tasks:
            run = caption_shard(url, name, Path(out), captioner, batcher, cfg, progress=lambda n: q.put(("n", n)))
            if run is not None:
                q.put(("shard", dataclasses.asdict(run)))
        q.put(("exit", slot))
    except BaseException as e:
        q.put(("error", str(e) if isinstance(e, PixArtError) else None, traceback.format_exc()))


def _run_workers(todo: list[list[tuple[str, str]]], out: Path, cfg: RelabelConfig, bar) -> list[ShardRun]:
    """One process per local worker with work. forkserver: fresh interpreters (no CUDA or thread-pool
    state inherited, as with spawn) forked from one that imported torch once; spawn elsewhere."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["data_pipelines.relabel.job"])
    else:
        ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = {j: ctx.Process(target=_worker, args=(j, tasks, str(out), cfg, q, os.getpid()), daemon=False)
             for j, tasks in enumerate(todo) if tasks}
    for p in procs.values():
        p.start()
    runs, running = [], set(procs)

    def take(msg) -> None:
        if msg[0] == "n":
            bar.update(msg[1])
        elif msg[0] == "shard":
            runs.append(ShardRun(**msg[1]))
            bar.shard_done(runs[-1].done + runs[-1].failed)
            bar.set_postfix(shards=len(runs))
        elif msg[0] == "log":
            bar.write(msg[1])
        elif msg[0] == "exit":
            running.discard(msg[1])
        else:
            if msg[1] is not None:
                raise PixArtError(msg[1])
            raise RuntimeError(f"a relabel worker failed:\n{msg[2]}")

    try:
        while running:
            with contextlib.suppress(queue.Empty):
                take(q.get(timeout=0.1))
            for j in [j for j in running if not procs[j].is_alive()]:  # every turn: others may keep talking
                with contextlib.suppress(queue.Empty):  # what it said before it ended is in the queue by now
                    while j in running:
                        take(q.get_nowait())
                if j in running:  # ended without a word: killed
                    code = procs[j].exitcode
                    why = f"exit code {code}" + (", killed: out of memory?" if code == -9 else "")
                    raise PixArtError(f"relabel worker {j} died ({why}); finished captions are kept, rerun to resume")
    finally:
        for p in procs.values():
            if p.is_alive() and running:
                p.terminate()
            p.join()
    return runs


def _settings(cfg: RelabelConfig) -> dict:
    """What the job record holds: the captioner's settings, and which captions are rejected."""
    return {**cfg.captioner.settings(), "max_words": cfg.quality.max_words}


def _has_lines(out: Path, cap: str) -> bool:
    """Whether `out` holds a line of `cap` captions (finished, or in a partial): only then does its job record
    bind the folder. A record without (a run that failed or was killed before its first line) binds nothing."""
    if any(out.glob(f"*.{cap}.jsonl")):
        return True
    for p in out.glob(f".*.{cap}.jsonl.partial"):
        with contextlib.suppress(FileNotFoundError):
            if p.stat().st_size:
                return True
    return False


def _check_settings(out: Path, cap: str, settings: dict) -> None:
    """Refuse a run whose captioner settings differ from those that wrote the folder's captions (one
    line naming each, old and new)."""
    path = job_path(out, cap)
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise PixArtError(f"{path}: not a relabel job record ({type(e).__name__}: {e})") from None
    if not isinstance(old, dict):
        raise PixArtError(f"{path}: not a relabel job record (a JSON {type(old).__name__})")
    diff = [k for k in settings if old.get(k) != settings[k]]
    if diff and _has_lines(out, cap):
        said = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} (this run: {settings[k]!r})" for k in diff)
        raise PixArtError(f"{out}: its {cap} captions were made with {said}; one folder never mixes captions "
                          "made differently: use another --out")


def _record_settings(out: Path, cfg: RelabelConfig) -> None:
    """Once the captioner is loaded: record its settings in a folder that holds no lines of its captions yet (an
    older job's output, lines without a record, is checked by its lines' model and prompt instead)."""
    cap = label(cfg.captioner.name)
    if not _has_lines(out, cap):
        atomic_write(job_path(out, cap), json.dumps(_settings(cfg), indent=1) + "\n")


def _read_record(path: Path) -> dict | None:
    """An input record (`input_path`), or None when there is none (an older output) or it is unreadable."""
    try:
        was = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return was if isinstance(was, dict) else None


def _forget_if_input_changed(out: Path, name: str, url: str, cap: str, log: Callable[[str], None]) -> bool:
    """Forget a finished or partial shard whose input is not the one it was captioned from (regenerated under
    the same name), so it is captioned again. Shards without a record (older outputs, or not started) are not
    checked; a shard whose input cannot be checked now (a URL that fails, a HEAD refused on a presigned URL) or
    is shorter than it was (a copy in progress) is kept: captions are expensive to redo. False when this run
    must leave the shard alone (the shorter copy)."""
    record = input_path(out, name, cap)
    was = _read_record(record)
    if was is None:
        return True
    try:
        now = input_id(url)
    except (OSError, PixArtError) as e:
        log(f"{name}: cannot check its input ({e}); left as it is")
        return True
    if os.path.isfile(url) and isinstance(was.get("bytes"), int) and now["bytes"] < was["bytes"]:
        log(f"{name}: its input is shorter than when it was captioned (a copy in progress?); left as it is")
        return False
    final, partial, stats = paths(out, name, cap)
    same = same_input(was, url, now)
    if same is None and not final.exists() and _grew_from(was, url):
        same = input_record(url)  # a cut copy since completed: the samples captioned from it are the same
    if same is not None:
        if same != was:  # the same samples: only the mtime changed, or the tar was completed
            atomic_write(record, json.dumps(same))
        return True
    with open(partial, "a+b") as f:
        _lock(f, partial.name, log)  # not while another process captions it
        if _read_record(record) != was:  # another process forgot it meanwhile, and may have captioned it anew
            if final.exists():
                partial.unlink(missing_ok=True)  # the empty one opening it made
            return True
        for p in (final, stats, record, partial):
            p.unlink(missing_ok=True)
    log(f"{name}: its input {url} changed since it was captioned; captioning it again")
    return True


def _grew_from(was: dict, url: str) -> bool:
    """A local input that now begins with the bytes it had (a cut copy, since completed)."""
    size, digest = was.get("bytes"), was.get("sha256")
    return isinstance(size, int) and bool(digest) and os.path.isfile(url) and file_sha256(url, limit=size) == digest


def _remove_if_no_lines(out: Path, cap: str, created: bool) -> None:
    """After an error before any line of `cap` captions was written (a model that would not load, a captioner that
    fails every sample): remove the job record, input records and empty partials, and `out` if this run made it.
    Nothing when a partial is locked (another process captions into it). Best effort: the error that brought us
    here is the one to report."""
    with contextlib.suppress(OSError):
        if _has_lines(out, cap):
            return
        for p in out.glob(f".*.{cap}.jsonl.partial"):
            with open(p, "a+b") as f:
                fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError when another process holds it
                if os.fstat(f.fileno()).st_size:
                    return
                p.unlink()
        for p in [*out.glob(f".*.{cap}.input.json"), job_path(out, cap)]:
            p.unlink(missing_ok=True)
        if created:
            out.rmdir()


def _load_stats(path: Path) -> ShardStats | None:
    try:
        return ShardStats.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return None


def _model_prompt(out: Path, names: list[str], cap: str) -> tuple[str | None, str | None]:
    """The model and prompt recorded in the first finished line of the job."""
    for name in names:
        final = paths(out, name, cap)[0]
        if final.exists() and (row := _first_row(final)) is not None:
            return row.get("model"), row.get("prompt")
    return None, None


def assign(shards: int, rank: int, world: int, workers: int) -> list[list[int]]:
    """Shard indices of each local worker j: shard i goes to global worker i % (world * workers),
    which is worker j of rank r when that is r * workers + j. Disjoint over all ranks and workers."""
    return [list(range(rank * workers + j, shards, world * workers)) for j in range(workers)]


def relabel(shards, out: str | os.PathLike, cfg: RelabelConfig, rank: int | None = None, world: int | None = None,
            log: Callable[[str], None] = print) -> Relabeling:
    """Caption this rank's unfinished shards into `out`; write and print the job summary."""
    from pixart.progress import ShardBar

    t0 = time.perf_counter()
    rank, world = rank_and_world(rank, world)
    for flag, value, least in (("--batch-size", cfg.batch_size, 1), ("--workers", cfg.workers, 1),
                               ("--decode-workers", cfg.decode_workers, 0), ("--max-words", cfg.quality.max_words, 1)):
        if value < least:
            raise PixArtError(f"{flag} {value}: must be {'positive' if least else 'zero or more'}")
    urls = resolve_shards(shards)
    names = check_unique_names(urls)
    check_captioner(cfg.captioner)
    out, cap = Path(out), label(cfg.captioner.name)
    check_out_folder(out)
    _check_settings(out, cap, _settings(cfg))
    mine = sorted(i for js in assign(len(urls), rank, world, cfg.workers) for i in js)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    remove_dead_writers(out)  # a killed run's temps (atomic_write clears a folder once per process)
    _model_prompt(out, names, cap)  # a finished file that cannot be read says so before the work, not after it
    usable = {i for i in mine if _forget_if_input_changed(out, names[i], urls[i], cap, log)}

    def finished(name: str) -> bool:
        return paths(out, name, cap)[0].exists()

    def todo_(name: str) -> bool:  # a finished shard's leftover partial: caption_shard removes it
        final, partial, _ = paths(out, name, cap)
        return not final.exists() or partial.exists()

    todo = [[(urls[i], names[i]) for i in js if i in usable and todo_(names[i])]
            for js in assign(len(urls), rank, world, cfg.workers)]
    n_todo, runs = sum(map(len, todo)), []
    if not n_todo:
        left = sum(not finished(n) for n in names)
        held = sum(not finished(names[i]) for i in set(mine) - usable)  # unfinished, left alone this run
        log(f"rank {rank}: nothing to do now; {held} of its unfinished shards left as they are" if held else
            f"all {len(urls)} shards already captioned by {cap}; nothing to do" if not left else
            f"rank {rank}: its shards are already captioned by {cap} ({left} of other ranks remain); nothing to do")
    else:
        bar = ShardBar(n_todo, desc=f"relabel {cap}: {n_todo} shards", unit="caption", disable=not cfg.progress)
        try:
            if cfg.workers == 1:
                captioner = load_captioner(cfg.captioner)
                _record_settings(out, cfg)
                batcher = Batcher(captioner, cfg.batch_size, log=bar.write)
                for url, name in todo[0]:
                    run = caption_shard(url, name, out, captioner, batcher, cfg, progress=bar.update)
                    if run is not None:
                        runs.append(run)
                        bar.shard_done(run.done + run.failed)
                        bar.set_postfix(shards=len(runs))
            else:
                runs = _run_workers(todo, out, cfg, bar)
        except BaseException:
            _remove_if_no_lines(out, cap, created)
            raise
        finally:
            bar.close()
    secs = time.perf_counter() - t0
    run = {"done": sum(r.done for r in runs), "failed": sum(r.failed for r in runs),
           "skipped": sum(r.skipped for r in runs), "shards": len(runs), "seconds": round(secs, 3)}
    model, prompt = _model_prompt(out, names, cap)
    tokens = Counter()
    for r in runs:
        tokens.update(r.visual_tokens)
    summary = summarize(cap, model, prompt, {n: _load_stats(paths(out, n, cap)[2]) if finished(n) else None
                                             for n in names}, run, {r.name: r.damaged for r in runs if r.damaged},
                        visual_tokens=tokens)
    path = atomic_write(out / f"{cap}-summary.json", json.dumps(summary, indent=2) + "\n")
    if n_todo:
        log(format_summary(summary) + f"\nsummary: {path}")
    return Relabeling(len(urls), n_todo, runs, secs, summary, path)
