"""The training stage end to end on a real (tiny) feature cache: resume, kills, NaN, damaged shards."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pickles import RunsCode
from PIL import Image
from safetensors.torch import load_file
from tolerance import adam_steps, reordered

from pixart.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tiny_feature_cache):
    return tiny_feature_cache


def stage(cache: Path, tmp: Path, name="stage.yaml", **over) -> Path:
    cfg = {
        "stage": "toy",
        "model": {"name": "PixArt-S/2", "arch": {"input_size": 8, "in_channels": 48, "depth": 2, "hidden_size": 48,
                                                 "num_heads": 4, "caption_channels": 32, "learn_sigma": False}},
        "data": {"shards": str(cache / "feats"), "batch_size": 4, "caption": "txt", "num_workers": 1},
        "diffusion": {"prediction": "v_prediction"},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "train": {"max_steps": 6, "log_every": 1, "ckpt_every": 2, "keep_last": 5, "record_keys": True},
        "ema": {"decay": 0.9},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
    }
    for key, value in over.items():  # section=value replaces a section, section__key=value sets one key
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, run_dir: Path, fault: str | None = None, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PIXART_FAULT", None)
    if fault:
        env["PIXART_FAULT"] = fault
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "pixart", "train", str(config), "--run-dir", str(run_dir), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def weights(run_dir: Path, step: int, file: str) -> dict:
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / file)


def keys(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "keys-rank0.jsonl").read_text().splitlines()]


def assert_same(a: Path, b: Path, step: int) -> None:
    for file in ("model.safetensors", "ema.safetensors"):
        wa, wb = weights(a, step, file), weights(b, step, file)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), file  # bitwise, fp32 on the CPU
    assert keys(a) == keys(b)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    r = train(stage(cache, tmp), tmp / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "run"


def test_a_run_writes_what_it_promises(straight):
    done = json.loads((straight / "DONE.json").read_text())
    assert done["steps"] == 6 and done["checkpoint"].endswith("step-000006")
    assert (straight / "checkpoints" / "latest").read_text() == "step-000006"
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"} <= rows[0].keys()
    assert [r["lr"] for r in rows[:2]] == pytest.approx([0.5e-3, 1e-3])  # the next step's, as PixArt logs it
    assert all(r["loss"] > 0 for r in rows)
    assert Image.open(straight / "loss.png").size[0] > 100
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((straight / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    model = load_model(straight / "checkpoints" / "step-000006", ema=True)  # what export-diffusers reads
    assert model.config.in_channels == 48
    assert [k["step"] for k in keys(straight)] == [1, 2, 3, 4, 5, 6]
    umask = os.umask(0)
    os.umask(umask)
    for file in ("model.safetensors", "ema.safetensors", "config.json"):  # readable by the team, as exports are
        mode = (straight / "checkpoints" / "step-000006" / file).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, (file, oct(mode))


def test_old_checkpoints_are_pruned_by_step_number(tmp_path):
    from pixart.train.checkpoints import prune, step_name

    for step in (999_000, 1_000_000, 998_000):
        (tmp_path / step_name(step)).mkdir()
    prune(tmp_path, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1000000"]


def test_resume_after_kill_is_exact(cache, straight, tmp_path):
    config = stage(cache, tmp_path)
    killed = train(config, tmp_path / "run", "after-step:3")
    assert killed.returncode == -9
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000002"
    for log in ("metrics.jsonl", "keys-rank0.jsonl"):  # what a crash in the middle of an append leaves
        with open(tmp_path / "run" / log, "a") as f:
            f.write('{"step": 4, "lo')
    resumed = train(config, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert_same(straight, tmp_path / "run", 6)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # step 3's first pass cut from the log


def test_a_schedulers_sigterm_saves_the_step_and_the_rerun_resumes_exactly(cache, straight, tmp_path):
    """SIGTERM (Kubernetes' eviction, Slurm's end of time) during step 3: the step ends, is saved although
    ckpt_every is 2, and the run stops with one line and the shell's code for SIGTERM; a rerun goes on exactly."""
    config = stage(cache, tmp_path)
    stopped = train(config, tmp_path / "run", "after-step:2:SIGTERM")  # noted at the end of step 2, acted on after 3
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    latest = tmp_path / "run" / "checkpoints" / "step-000003"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == latest.name
    assert f"pixart train: rank 0: toy stopped by SIGTERM after step 3, checkpoint {latest} written; rerun the " \
        "same command to resume from it" in stopped.stderr.splitlines()
    assert not (tmp_path / "run" / "DONE.json").exists()
    resumed = train(config, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(straight, tmp_path / "run", 6)


def test_slurms_sigterm_to_the_whole_job_spares_the_loader_workers_until_the_step_is_saved(cache, tmp_path):
    """Slurm signals every process of the job step, the DataLoader's workers too: killed, they had crashed the
    save with "DataLoader worker is killed by signal: Terminated" and lost the steps since the last checkpoint."""
    import time

    config = stage(cache, tmp_path, data__num_workers=2, train__max_steps=100_000, train__ckpt_every=100_000)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    run = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        job = subprocess.Popen([sys.executable, "-m", "pixart", "train", str(config), "--run-dir", str(run)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 20:
                assert job.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-2000:]
                time.sleep(0.2)
            os.killpg(job.pid, signal.SIGTERM)  # as slurmstepd does: the job's every process
            assert job.wait(timeout=300) == 143, (tmp_path / "log").read_text()[-2000:]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    step = int((run / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert step >= 20 and "stopped by SIGTERM" in (tmp_path / "log").read_text()


def test_a_second_stop_signal_ends_the_process_at_once_but_not_the_first_one_relayed():
    """The first SIGTERM asks for a checkpoint. The same signal again at once is that notice relayed: under Slurm
    and torchrun a worker gets scancel's SIGTERM from slurmstepd (every process of the step, scancel(1)) and again
    from torchrun's agent, which forwards its own (torch/distributed/run.py, --signals-to-handle). A second one
    later (an impatient user) kills as the signal does by default, and the handlers before are back."""
    code = ("import os, signal, time\n"
            "from pixart.train import preemption\n"
            "preemption.ECHO_S = 1.0\n"
            "with preemption.StopSignals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.1)\n"
            "    print('noted', stop.received == signal.SIGTERM, flush=True)\n"
            "    time.sleep(1.0)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "print('still running')\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGTERM and r.stdout == "noted True\n", (r.returncode, r.stdout, r.stderr)


def test_kill_during_checkpoint_save_keeps_the_previous_one(cache, straight, tmp_path):
    config = stage(cache, tmp_path)
    killed = train(config, tmp_path / "run", "mid-save:4")
    assert killed.returncode == -9
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-000002"
    assert (ckpts / ".step-000004.tmp").is_dir() and not (ckpts / "step-000004").exists()
    resumed = train(config, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (ckpts / ".step-000004.tmp").exists()
    assert_same(straight, tmp_path / "run", 6)


def test_a_rerun_that_cannot_resume_the_checkpoint_is_one_line_and_rewrites_nothing(cache, straight, tmp_path):
    """A rerun with another model, precision, ZeRO stage or process count would load the checkpoint wrongly or
    crash in DeepSpeed: it is refused before anything is written."""
    import shutil

    from pixart.errors import PixArtError
    from pixart.models.config import ModelConfig
    from pixart.train.checkpoints import check_resumable

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = (run / "config.yaml").read_text()
    r = train(stage(cache, tmp_path), run, None, "--max-steps", "8", "--set", "model.arch.depth=3")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith(
        "step-000006: its model differs from this config's (depth 2 -> 3); a run resumes as it was saved "
        "(another --run-dir with model.init set to it starts from its weights)")
    assert (run / "config.yaml").read_text() == before and not (run / "checkpoints" / "step-000008").exists()

    model = ModelConfig.from_dict(json.loads((run / "checkpoints" / "step-000006" / "config.json").read_text()))
    saved = {"deepspeed.precision": "fp32", "deepspeed.zero_stage": 1}
    check_resumable(run, 1, saved, model)  # what the run was saved with resumes
    for world, settings, message in (
            (2, saved, "saved at world size 1, resumed at 2; set train.elastic=true (in a recipe, elastic: true at "
                       "its top) to continue it at this size"),
            (1, {**saved, "deepspeed.precision": "bf16"}, "deepspeed.precision 'fp32', this config has 'bf16'"),
            (1, {**saved, "deepspeed.zero_stage": 3}, "saved with deepspeed.zero_stage 1, this config has 3"),
            (1, {**saved, "model.init": "s1/checkpoints/step-000002"},  # it started from no init: not another one
             f"{run} was made from model.init None, now s1/checkpoints/step-000002; delete {run}"),
            (1, {**saved, "teacher.init": "s3"},  # `pixart distill --run-dir` of a stage: its config.yaml stays
             f"{run} holds a training stage's (pixart train) checkpoints, not a distillation's (pixart distill); "
             "give another --run-dir")):
        with pytest.raises(PixArtError, match=re.escape(message)):
            check_resumable(run, world, settings, model)


def test_a_run_folder_another_run_holds_is_refused_and_left_as_it_was(cache, straight, tmp_path):
    """Two `pixart train` into one folder wrote the same checkpoints (a reviewer's pair ended in "latest names
    step-000130, which is not a complete checkpoint"): the second stops in one line naming the first."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = sorted(p.name for p in run.rglob("*"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from pixart.train.checkpoints import "
         "RUN_LOCK, hold_folder; hold_folder(Path(sys.argv[1]), RUN_LOCK, 'run'); print('held', flush=True); "
         "time.sleep(120)", str(run)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = train(stage(cache, tmp_path), run, None, "--max-steps", "8")
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(rf"error: {re.escape(str(run))} is in use by another pixart train or distill run "
                     rf"\(pid {holder.pid} on .+\)$", r.stderr.strip().splitlines()[-1]), r.stderr[-500:]
    assert sorted(p.name for p in run.rglob("*")) == before
    r = train(stage(cache, tmp_path), run, None, "--max-steps", "8")  # the holder is gone: the run resumes
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "checkpoints" / "step-000008").is_dir()


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    """NFS without lockd, or a FUSE store, refuse fcntl locks (ENOLCK): a run folder there is not "in use"."""
    import errno
    import fcntl

    from pixart.errors import PixArtError
    from pixart.train.checkpoints import hold_folder, release_folder

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    release_folder(hold_folder(tmp_path, ".run.lock", "run"))
    assert caplog.messages == [f"{tmp_path}: cannot be locked here (No locks available), so nothing stops a second "
                               "pixart run from writing it"]

    def held(fd, op):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "lockf", held)
    with pytest.raises(PixArtError, match=rf"^{re.escape(str(tmp_path))} is in use by another pixart run \(pid "):
        hold_folder(tmp_path, ".run.lock", "run")


def test_a_folder_removed_and_made_again_is_held_again_and_a_finished_run_lets_go(tmp_path):
    """One process (a notebook, a sweep) that deletes a run folder to redo it holds the new folder, not the
    deleted lock file; and a run that finished gives its folder up for the next one."""
    import shutil

    from pixart.train.checkpoints import RUN_LOCK, hold_folder, release_run

    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")

    def another_process_can_lock() -> bool:
        return subprocess.run([sys.executable, "-c", probe, str(run / RUN_LOCK)], capture_output=True).returncode == 0

    run = tmp_path / "run"
    run.mkdir()
    hold_folder(run, RUN_LOCK, "run")
    shutil.rmtree(run)
    run.mkdir()
    hold_folder(run, RUN_LOCK, "run")
    assert not another_process_can_lock()
    release_run(run)
    assert another_process_can_lock()


def test_resume_reads_deepspeeds_states_as_data_and_never_runs_a_pickles_code(cache, straight, tmp_path):
    """DeepSpeed's own loader unpickles with weights_only=False; a run folder from someone else must not run code."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ran = tmp_path / "ran"
    states = run / "checkpoints" / "step-000006" / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCode(f"touch {ran}")}, states)
    r = train(stage(cache, tmp_path), run, None, "--max-steps", "8")
    assert r.returncode == 2, r.stderr[-2000:]
    assert not ran.exists()
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"pixart train: error: {states}: not read: it holds objects other than tensors, which are "
                    "never unpickled: Trying to load unsupported GLOBAL posix.system whose module posix is blocked")


def test_an_fp16_runs_loss_scaler_is_read_as_data(tmp_path):
    """fp16 needs a GPU in DeepSpeed, so its optimizer state's dynamic loss scaler is saved here directly, as
    ZeRO's `state_dict()` stores it (`state_dict[LOSS_SCALER] = self.loss_scaler`)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from pixart.train.checkpoints import states_read_as_data

    torch.save({"loss_scaler": DynamicLossScaler(2.0 ** 16, 500, 1.0, 2, False), "step": 7},
               tmp_path / "optim_states.pt")
    with states_read_as_data():  # DeepSpeed's own reader, which asks torch.load for weights_only=False
        state = TorchCheckpointEngine().load(str(tmp_path / "optim_states.pt"), map_location="cpu")
    assert state["loss_scaler"].cur_scale == 2.0 ** 16 and state["loss_scaler"].scale_window == 500


def test_a_killed_writers_temp_records_are_removed_when_the_run_resumes(cache, straight, tmp_path):
    """Also a conversion for another world size killed mid-way, whose rerun went back to the old size: up to twice
    the DeepSpeed state's size on disk, hidden."""
    import shutil
    import socket

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    host = socket.gethostname()
    dead = [run / "checkpoints" / f".latest.tmp-{host}-999999999-x", run / f".DONE.json.tmp-{host}-999999999-y",
            run / "samples" / f".step-000002.png.tmp-{host}-999999999-w"]  # a grid no resumed run draws again
    converting = run / "checkpoints" / "step-000006" / ".deepspeed-universal-state.tmp"  # killed mid-way
    (converting / "state").mkdir(parents=True)
    (run / "samples").mkdir(exist_ok=True)
    live = run / f".config.yaml.tmp-{host}-{os.getppid()}-z"  # its writer still runs: not ours to remove
    for path in (*dead, live):
        path.write_text("half")
    r = train(stage(cache, tmp_path), run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any(p.exists() for p in (*dead, converting)) and live.exists()


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(cache, tmp_path):
    run = tmp_path / "run"
    config = stage(cache, tmp_path, optim__lr=1e20, optim__warmup_steps=0, optim__grad_clip=0.0)
    r = train(config, run)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "the loss is" in line and "not finite" in line and "stopped before the update" in line
    latest = (run / "checkpoints" / "latest").read_text() if (run / "checkpoints" / "latest").exists() else None
    if latest:  # a checkpoint written before the blow-up is complete and loads
        assert latest in line
        load_model(run / "checkpoints" / latest)
    assert not (run / "DONE.json").exists()


def test_damaged_shard_mid_run_is_skipped_and_reported(cache, tmp_path):
    import shutil

    feats = tmp_path / "feats"
    shutil.copytree(cache / "feats", feats)
    shard = feats / "shapes-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] + b"\x00garbage" * 64)  # broken off mid-shard
    config = stage(cache, tmp_path, data__shards=str(feats), train__max_steps=10)
    r = train(config, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    done = json.loads((tmp_path / "run" / "DONE.json").read_text())
    assert done["steps"] == 10
    assert any("shapes-000001" in s for s in done["data"]["damaged_shards"])
    assert "damaged shards" in r.stderr


def test_class_conditional_stage_trains_on_metadata_labels_and_draws_a_grid(cache, tmp_path):
    config = stage(cache, tmp_path, model={"name": "DiT-S/2", "arch": {
        "input_size": 8, "in_channels": 48, "depth": 2, "hidden_size": 48, "num_heads": 4, "num_classes": 48,
        "learn_sigma": True}}, diffusion={"prediction": "epsilon"},
        validation={"labels": [0, 9, 17], "steps": 3, "every": 3})
    r = train(config, tmp_path / "run", None, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    grid = Image.open(tmp_path / "run" / "samples" / "step-000003.png")
    assert grid.size == (2 * 32 * 2, 3 * 32 * 2)  # 2 seeds x 3 labels of 32 px, drawn at 2x
    # a kill after the last checkpoint, before its grid and DONE.json: the rerun draws the grid it lacks
    drawn = grid.tobytes()
    for lost in (tmp_path / "run" / "samples" / "step-000003.png", tmp_path / "run" / "DONE.json"):
        lost.unlink()
    r = train(config, tmp_path / "run", None, "--max-steps", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "run" / "samples" / "step-000003.png").tobytes() == drawn
    done = json.loads((tmp_path / "run" / "DONE.json").read_text())
    assert done["checkpoint"] == str((tmp_path / "run" / "checkpoints" / "step-000003").absolute())


def test_a_class_conditional_stage_trains_on_imagenet_shards_that_have_a_cls_and_no_caption(cache, tmp_path):
    """ImageNet as timm's `imagenet-1k-wds` shards hold it (timm/data/readers/reader_wds.py reads
    `int(sample["cls"])` beside `jpg`): no caption, no label in the json. Stage 1 reads no captions."""
    import io

    import webdataset as wds

    (tmp_path / "imagenet").mkdir()
    with wds.TarWriter(str(tmp_path / "imagenet" / "imagenet1k-train-0000.tar")) as w:
        for i in range(8):
            buf = io.BytesIO()
            Image.new("RGB", (40, 32), (30 * i, 100, 200)).save(buf, "JPEG")
            w.write({"__key__": f"n01440764_{i}", "jpg": buf.getvalue(), "cls": str(i % 3),
                     "json": json.dumps({"filename": f"n01440764_{i}.JPEG"})})
    dit = {"name": "DiT-S/2", "arch": {"input_size": 8, "in_channels": 48, "depth": 2, "hidden_size": 48,
                                        "num_heads": 4, "num_classes": 3, "learn_sigma": False}}
    config = stage(cache, tmp_path, model=dit, data__shards=str(tmp_path / "imagenet"), data__resolution=32,
                   train__max_steps=2, encoders={"vae": "pixel:4"}, validation={"labels": [0, 2], "steps": 2})
    r = train(config, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(keys(tmp_path / "run")) == 2 and "missing caption" not in r.stderr
    dit["arch"]["num_classes"] = 2  # class 2 is beyond the model's classes
    r = train(stage(cache, tmp_path, "two.yaml", model=dit, data__shards=str(tmp_path / "imagenet"),
                    data__resolution=32, encoders={"vae": "pixel:4"}), tmp_path / "run2")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "has class 2; a class-conditional stage needs each sample's class in 0..1, as a `cls` member or a `label` "
        "in its json")


def test_cache_that_does_not_fit_the_model_is_refused_before_step_1(cache, tmp_path):
    arch = {"input_size": 8, "in_channels": 48, "depth": 2, "hidden_size": 48, "num_heads": 4,
            "caption_channels": 64}
    r = train(stage(cache, tmp_path, model={"name": "PixArt-S/2", "arch": arch}), tmp_path / "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith("manifest.json: text_dim 32 != model caption_channels 64")
    r = train(stage(cache, tmp_path, data__expected={"resolution": 64}), tmp_path / "run2")
    assert r.returncode == 2 and "resolution" in r.stderr.strip().splitlines()[-1]
    r = train(stage(cache, tmp_path, data__shards=str(tmp_path / "nope")), tmp_path / "run3")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.endswith(f"data.shards: {tmp_path}/nope: no such shard")
    r = train(stage(cache, tmp_path, model__init=str(tmp_path / "nope")), tmp_path / "run4")
    assert r.returncode == 2 and "nope: not a checkpoint folder" in r.stderr.strip().splitlines()[-1]
    (tmp_path / "ds.json").write_bytes(b"\xff{not utf-8")
    r = train(stage(cache, tmp_path, deepspeed__config=str(tmp_path / "ds.json")), tmp_path / "run5")
    assert r.returncode == 2 and "ds.json: cannot read DeepSpeed JSON" in r.stderr.strip().splitlines()[-1]
    bare = tmp_path / "bare"  # features without their manifest: nothing names the decoder the grid needs
    shutil.copytree(cache / "feats", bare, ignore=shutil.ignore_patterns("manifest.json"))
    r = train(stage(cache, tmp_path, data__shards=str(bare), validation={"prompts": ["a red circle"]}),
              tmp_path / "run6")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "encoders.vae: needed (raw shards or validation images) and no feature manifest names one")
    runs = ["run", "run2", "run3", "run4", "run5", "run6"]
    from deepspeed.accelerator import get_accelerator
    if not get_accelerator().is_fp16_supported():  # most CPUs: DeepSpeed's own ValueError came from initialize
        r = train(stage(cache, tmp_path, deepspeed__precision="fp16"), tmp_path / "run7")
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
            "deepspeed.precision fp16: DeepSpeed does not support it on this machine (cpu); use bf16 or fp32")
        runs.append("run7")
    for run in runs:  # nothing written for a run that never started
        assert not (tmp_path / run).exists(), run


def test_sample_draws_a_grid_from_a_trained_checkpoint_with_its_own_encoders(straight, cache, tmp_path, capsys):
    from pixart.cli.main import main
    from pixart.data.manifest import Manifest
    from pixart.encoders import make_tiny_t5

    ckpt = straight / "checkpoints" / "step-000006"
    enc = json.loads((ckpt / "encoders.json").read_text())
    assert enc["image_encoder"] == "pixel:4" and enc["text_encoder"].endswith("t5")
    assert enc["dtype"] == Manifest.load(cache / "feats").dtype  # the text features' dtype, for sampling on a GPU
    assert json.loads((ckpt / "diffusion.json").read_text()) == {"prediction_type": "v_prediction"}
    make_tiny_t5(tmp_path / "t5-16", d_model=16)
    out = tmp_path / "grid.png"
    assert main(["sample", str(ckpt), "--prompt", "a red circle", "--prompt", "a blue star", "--columns", "2",
                 "--steps", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 32, 2 * 32)  # columns x rows of 32 px images, at their own size
    assert main(["sample", str(ckpt), "--out", str(out)]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    # the run's `latest` pointer works wherever a checkpoint folder does (README, docs/export.md)
    latest = straight / "checkpoints" / "latest"
    jpg = tmp_path / "grid.jpg"
    assert main(["sample", str(latest), "--prompt", "a red circle", "--steps", "2", "--out", str(jpg)]) == 0
    assert "EMA weights" in capsys.readouterr().out and Image.open(jpg).format == "JPEG"
    assert sorted(p.name for p in tmp_path.glob("grid*")) == ["grid.jpg", "grid.png"]  # no temp file left
    for bad, message in ((tmp_path, "is a folder; name the image file"), (tmp_path / "grid.txt", "not an image file"),
                         (tmp_path / "no" / "g.png", f"{tmp_path / 'no'} is not a folder this user can write in")):
        assert main(["sample", str(ckpt), "--prompt", "x", "--out", str(bad)]) == 2
        assert message in capsys.readouterr().err
    # the wrong kind of conditioning, and a latent size that cannot be, are refused, not drawn
    for args, message in ((["--label", "3"], "--label: .* is a text-to-image PixArt model; give --prompt"),
                          (["--prompt", "x", "--size", "0", "-3"], "--size 0 -3: latent sizes must be positive"),
                          (["--prompt", "x", "--steps", "2000"], "--steps 2000: give 1 to 1000"),
                          (["--prompt", "x", "--cfg", "nan"], "--cfg nan: give a finite scale"),
                          (["--prompt", "x", "--tau", "0"], "--tau 0.0: the gate's temperature must be positive"),
                          (["--prompt", "x", "--device", "foo"], "--device .foo.: not a device"),
                          (["--prompt", "x", "--vae", "pixel:8"], "VAE pixel:8 has 192 latent channels; the model "
                                                                  "takes in_channels=48"),
                          (["--prompt", "x", "--text-encoder", str(tmp_path / "t5-16")],
                           "has width 16; the model expects caption_channels=32")):
        assert main(["sample", str(ckpt), "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err
    # the latents' scale is the training data's (encoders.json), also when --vae names the autoencoder again
    scaled = tmp_path / "scaled"
    shutil.copytree(ckpt, scaled)
    (scaled / "encoders.json").write_text(json.dumps({**enc, "scaling_factor": 3.0}))
    grids = []
    for vae in ([], ["--vae", "pixel:4"]):
        grids.append(tmp_path / f"scaled{len(grids)}.png")
        assert main(["sample", str(scaled), "--prompt", "a red circle", "--steps", "2", "--out", str(grids[-1]),
                     *vae]) == 0
    assert np.array_equal(*(np.asarray(Image.open(g)) for g in grids))


def test_a_corrupt_done_record_is_a_one_line_error(tmp_path):
    from pixart.errors import PixArtError
    from pixart.train.trainer import is_done

    (tmp_path / "DONE.json").write_text('{"checkpoint": ')  # what a hand edit or a full disk leaves
    with pytest.raises(PixArtError, match=r"DONE\.json: not readable JSON"):
        is_done(tmp_path, 6)


def test_a_finished_run_names_its_own_checkpoint_wherever_it_was_moved(tmp_path):
    from pixart.train.trainer import is_done

    (tmp_path / "DONE.json").write_text(json.dumps({"checkpoint": "/elsewhere/run/checkpoints/step-000006",
                                                    "steps": 6}))  # as written before the folder was moved
    assert is_done(tmp_path, 6) == tmp_path / "checkpoints" / "step-000006"
    assert is_done(tmp_path, 7) is None  # asked for more steps than it ran


def test_raw_shards_are_encoded_by_frozen_encoders_in_the_training_process(cache, tmp_path):
    config = stage(cache, tmp_path, data__shards=str(cache / "raw"), data__resolution=32, train__max_steps=2,
                   encoders={"text_encoder": str(cache / "t5"), "vae": "pixel:4", "dtype": "fp32"})
    r = train(config, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert json.loads((ckpt / "encoders.json").read_text())["image_encoder"] == "pixel:4"
    assert len(keys(tmp_path / "run")) == 2


def test_data_scan_samples_bounds_the_start_up_scan_of_raw_shards(cache, caplog):
    """Raw shards carry no bucket counts: by default every sample is read at each start; `data.scan_samples` reads
    the first N (4 shards of 8 here) and gives the shards past them the scanned ones' mean."""
    from pixart.train.config import TrainConfig
    from pixart.train.trainer import build_loader

    cfg = {"shards": str(cache / "raw"), "resolution": 32, "batch_size": 2, "num_workers": 0}
    enc = {"text_encoder": str(cache / "t5"), "vae": "pixel:4", "dtype": "fp32"}
    for scan, read in ((None, 32), (12, 12)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pixart.data"):
            loader = build_loader(TrainConfig(data={**cfg, "scan_samples": scan}, encoders=enc), "pixart",
                                  torch.device("cpu"))
        assert f"scanned {read} samples of 4 shards for bucket counts" in caplog.text
        assert sum(loader.stats.populations.values()) == 32  # shard 1 read whole, 2-4 its mean


def test_compiled_blocks_train_like_eager(cache, tmp_path):
    """`model.compile` (inductor, per block, dynamic shapes) inside the DeepSpeed engine: the same losses
    and weights as eager, to fp32 reordering (fused kernels sum in another order; Adam's 1/sqrt(v) shows it)."""
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        config = stage(cache, tmp_path, f"{name}.yaml", model__compile=flag, train__max_steps=4, train__ckpt_every=4)
        result = train(config, tmp_path / name)
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("torch.compile: 2 blocks, dynamic shapes" in result.stderr + result.stdout) == flag
        runs[name] = tmp_path / name
    losses = {k: [json.loads(line)["loss"] for line in (v / "metrics.jsonl").read_text().splitlines()]
              for k, v in runs.items()}
    assert len(losses["eager"]) == 4
    eager = torch.tensor(losses["eager"])
    torch.testing.assert_close(torch.tensor(losses["compiled"]), eager, **reordered(eager))
    want, got = weights(runs["eager"], 4, "model.safetensors"), weights(runs["compiled"], 4, "model.safetensors")
    assert want.keys() == got.keys()  # compiled in place: the checkpoint's names are the model's
    for k in want:
        torch.testing.assert_close(got[k], want[k], **adam_steps(1e-3, 2.5), msg=k)  # warmup 2: 0 + 0.5 + 1 + 1


def test_auto_checkpointing_takes_the_fewest_blocks_that_fit(cache, tmp_path):
    from pixart.models import build_model
    from pixart.train.memory import GB, measure_block

    arch = yaml.safe_load(stage(cache, tmp_path).read_text())["model"]["arch"]
    block, inp = measure_block(build_model("PixArt-S/2", **arch), 4, 16, 120, torch.device("cpu"), torch.float32)
    budget = (2 * block + block + inp) / 2 / GB  # under 2 blocks, over 1 block + 1 input: checkpoint 1
    config = stage(cache, tmp_path, model__grad_checkpointing="auto", model__activation_memory_gb=budget,
                   train__max_steps=2)
    result = train(config, tmp_path / "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "activation checkpointing: 1 of 2 blocks" in result.stderr + result.stdout
    config = stage(cache, tmp_path, "tight.yaml", model__grad_checkpointing="auto",
                   model__activation_memory_gb=block / 2 / GB)
    result = train(config, tmp_path / "tight")
    assert result.returncode != 0
    assert "model.grad_checkpointing auto: activations need at least" in result.stderr
    assert not (tmp_path / "tight" / "checkpoints").exists() or not any((tmp_path / "tight" / "checkpoints").iterdir())
