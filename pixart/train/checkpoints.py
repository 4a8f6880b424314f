"""Training checkpoints in a run folder, written so that a kill at any moment leaves one that resumes.

    RUN/checkpoints/step-000500/
        config.json  model.safetensors  ema.safetensors   the consolidated folder: `sample`,
        diffusion.json                                     `export-diffusers` and the next stage read it
        trainer.json                                       step and what the run has logged
        loader-rank{R}.json                                each rank's data position
        deepspeed/state/...                                DeepSpeed's (sharded) optimizer state (one folder
                                                           per engine: distillation has generator/, fake/)
        deepspeed-universal/state/...                      the same, converted by DeepSpeed's ds_to_universal
                                                           when the run resumed at another world size
    RUN/checkpoints/latest                                 "step-000500", replaced atomically

A checkpoint is written under `.step-000500.tmp` by all ranks and renamed by rank 0 only when
complete; `latest` moves after that. A kill during a save leaves the temporary folder (removed
on the next start) and `latest` on the previous checkpoint.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import time
import uuid
from argparse import Namespace
from contextlib import contextmanager, redirect_stdout
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pixart.atomic import atomic_write, remove_dead_writers, share_modes
from pixart.checkpoint import (
    EMA_FILE,
    LATEST_POINTER,
    checkpoint_folder,
    load_config,
    read_json,
    read_state_dict,
    unreadable_reason,
    write_weights,
)
from pixart.errors import PixArtError, first_line
from pixart.models.config import ModelConfig

TRAINER_FILE, DS_DIR, DS_TAG = "trainer.json", "deepspeed", "state"
UNIVERSAL_DIR = "deepspeed-universal"  # DeepSpeed's state converted for another world size
RUN_ID = "run_id"  # a run's identity, made when its first start writes nothing yet; kept by every resume
CONVERSION_WAIT = timedelta(hours=6)  # how long the other ranks wait for rank 0's `universal_state`
log = logging.getLogger("pixart.train")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or None before the first save."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST_POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_FILE).is_file():
        raise PixArtError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def clean_partial(run_dir: str | os.PathLike) -> None:
    """Remove what a kill left half-written (rank 0, before anything else): checkpoints and their conversions
    for another world size (`universal_state`), and the temp files of
    the run's small records (`latest`, `config.yaml`, `DONE.json`) and sample grids (a resumed run does not
    draw a grid of a step before its checkpoint again)."""
    root = Path(run_dir) / "checkpoints"
    if _rank() == 0:
        remove_dead_writers(Path(run_dir))
        remove_dead_writers(Path(run_dir) / "samples")
        if root.is_dir():
            remove_dead_writers(root)
            for tmp in [*root.glob(".step-*.tmp"), *root.glob(f"step-*/.{UNIVERSAL_DIR}-*.tmp")]:
                shutil.rmtree(tmp, ignore_errors=True)
    _barrier()


FREE_FIELDS = ("attn_backend", "class_dropout_prob")  # model fields a resumed run may change: no weight depends on them


def started_from(init: str | os.PathLike | None, run_dir: str | os.PathLike) -> str | None:
    """The name a run records for the checkpoint it starts from (`model.init`, a `latest` pointer read to its step
    folder): its path relative to the folder holding the run folder when it lies inside it (a recipe's steps lie
    side by side), else its real path, so that a moved or copied recipe run keeps the same names."""
    if init is None:
        return None
    folder = Path(os.path.realpath(checkpoint_folder(init)))
    try:
        return str(folder.relative_to(os.path.realpath(Path(run_dir).parent)))
    except ValueError:
        return str(folder)


def init_of(cfg) -> tuple[str, str | None]:
    """What a run starts from, as (config key, value): a distillation's teacher, a stage's init."""
    return ("teacher.init", cfg.teacher.init) if hasattr(cfg, "teacher") else ("model.init", cfg.model.init)


def run_id_of(init: str | os.PathLike | None) -> str | None:
    """The `RUN_ID` of the run that made checkpoint folder `init` (its trainer.json's, or a reparameterized
    folder's run folder's DONE.json's), or None where none is recorded (a run from before ids, a DiT file): a step
    redone in place writes the same step names, but not the same id."""
    if init is None:
        return None
    folder = checkpoint_folder(init)
    for record in (folder / TRAINER_FILE, folder.parent / "DONE.json"):
        if folder.is_dir() and record.is_file():
            return read_json(record).get(RUN_ID)
    return None


def resume_settings(cfg, run_dir: str | os.PathLike) -> dict:
    """What a checkpoint can only be resumed with, beside its model and process count (its trainer.json records
    them): DeepSpeed's state is laid out by precision and ZeRO stage, and a run continues only from the weights
    it started from (`started_from`, and the `RUN_ID` of the run that made them), lest its output mix two inputs.
    The run's own `RUN_ID` is its latest checkpoint's, or a new one (only rank 0's is written)."""
    key, init = init_of(cfg)
    ckpt = latest_checkpoint(run_dir)
    own = read_json(ckpt / TRAINER_FILE).get(RUN_ID) if ckpt else None
    return {"deepspeed.precision": cfg.deepspeed.precision, "deepspeed.zero_stage": cfg.deepspeed.zero_stage,
            key: started_from(init, run_dir), f"{key}.{RUN_ID}": run_id_of(init), RUN_ID: own or uuid.uuid4().hex}


RUN_KINDS = {"train": "a training stage's (pixart train)", "distill": "a distillation's (pixart distill)"}


def run_kind(settings: dict) -> str | None:
    """Which command made (or resumes) a checkpoint, told by the input its settings name (`init_of`)."""
    return "distill" if "teacher.init" in settings else "train" if "model.init" in settings else None


def changed_input(run_dir: Path, key: str, was, now, later: list | None = None) -> PixArtError:
    """The one line refusing to go on with a run made from another input; `later`: the folders of the runs made
    from it, where known."""
    also = "(and the folders of the runs made from it)" if later is None else \
        f"(and {', '.join(map(str, later))}, made from it)" if later else ""
    return PixArtError(f"{run_dir} was made from {key} {was}, now {now}; delete {run_dir} {also}".rstrip() +
                       " to redo it from the new input, or restore the old one")


def with_run(name, run_id) -> str:
    """An input as a refusal names it: its path, and the id of the run that made it when known."""
    return f"{name} (run {run_id})" if run_id else f"{name}"


def check_resumable(run_dir: Path, world: int, settings: dict, model: ModelConfig, elastic: bool = False) -> None:
    """Refuse, in one line, to resume a checkpoint this run could not load exactly: one saved by another number
    of processes (unless `elastic`: `train.elastic`), with other `settings` ({"deepspeed.precision": ..., ...}, as
    its trainer.json records them), from another init, or of another model."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return
    fresh = "; a run resumes as it was saved (another --run-dir with model.init set to it starts from its weights)"
    saved = saved_world(ckpt)
    if saved != world and not elastic:
        raise PixArtError(f"{ckpt}: saved at world size {saved}, resumed at {world}; set train.elastic=true (in a "
                          "recipe, elastic: true at its top) to continue it at this size (its data position "
                          "restarts the epoch)")
    if saved != world and _rank() == 0:
        log.warning("%s: saved at world size %d, resumed at %d (train.elastic): the global batch is now %d/%d of "
                    "what it was, unless data.batch_size or optim.grad_accum changed with it", ckpt, saved, world,
                    world, saved)
    recorded = read_json(ckpt / TRAINER_FILE)
    was, now = run_kind(recorded), run_kind(settings)
    if was and now and was != now:  # the other command's checkpoint: its config must not be overwritten
        raise PixArtError(f"{run_dir} holds {RUN_KINDS[was]} checkpoints, not {RUN_KINDS[now]}; give another "
                          "--run-dir")
    for key, value in settings.items():
        if key == RUN_ID or key.endswith(f".{RUN_ID}") and (value is None or recorded.get(key) is None):
            continue  # the run's own id is its checkpoint's; an input's id, when either side has none, is unknown
        if key in recorded and recorded[key] != value:
            if key.endswith(f".{RUN_ID}"):
                init = key.removesuffix(f".{RUN_ID}")
                raise changed_input(run_dir, init, with_run(recorded.get(init), recorded[key]),
                                    with_run(settings.get(init), value))
            if key.endswith(".init"):
                raise changed_input(run_dir, key, recorded[key], value)
            raise PixArtError(f"{ckpt}: saved with {key} {recorded[key]!r}, this config has {value!r}{fresh}")
    old, new = load_config(ckpt).to_dict(), model.to_dict()
    changed = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in old if old[k] != new[k] and k not in FREE_FIELDS)
    if changed:
        raise PixArtError(f"{ckpt}: its model differs from this config's ({changed}){fresh}")


def saved_world(ckpt: Path) -> int:
    """How many processes saved checkpoint `ckpt`: each wrote its data position."""
    return len(list(ckpt.glob("loader-rank*.json")))


def needs_universal(run_dir: str | os.PathLike, world: int) -> bool:
    """Whether resuming `run_dir` at `world` processes needs DeepSpeed's universal checkpoint: its latest
    checkpoint was saved at another world size with ZeRO-partitioned optimizer state (`*optim_states.pt`). ZeRO 0
    keeps the whole state in every process (in `mp_rank_00_model_states.pt`), which loads at any world size."""
    ckpt = latest_checkpoint(run_dir)
    return ckpt is not None and saved_world(ckpt) != world and any((ckpt / DS_DIR).rglob("*optim_states.pt"))


def open_run(run_dir: Path, resolved_yaml: str, world: int, settings: dict, model: ModelConfig,
             elastic: bool = False) -> None:
    """Rank 0 makes the run folder, holds it (`hold_folder`: two runs writing one folder's checkpoints would
    corrupt them) and writes the resolved config (that file alone reruns the run); every rank then waits while
    what a kill left half-written is removed. A rerun whose config cannot resume the run's checkpoint
    (`check_resumable`), or a folder another run holds, stops first, with nothing rewritten."""
    hold_on_rank0(run_dir, RUN_LOCK, "train or distill run")
    check_resumable(run_dir, world, settings, model, elastic)
    if _rank() == 0:
        atomic_write(run_dir / "config.yaml", resolved_yaml)
    clean_partial(run_dir)


RUN_LOCK = ".run.lock"
_HELD: dict[str, int] = {}  # lock file -> its open file, held until released or the process ends


def hold_on_rank0(folder: Path, name: str, what: str) -> int | None:
    """Rank 0 makes the folder and holds it (`hold_folder`; returns the lock there); when it cannot, every rank
    stops with rank 0's line."""
    lock, busy = None, None
    if _rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock = hold_folder(folder, name, what)
        except PixArtError as e:
            busy = str(e)
    if dist.is_initialized():
        said = [busy]
        dist.broadcast_object_list(said, src=0)
        busy = said[0]
    if busy is not None:
        raise PixArtError(busy)
    return lock


def hold_folder(folder: Path, name: str, what: str) -> int:
    """An exclusive lock on FOLDER/NAME, which the system releases when the process ends, a kill included: while
    another process holds it, one line naming that process. A process may hold a folder again (a launch's
    stages, tests); returns the lock's open file."""
    import fcntl
    import socket

    path = str((folder / name).resolve())
    if path in _HELD:
        held = _HELD.pop(path)
        if os.path.exists(path) and os.fstat(held).st_ino == os.stat(path).st_ino:
            _HELD[path] = held
            return held
        os.close(held)  # its file was deleted (the folder removed to redo it): lock the new one
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: a filesystem without locks
            log.warning("%s: cannot be locked here (%s), so nothing stops a second pixart %s from writing it",
                        folder, e.strerror, what)
        else:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "its process unknown"
            os.close(fd)
            raise PixArtError(f"{folder} is in use by another pixart {what} ({holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    _HELD[path] = fd
    return fd


def release_run(run_dir: Path) -> None:
    """Give up the run folder's hold (rank 0's) once its run is done, so that a long-lived process (a notebook, a
    sweep) does not keep it from the next run."""
    fd = _HELD.get(str((Path(run_dir) / RUN_LOCK).resolve()))
    if fd is not None:
        release_folder(fd)


def release_folder(fd: int) -> None:
    """Give up a `hold_folder` lock before the process ends."""
    for path, held in list(_HELD.items()):
        if held == fd:
            del _HELD[path]
    os.close(fd)


def fault_point(where: str, step: int) -> None:
    """Tests' fault injection: PIXART_FAULT=<where>:<step> kills this process (SIGKILL) here;
    <where>:<step>:<SIGNAL> sends it that signal (a scheduler's SIGTERM)."""
    fault = os.environ.get("PIXART_FAULT", "").split(":")
    if fault[:2] == [where, str(step)]:
        os.kill(os.getpid(), getattr(signal, fault[2]) if len(fault) > 2 else signal.SIGKILL)


def save(run_dir: Path, step: int, engines: dict, files: dict[str, str], model_state: dict | None,
         ema_state: dict | None, loader_state: dict, trainer_state: dict, keep_last: int) -> Path:
    """Every rank calls it; `engines` {tag: DeepSpeed engine} (a stage has one, `DS_TAG`; distillation two),
    `files` small text files (config.json...), `model_state`/`ema_state` the gathered tensors (rank 0's matter)."""
    root = run_dir / "checkpoints"
    name = step_name(step)
    tmp, final = root / f".{name}.tmp", root / name
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    for tag, engine in engines.items():
        engine.save_checkpoint(str(tmp / DS_DIR), tag=tag, save_latest=False)
    atomic_write(tmp / f"loader-rank{_rank()}.json", json.dumps(loader_state))
    if _rank() == 0:
        for file, text in files.items():
            (tmp / file).write_text(text)
        write_weights(tmp, model_state, ema_state)
        (tmp / TRAINER_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    _barrier()
    fault_point("mid-save", step)
    if _rank() == 0:
        share_modes(tmp)  # safetensors writes 0600: teammates on a shared filesystem export and sample from it
        _fsync_tree(tmp)
        if final.exists():  # a save of this step already landed (re-run after a crash): keep one
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / LATEST_POINTER, name)
        prune(root, keep_last)
    _barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders, newest by number: step-1000000 comes after step-999000."""
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def restore(run_dir: str | os.PathLike, engines: dict, ema, batches) -> dict | None:
    """Resume from the run's latest checkpoint, if any: DeepSpeed's state into each of `engines` {tag: engine},
    the EMA, and this rank's data position into `batches` (when it keeps one). Returns the trainer state
    (`step`, ...) or None before the first save.

    An engine built to load a universal checkpoint (`needs_universal`) reads the state converted for it; at
    another world size rank R reads the data position of saved rank R mod the saved world size, which the
    shard loader turns into a restart of its epoch."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    with states_read_as_data():
        for tag, engine in engines.items():
            folder = universal_state(ckpt, tag) if engine.load_universal_checkpoint() else ckpt / DS_DIR
            path, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            if path is None:
                raise PixArtError(f"{ckpt}: DeepSpeed could not load its state ({folder.name}/{tag})")
            if engine.load_universal_checkpoint():
                own_step_counts(engine.basic_optimizer)
    if (ckpt / EMA_FILE).is_file():
        ema.load_full_state(read_state_dict(ckpt / EMA_FILE), str(ckpt / EMA_FILE))
    loader_file = ckpt / f"loader-rank{_rank() % max(1, saved_world(ckpt))}.json"
    if not loader_file.is_file():
        raise PixArtError(f"{loader_file}: missing: this rank's data position was not saved (an incomplete checkpoint)")
    loader_state = read_json(loader_file)
    if loader_state and hasattr(batches, "load_state_dict"):
        batches.load_state_dict(loader_state)
    trainer = read_json(ckpt / TRAINER_FILE)
    if _rank() == 0:
        log.info("resumed from %s at step %d", ckpt, trainer["step"])
    return trainer


def universal_state(ckpt: Path, tag: str) -> Path:
    """Rank 0 converts engine `tag`'s ZeRO state in `ckpt` with DeepSpeed's `ds_to_universal` (once: a rerun reuses
    it; a kill mid-way leaves only a temp folder, redone), while the other ranks wait; returns the folder of the
    converted state, for `load_checkpoint` with `checkpoint.load_universal`. One extraction process: workers
    started by spawn or forkserver would not read through `states_read_as_data`. The others wait on the process
    group's rendezvous store, for up to `CONVERSION_WAIT` rather than the run's collective timeout, which an XL
    state on a shared filesystem may outlast; rank 0 posts there whether it converted, so a failed conversion
    stops them with its reason. A universal load restores the trained parameters only, not the module's state
    dict: our models' buffers are fixed tables (`pos_embed`) or made from the seed or the init (`y_embedding`),
    as at the run's start."""
    target, key = ckpt / UNIVERSAL_DIR, f"pixart.universal_state:{ckpt.resolve()}:{tag}"
    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() and dist.get_world_size() > 1 \
        else None
    if _rank() == 0:
        outcome = "ok"
        try:
            if not (target / tag).is_dir():
                _convert(ckpt, tag)
        except BaseException as e:
            outcome = f"failed: {first_line(e, 300)}"
            raise
        finally:
            if store is not None:
                store.set(key, outcome)
    elif store is not None:
        store.wait([key], CONVERSION_WAIT)
        outcome = store.get(key).decode()
        if outcome != "ok":
            raise PixArtError(f"{ckpt / DS_DIR / tag}: rank 0 could not convert it for this world size ({outcome})")
    return target


def _convert(ckpt: Path, tag: str) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    target, tmp = ckpt / UNIVERSAL_DIR, ckpt / f".{UNIVERSAL_DIR}-{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a universal checkpoint for another world size (DeepSpeed's ds_to_universal)",
             ckpt / DS_DIR / tag)
    start = time.monotonic()
    with open(os.devnull, "w") as null, redirect_stdout(null):  # its prints (tqdm's bars go to stderr)
        ds_to_universal(Namespace(input_folder=str(ckpt / DS_DIR / tag), output_folder=str(tmp / tag),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True))
    _fsync_tree(tmp / tag)
    target.mkdir(exist_ok=True)
    os.replace(tmp / tag, target / tag)
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted it to %s in %.0f s", target / tag, time.monotonic() - start)


def own_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """DeepSpeed's universal load assigns Adam's `step` straight into the optimizer's state: one CPU tensor shared
    by every parameter group (ZeRO-3's sub-groups), where each update would count it again, and off the device
    that fused AdamW needs it on. Give each its own float32 copy on its parameter's device, as torch's
    `Optimizer.load_state_dict` does for a fused optimizer."""
    for param, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(param.device, torch.float32, copy=True)


@contextmanager
def states_read_as_data():
    """DeepSpeed unpickles its `.pt` states (and `ds_to_universal` its inputs) with weights_only=False, which runs
    any code a run folder holds; a resumed run may be a teammate's or a download, so while they read, `torch.load`
    reads tensors and plain values only, plus the plain-data types DeepSpeed stores in them (ZeRO's stage, its loss
    scalers, a fragment's address)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load

    def load(f, *args, **kwargs):
        try:
            with torch.serialization.safe_globals([DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]):
                return real(f, *args, **{**kwargs, "weights_only": True})
        except Exception as e:
            raise PixArtError(f"{f}: not read: {unreadable_reason(e)}") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _fsync_tree(folder: Path) -> None:
    """Flush every file so the rename never publishes data still in the page cache."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
