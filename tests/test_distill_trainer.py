"""`pixart distill` end to end on a tiny teacher and a real feature cache: the update ratio, resume after kill -9,
two ranks against one, the GAN head and the regression pairs, bad configs, the one-step student's export."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import perturb_
from deepspeed.accelerator import get_accelerator
from safetensors.torch import load_file
from tolerance import adam_steps, reimplemented, rel_err, reordered

from pixart.checkpoint import save_checkpoint
from pixart.models import build_model

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(input_size=8, in_channels=48, depth=2, hidden_size=48, num_heads=4, caption_channels=32)


@pytest.fixture(scope="module")
def teacher(tiny_feature_cache, tmp_path_factory):
    """A tiny epsilon-predicting PixArt with learned sigma, as PixArt's own: a 'trained' checkpoint folder."""
    model = perturb_(build_model("PixArt-S/2", **ARCH), std=0.05)
    folder = tmp_path_factory.mktemp("teacher") / "ckpt"
    cache = tiny_feature_cache
    save_checkpoint(folder, model.config, model.state_dict(), model.state_dict(), extra={
        "diffusion.json": json.dumps({"prediction_type": "epsilon"}),
        "encoders.json": json.dumps({"text_encoder": str(cache / "t5"), "max_length": 120, "image_encoder": "pixel:4",
                                     "scaling_factor": None})})
    return folder


def config(cache: Path, teacher_dir: Path, tmp: Path, name="dmd.yaml", **over) -> Path:
    cfg = {
        "stage": "dmd",
        "teacher": {"init": str(teacher_dir)},
        "data": {"shards": str(cache / "feats"), "batch_size": 4, "caption": "txt", "num_workers": 1},
        "optim": {"lr": 1e-3},
        "fake": {"updates_per_generator": 2},
        "train": {"max_steps": 4, "log_every": 1, "ckpt_every": 2, "keep_last": 5},
        "ema": {"decay": 0.9},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
    }
    for key, value in over.items():  # section=value replaces a section (None removes it), section__key=value
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        elif value is None:
            cfg.pop(section)
        else:
            cfg[section] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def distill(cfg: Path, run_dir: Path, fault: str | None = None, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "PIXART_FAULT")}
    env["PYTHONPATH"] = str(ROOT)
    if fault:
        env["PIXART_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "pixart", "distill", str(cfg), "--run-dir", str(run_dir), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_feature_cache, teacher, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dmd")
    r = distill(config(tiny_feature_cache, teacher, tmp, gan={"generator_weight": 1e-2},
                       validation={"prompts": ["a red circle", "a blue square"], "steps": 3, "every": 2}), tmp / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


def test_validation_grids_show_the_teacher_beside_the_one_step_student(straight):
    import numpy as np
    from PIL import Image

    grids = [np.asarray(Image.open(straight / "samples" / f"step-{s:06d}.png")) for s in (2, 4)]
    assert grids[0].shape == (2 * 64, 4 * 64, 3)  # 2 prompts x (2 teacher + 2 student seeds), 32 px drawn at 2x
    assert np.array_equal(grids[0][:, :128], grids[1][:, :128])  # the frozen teacher's half, drawn once
    assert not np.array_equal(grids[0][:, 128:], grids[1][:, 128:])  # the student's half moves


def test_a_run_writes_a_one_step_student(straight, teacher):
    final = ckpt(straight, 4)
    student = json.loads((final / "student.json").read_text())
    assert student["start_timestep"] == 400 and Path(student["teacher"]) == teacher.resolve()
    assert json.loads((final / "diffusion.json").read_text())["prediction_type"] == "epsilon"
    assert {"model.safetensors", "ema.safetensors", "config.json", "encoders.json"} <= {p.name for p in
                                                                                        final.iterdir()}
    assert {"generator", "fake"} <= {p.name for p in (final / "deepspeed").iterdir()}  # one state per engine
    assert (straight / "loss.png").is_file() and (straight / "DONE.json").is_file()
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("dm", "fake", "gan_g", "gan_d", "loss_g", "lr_generator", "lr_fake", "grad_norm_generator"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    # the student moved away from the teacher, the EMA lags behind it (between the two)
    w, ema = load_file(final / "model.safetensors"), load_file(final / "ema.safetensors")
    t = load_file(teacher / "model.safetensors")
    assert any(not torch.equal(w[k], t[k]) for k in t)
    assert any(not torch.equal(ema[k], w[k]) for k in w) and any(not torch.equal(ema[k], t[k]) for k in t)


def test_tensorboard_has_every_loss(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight / "tensorboard"))
    acc.Reload()
    assert {"train/dm", "train/fake", "train/gan_g", "train/gan_d", "train/loss_g"} <= set(acc.Tags()["scalars"])


def test_resume_after_kill_is_exact(straight, tiny_feature_cache, teacher, tmp_path):
    cfg = config(tiny_feature_cache, teacher, tmp_path, gan={"generator_weight": 1e-2})
    killed = distill(cfg, tmp_path / "run", "after-step:3")
    assert killed.returncode == -9
    resumed = distill(cfg, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # a rerun from scratch would end on the same weights (fp32 on the CPU): the log says it resumed
    assert f"resumed from {ckpt(tmp_path / 'run', 2)} at step 2" in resumed.stderr
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpt(straight, 4) / file), load_file(ckpt(tmp_path / "run", 4) / file)
        assert all(torch.equal(a[k], b[k]) for k in a), file  # bitwise, fp32 on the CPU
    # the fake score and both optimizers resumed too: the next run's losses are equal
    assert [r["fake"] for r in metrics(straight)] == [r["fake"] for r in metrics(tmp_path / "run")]


def dist_launch(run_dir: Path, teacher: Path, zero: int, nproc: int, steps: int = 3,
                batch: int = 4, train: dict | None = None) -> subprocess.CompletedProcess:
    worker = ROOT / "tests" / "dist_distill_worker.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", DIST_WORKER_TRAIN=json.dumps(train or {}))
    args = [str(worker), str(run_dir), str(teacher), str(zero), str(batch), str(steps)]
    if nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def dist_run(run_dir: Path, teacher: Path, zero: int, nproc: int, steps: int = 3, batch: int = 4,
             train: dict | None = None) -> Path:
    r = dist_launch(run_dir, teacher, zero, nproc, steps, batch, train)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """The distributed worker's teacher: 4 latent channels, 16-d captions of 5 tokens (dist_worker's batches)."""
    model = perturb_(build_model("PixArt-S/2", input_size=8, in_channels=4, depth=2, hidden_size=64, num_heads=4,
                                 caption_channels=16, model_max_length=5), std=0.05)
    folder = tmp_path_factory.mktemp("small_teacher") / "ckpt"
    save_checkpoint(folder, model.config, model.state_dict())
    return folder


@pytest.fixture(scope="module")
def one_process(small_teacher, tmp_path_factory):
    return dist_run(tmp_path_factory.mktemp("dmd_one") / "run", small_teacher, zero=0, nproc=1)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_match_one_process(small_teacher, one_process, tmp_path, zero):
    """Both engines, the GAN head (through the frozen fake score's partitioned weights under ZeRO-3) and the
    update ratio over gloo: only the order of reductions differs."""
    one = one_process
    two = dist_run(tmp_path / "two", small_teacher, zero=zero, nproc=2)
    rows1, rows2 = metrics(one), metrics(two)
    for key in ("dm", "fake", "gan_g", "gan_d"):
        a, b = [r[key] for r in rows1], [r[key] for r in rows2]
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), key
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpt(one, 3) / file), load_file(ckpt(two, 3) / file)
        for k in a:
            torch.testing.assert_close(b[k], a[k], **adam_steps(1e-3, 3), msg=f"{file} {k}")


def test_a_distillation_resumed_on_fewer_processes_ends_where_one_process_does(small_teacher, one_process, tmp_path):
    """`train.elastic` for both ZeRO-2 engines, the generator's and the fake score's: each one's partitioned state
    is converted for one process, and on the same global batches the run ends on one process's weights."""
    run_dir = dist_run(tmp_path / "run", small_teacher, zero=2, nproc=2, train={"max_steps": 2, "ckpt_every": 2})
    resumed = dist_launch(run_dir, small_teacher, zero=2, nproc=1, train={"elastic": True})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt(run_dir, 2)} at step 2" in resumed.stderr  # not a run from scratch, which ends the same
    assert sorted(p.name for p in (ckpt(run_dir, 2) / "deepspeed-universal").iterdir()) == ["fake", "generator"]
    for key in ("dm", "fake"):
        a, b = [r[key] for r in metrics(one_process)], [r[key] for r in metrics(run_dir)]
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), key
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpt(one_process, 3) / file), load_file(ckpt(run_dir, 3) / file)
        for k in a:
            torch.testing.assert_close(b[k], a[k], **adam_steps(1e-3, 3), msg=f"{file} {k}")


def test_a_lost_rank_stops_the_other_with_one_line(small_teacher, tmp_path):
    """Rank 1 is killed (SIGKILL) after step 3; rank 0's next collective fails and it stops with the trainer's
    one line naming the step-2 checkpoint, as `pixart train` does. Two nodes of one rank each: on one node
    torchrun's agent would SIGTERM rank 0 as soon as rank 1 died, before rank 0 saw anything."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
               DIST_WORKER_TRAIN=json.dumps({"ckpt_every": 2, "collective_timeout_s": 20}),
               DIST_WORKER_FAULT=json.dumps({"rank": 1, "at": "after-step:3"}))
    args = [str(ROOT / "tests" / "dist_distill_worker.py"), str(tmp_path / "run"), str(small_teacher), "2", "4", "6"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--master_addr", "127.0.0.1", "--master_port", str(port)]
    nodes = [subprocess.Popen([*launch, "--node_rank", str(n), *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE if n == 0 else subprocess.DEVNULL, text=True)
             for n in range(2)]
    err = [node.communicate(timeout=600)[1] for node in nodes][0]
    assert [node.returncode != 0 for node in nodes] == [True, True]
    lines = [line for line in err.splitlines() if "rank 0: a collective failed during step 4" in line]
    assert len(lines) == 1, err[-3000:]
    assert str(tmp_path / "run" / "checkpoints" / "step-000002") in lines[0]


def test_update_ratio_steps_the_fake_score_n_times_per_generator_update(small_teacher, tmp_path):
    """DMD2's two-time-scale update: per step one generator update, then `updates_per_generator` fake updates,
    the first on that step's generator samples, the others on fresh batches and samples."""
    from dist_worker import global_batches

    from pixart.distill.config import DistillConfig
    from pixart.distill.trainer import FAKE, GENERATOR, DistillTrainer

    cfg = DistillConfig(teacher={"init": str(small_teacher)}, data={"shards": "-", "batch_size": 2},
                        fake={"updates_per_generator": 3}, train={"max_steps": 2, "ckpt_every": 2},
                        deepspeed={"zero_stage": 0, "precision": "fp32"})
    consumed = []

    def batches():
        for b in global_batches(100, 2):
            consumed.append(b["keys"][0])
            yield b

    trainer = DistillTrainer(cfg, tmp_path / "run", batches=batches())
    turns = []
    generator_turn, fake_turn = trainer.generator_turn, trainer.fake_turn
    trainer.generator_turn = lambda batch: (turns.append(("g", batch["keys"][0])), generator_turn(batch))[1]
    trainer.fake_turn = lambda batch, x, turn: (turns.append((f"f{turn}", batch["keys"][0])),
                                                fake_turn(batch, x, turn))[1]
    trainer.run()
    assert [t for t, _ in turns] == ["g", "f0", "f1", "f2"] * 2
    assert turns[1][1] == turns[0][1] and len({k for _, k in turns}) == 6  # f0 reuses g's batch; f1, f2 fresh
    assert len(consumed) == 6
    assert trainer.engines[GENERATOR].global_steps == 2 and trainer.engines[FAKE].global_steps == 6
    # the real score is frozen: no gradients, no optimizer state, weights as loaded
    from pixart.checkpoint import load_model

    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    loaded = load_model(small_teacher).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in trainer.teacher.state_dict().items())
    optimized = {id(p) for e in trainer.engines.values() for g in e.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in trainer.teacher.parameters()}


def test_regression_pairs_are_drawn_once_by_the_teacher_and_reused(tiny_feature_cache, teacher, tmp_path):
    cfg = config(tiny_feature_cache, teacher, tmp_path, regression={"weight": 0.25, "pairs": 8, "steps": 4},
                 dm={"weight": 1.0}, train={"max_steps": 2, "log_every": 1, "ckpt_every": 1})
    assert distill(cfg, tmp_path / "run").returncode == 0
    pairs = load_file(tmp_path / "run" / "pairs.safetensors")
    assert pairs["noise"].shape == (8, 48, 8, 8) and pairs["target"].shape == (8, 48, 8, 8)
    assert pairs["y"].shape == (8, 120, 32) and pairs["mask"].shape == (8, 120)
    # the targets are the teacher's own 4-step DPM-Solver++ samples of the stored noise at CFG 4.5
    from pixart.checkpoint import load_model
    from pixart.diffusion import NoiseSchedule, sample

    model = load_model(teacher, ema=True).eval()
    redo = sample(model, pairs["noise"], pairs["y"], pairs["mask"], model.y_embedder.y_embedding, steps=4,
                  cfg_scale=4.5, schedule=NoiseSchedule.linear())
    torch.testing.assert_close(pairs["target"], redo, **reordered(redo))
    assert all("regression" in r and "dm" in r for r in metrics(tmp_path / "run"))
    before = (tmp_path / "run" / "pairs.safetensors").stat().st_mtime_ns
    assert distill(cfg, tmp_path / "run", None, "--max-steps", "3").returncode == 0  # resumed: not redrawn
    assert (tmp_path / "run" / "pairs.safetensors").stat().st_mtime_ns == before
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    r = distill(cfg, tmp_path / "run", None, "--max-steps", "4", "--set", "regression.cfg=1.0")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(  # its pairs were drawn at CFG 4.5
        "saved with regression.pairs '8 by dpm-solver++, 4 steps, CFG 4.5', this config has '8 by dpm-solver++, "
        "4 steps, CFG 1.0'; a run resumes as it was saved (another --run-dir with model.init set to it starts "
        "from its weights)")
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml


def test_lpips_regression_reads_its_weights_from_a_file(tiny_feature_cache, teacher, tmp_path):
    import lpips
    from safetensors.torch import save_model

    metric = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)  # random weights: no download
    save_model(metric, tmp_path / "lpips.safetensors")  # what the docs tell users to write once
    from pixart.distill.trainer import load_lpips

    loaded = load_lpips(str(tmp_path / "lpips.safetensors"), torch.device("cpu")).state_dict()
    assert loaded.keys() == metric.state_dict().keys()  # every weight from the file, none left at its random init
    assert all(torch.equal(loaded[k], v) for k, v in metric.state_dict().items())
    (tmp_path / "other.safetensors").write_bytes((tmp_path / "lpips.safetensors").read_bytes()[:100])
    cfg = config(tiny_feature_cache, teacher, tmp_path, train={"max_steps": 1, "ckpt_every": 1},
                 regression={"weight": 0.25, "pairs": 4, "steps": 2, "kind": "lpips",
                             "lpips_weights": str(tmp_path / "lpips.safetensors")})
    r = distill(cfg, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert metrics(tmp_path / "run")[0]["regression"] > 0
    bad = config(tiny_feature_cache, teacher, tmp_path, name="bad.yaml", train={"max_steps": 1},
                 regression={"weight": 0.25, "kind": "lpips", "lpips_weights": str(tmp_path / "other.safetensors")})
    r = distill(bad, tmp_path / "bad")
    assert r.returncode == 2 and "regression.lpips_weights" in r.stderr and "not LPIPS(VGG) weights" in r.stderr
    assert not (tmp_path / "bad").exists()  # refused before the run folder is made


@pytest.mark.parametrize("over, message", [
    ({"teacher": None}, "teacher: Field required"),
    ({"teacher": {"init": "/nonexistent"}}, "teacher.init: /nonexistent is not a checkpoint folder"),
    ({"student": {"start_timestep": 1000}}, "student.start_timestep: Input should be less than or equal to 999"),
    ({"student": {"start_timestep": 0}}, "student.start_timestep: Input should be greater than or equal to 1"),
    ({"teacher__prediction": "v_prediction"}, "teacher.prediction: v_prediction, but the teacher predicts epsilon"),
    ({"dm": {"t_min": 900, "t_max": 100}}, "dm.t_min 900 is above dm.t_max 100"),
    ({"regression": {"weight": 0.25, "kind": "lpips"}}, "regression.lpips_weights: needed for kind lpips"),
    ({"dm": {"weight": 0}}, "nothing trains the generator"),
    ({"optim__grad_accum": 2}, "optim.grad_accum: distillation updates on one batch at a time"),
    ({"deepspeed__config": "/"}, "deepspeed.config /: cannot read DeepSpeed JSON"),  # left config.yaml behind
    pytest.param({"deepspeed__precision": "fp16"}, "deepspeed.precision fp16: DeepSpeed does not support it",
                 marks=pytest.mark.skipif(get_accelerator().is_fp16_supported(), reason="a CPU with fp16")),
])
def test_bad_configs_are_one_line_naming_the_key(tiny_feature_cache, teacher, tmp_path, over, message, capsys):
    from pixart.cli.main import main

    cfg = config(tiny_feature_cache, teacher, tmp_path, **over)
    assert main(["distill", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixart distill: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


def test_grids_with_no_named_decoder_are_refused_before_the_run_folder(tiny_feature_cache, teacher, tmp_path, capsys):
    import shutil

    from pixart.cli.main import main

    bare = tmp_path / "bare"  # features without their manifest: nothing names the decoder the grid needs
    shutil.copytree(tiny_feature_cache / "feats", bare, ignore=shutil.ignore_patterns("manifest.json"))
    cfg = config(tiny_feature_cache, teacher, tmp_path, data__shards=str(bare), validation={"prompts": ["a circle"]})
    assert main(["distill", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "encoders.vae: needed (raw shards or validation images) and no feature manifest names one")
    assert not (tmp_path / "run").exists()


def test_a_class_conditional_or_student_teacher_is_refused(tiny_feature_cache, straight, tmp_path):
    dit = build_model("DiT-S/2", input_size=8, in_channels=48, depth=2, hidden_size=48, num_heads=4, num_classes=4)
    save_checkpoint(tmp_path / "dit", dit.config, dit.state_dict())
    for folder, message in ((tmp_path / "dit", "holds a class-conditional DiT"),
                            (ckpt(straight, 4), "is already a one-step student")):
        r = distill(config(tiny_feature_cache, folder, tmp_path), tmp_path / "run")
        assert r.returncode == 2 and message in r.stderr, r.stderr[-500:]


def test_a_student_of_an_imported_teacher_keeps_the_record_of_its_made_up_null_caption(tiny_feature_cache, teacher,
                                                                                        tmp_path):
    """An import from diffusers makes its null caption up (export.md); the student never trains on the empty
    caption, so it carries the record and its export leaves that null caption out, as the teacher's would."""
    import shutil

    from pixart.checkpoint import FRESH_NULL_FILE
    from pixart.export.diffusers import export_checkpoint, load_null_caption

    imported = tmp_path / "imported"
    shutil.copytree(teacher, imported)
    record = json.dumps({"source": "hub/PixArt-alpha", "null_caption": "freshly initialised"})
    (imported / FRESH_NULL_FILE).write_text(record)
    cfg = config(tiny_feature_cache, imported, tmp_path, train={"max_steps": 1, "log_every": 1, "ckpt_every": 1})
    r = distill(cfg, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (ckpt(tmp_path / "run", 1) / FRESH_NULL_FILE).read_text() == record
    export_checkpoint(ckpt(tmp_path / "run", 1), tmp_path / "export")
    assert load_null_caption(tmp_path / "export") is None


def test_non_finite_loss_stops_before_the_update(tiny_feature_cache, tmp_path):
    model = build_model("PixArt-S/2", **ARCH)
    state = model.state_dict()
    state["final_layer.linear.bias"][:] = float("nan")
    save_checkpoint(tmp_path / "nan", model.config, state)
    r = distill(config(tiny_feature_cache, tmp_path / "nan", tmp_path), tmp_path / "run")
    assert r.returncode == 2 and "the generator loss is nan (not finite); stopped before the update" in r.stderr
    assert "Last good checkpoint, intact: none yet" in r.stderr


def test_the_students_export_samples_in_one_step_through_diffusers(straight, tiny_feature_cache, tmp_path):
    """diffusers' PixArtAlphaPipeline with num_inference_steps=1 returns the scheduler's pred_original_sample
    (pipeline_pixart_alpha.py, "For DMD one step sampling"); the export ships DDPM without clipping for it, and
    student.json says how to call it. Its latents equal ours to float32 reordering."""
    from diffusers import DDPMScheduler, PixArtAlphaPipeline

    from pixart.checkpoint import load_model
    from pixart.diffusion import NoiseSchedule, sample_one_step
    from pixart.export.diffusers import PipelineParts, export_checkpoint

    t5 = str(tiny_feature_cache / "t5")
    export_checkpoint(ckpt(straight, 4), tmp_path / "pipe", PipelineParts(t5, t5, None))
    call = json.loads((tmp_path / "pipe" / "student.json").read_text())["call"]
    assert call == {"num_inference_steps": 1, "timesteps": [400], "guidance_scale": 1.0}
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe", vae=None)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.clip_sample is False
    noise = torch.randn(2, 48, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = pipe(["a red circle", "a blue square"], latents=noise, output_type="latent", height=64, width=64,
                  use_resolution_binning=False, **call).images
    embeds, mask, _, _ = pipe.encode_prompt(["a red circle", "a blue square"], do_classifier_free_guidance=False)
    model = load_model(ckpt(straight, 4), ema=True).eval()
    ours = sample_one_step(model, noise, embeds, mask, timestep=400, schedule=NoiseSchedule.linear())
    assert rel_err(theirs, ours) <= reimplemented() * 20  # x0 from eps at t=400 scales errors by sqrt(1/a - 1) = 2


def test_pixart_sample_draws_a_student_in_one_step(straight, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "pixart", "sample", str(ckpt(straight, 4)), "--prompt", "a red circle",
                        "--columns", "2", "--out", str(tmp_path / "s.png")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "one step from t=400 (a distilled student)" in r.stdout
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size == (64, 32)  # two 32 px images side by side, at their own size
