"""Recipes and `pixart launch`: stages in order, each from the previous output; finished ones skipped."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pixart.checkpoint import load_config, load_model
from pixart.errors import PixArtError
from pixart.models import build_model
from pixart.train.config import TrainConfig
from pixart.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"input_size": 8, "in_channels": 48, "depth": 2, "hidden_size": 48, "num_heads": 4}


def toy_recipe(cache: Path, tmp: Path) -> Path:
    common = {"data": {"shards": str(cache / "feats"), "batch_size": 4, "caption": "txt"},
              "optim": {"lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0},
              "train": {"max_steps": 2, "log_every": 1, "ckpt_every": 2}, "ema": {"decay": 0.9},
              "deepspeed": {"zero_stage": 2, "precision": "fp32"}}
    (tmp / "s1.yaml").write_text(yaml.safe_dump({**common, "stage": "s1", "model": {
        "name": "DiT-S/2", "arch": {**ARCH, "num_classes": 48}}}))
    (tmp / "s2.yaml").write_text(yaml.safe_dump({**common, "stage": "s2"}))
    (tmp / "recipe.yaml").write_text(yaml.safe_dump({"name": "toy", "stages": [
        {"name": "s1", "config": "s1.yaml"},
        {"name": "reparam", "reparam": {"source": "s1", "caption_channels": 32, "max_length": 120}},
        {"name": "s2", "config": "s2.yaml", "init": "reparam", "set": ["train.max_steps=3"]}]}))
    return tmp / "recipe.yaml"


def launch(recipe: Path, run_dir: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PIXART_FAULT")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "pixart", "launch", str(recipe), "--run-dir", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_launch_runs_stages_in_order_and_skips_finished_ones(tiny_feature_cache, tmp_path):
    recipe, run = toy_recipe(tiny_feature_cache, tmp_path), tmp_path / "run"
    r = launch(recipe, run)
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = json.loads((run / "launch.json").read_text())["outputs"]
    assert list(outputs) == ["s1", "reparam", "s2"]
    assert load_config(outputs["s1"]).arch == "dit"
    assert load_config(outputs["reparam"]).arch == "pixart"
    s2 = TrainConfig.load(run / "s2" / "config.yaml")
    assert s2.model.init == outputs["reparam"] and s2.train.max_steps == 3  # init and the step's --set
    assert json.loads((run / "s2" / "DONE.json").read_text())["steps"] == 3
    load_model(outputs["s2"], ema=True)
    before = (run / "s2" / "checkpoints" / "step-000003" / "model.safetensors").stat().st_mtime_ns
    again = launch(recipe, run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") == 3
    assert (run / "s2" / "checkpoints" / "step-000003" / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((run / "s2" / "DONE.json").read_text())["model.init"] == "reparam/checkpoint"

    moved = tmp_path / "moved"  # the recipe's run folder elsewhere: its steps' inputs are still theirs
    run.rename(moved)
    again = launch(recipe, moved)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") == 3



def edit(path: Path, key: str, value) -> None:
    """Set a dotted key of a YAML file."""
    data = yaml.safe_load(path.read_text())
    *parents, last = key.split(".")
    node = data
    for k in parents:
        node = node[k] if isinstance(node, dict) else next(s for s in node if s["name"] == k)
    node[last] = value
    path.write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def toy_run(tiny_feature_cache, tmp_path_factory):
    """A finished launch of the toy recipe (s1 -> reparam -> s2), which each test copies."""
    base = tmp_path_factory.mktemp("toy")
    recipe = toy_recipe(tiny_feature_cache, base)
    r = launch(recipe, base / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    return base


@pytest.fixture
def toy(toy_run, tmp_path):
    import shutil

    shutil.copytree(toy_run, tmp_path / "w")
    return tmp_path / "w"


def last_line(r: subprocess.CompletedProcess) -> str:
    return r.stderr.strip().splitlines()[-1]


def test_a_step_redone_in_place_is_told_from_the_old_one_by_its_run_id(toy):
    """Retraining s1 in its own folder writes the same step names; its new run id tells the later steps that they
    were made from the old one (each refusal naming the steps made from it), instead of skipping them."""
    import shutil

    run = toy / "run"
    shutil.rmtree(run / "s1")
    r = launch(toy / "recipe.yaml", run)
    assert r.returncode == 2, r.stderr[-3000:]
    ids = re.findall(r"\(run ([0-9a-f]{32})\)", last_line(r))
    assert len(ids) == 2 and ids[0] != ids[1], last_line(r)
    assert last_line(r) == (
        f"pixart launch: error: step reparam: {run / 'reparam'} was made from reparam.source "
        f"s1/checkpoints/step-000002 (run {ids[0]}), now s1/checkpoints/step-000002 (run {ids[1]}); delete "
        f"{run / 'reparam'} (and {run / 's2'}, made from it) to redo it from the new input, or restore the old one")
    shutil.rmtree(run / "reparam")  # redone: s2 was made from the old one
    r = launch(toy / "recipe.yaml", run)
    assert r.returncode == 2, r.stderr[-3000:]
    assert re.search(r"step s2: .* was made from model.init reparam/checkpoint \(run \w+\), now reparam/checkpoint "
                     r"\(run \w+\); delete", last_line(r)), last_line(r)


def test_a_step_later_steps_were_made_from_is_not_extended(toy):
    run = toy / "run"
    edit(toy / "s1.yaml", "train.max_steps", 3)
    r = launch(toy / "recipe.yaml", run)
    assert r.returncode == 2, r.stderr[-3000:]
    assert last_line(r) == ("pixart launch: error: step s1: extending it to 3 steps would leave reparam, s2 made from "
                            "its step-000002; delete their folders to redo them, or keep train.max_steps 2")
    assert sorted(p.name for p in (run / "s1" / "checkpoints").iterdir()) == ["latest", "step-000002"]


def test_a_done_step_whose_config_changed_is_skipped_with_a_warning(toy):
    run = toy / "run"
    edit(toy / "s2.yaml", "optim.lr", 0.002)
    edit(toy / "s2.yaml", "train.log_every", 5)  # shapes nothing: not named
    edit(toy / "recipe.yaml", "stages.reparam.reparam.seed", 3)
    r = launch(toy / "recipe.yaml", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("skipped") == 3
    assert (f"s2: done with optim.lr 0.001; the config now says optim.lr 0.002; delete {run / 's2'} to redo it"
            in r.stderr.splitlines())
    assert (f"reparam: done with reparam.seed 0; the recipe now says reparam.seed 3; delete {run / 'reparam'} to "
            "redo it" in r.stderr.splitlines())
    assert "s1: done with" not in r.stderr


def test_a_reparam_killed_before_its_done_record_is_finished_or_redone(toy):
    """A kill after the reparameterized checkpoint is written but before DONE.json: the rerun records it as done
    (its reparam.json names this source and these settings) and removes the killed writer's temp file; with
    another source it converts again."""
    import shutil
    import socket

    run = toy / "run"
    shutil.rmtree(run / "s2")
    (run / "reparam" / "DONE.json").unlink()
    dead = run / "reparam" / f".DONE.json.tmp-{socket.gethostname()}-999999-abc"
    dead.write_text("{")
    before = (run / "reparam" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    r = launch(toy / "recipe.yaml", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reparam: done" not in r.stderr and not dead.exists()
    assert (run / "reparam" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == before
    done = json.loads((run / "reparam" / "DONE.json").read_text())
    assert done["reparam.source"] == "s1/checkpoints/step-000002"
    (run / "reparam" / "DONE.json").unlink()
    edit(toy / "recipe.yaml", "stages.reparam.reparam.seed", 3)
    shutil.rmtree(run / "s2")
    r = launch(toy / "recipe.yaml", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reparam: reparameterizing" in r.stderr
    assert json.loads((run / "reparam" / "checkpoint" / "reparam.json").read_text())["seed"] == 3


def test_a_second_launch_on_a_run_folder_in_use_is_refused(toy):
    import socket

    run = toy / "run"
    hold = ("import fcntl, os, socket, sys, time\n"
            f"f = open({str(run / '.launch.lock')!r}, 'a+')\n"
            "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "f.truncate(0); f.write(f'pid {os.getpid()} on {socket.gethostname()}'); f.flush()\n"
            "print('held', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = launch(toy / "recipe.yaml", run)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr[-3000:]
    assert last_line(r) == (f"pixart launch: error: {run} is in use by another pixart launch (pid {holder.pid} on "
                            f"{socket.gethostname()})")
    r = launch(toy / "recipe.yaml", run)  # the holder is gone: so is its lock
    assert r.returncode == 0, r.stderr[-3000:]


def test_launch_json_names_the_outputs_wherever_it_is_read_from(toy):
    r = launch(toy / "recipe.yaml", Path("run"), cwd=toy)  # a --run-dir relative to the launch's folder
    assert r.returncode == 0, r.stderr[-3000:]
    outputs = json.loads((toy / "run" / "launch.json").read_text())["outputs"]
    assert outputs["s2"] == str(toy / "run" / "s2" / "checkpoints" / "step-000003")


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "config": "x.yaml", "init": "b"}], "refers to 'b', which is not an earlier step"),
    ([{"name": "a", "config": "x.yaml", "reparam": {"source": "w.pt"}}], "exactly one of"),
    ([{"name": "a", "config": "x.yaml"}, {"name": "a", "config": "y.yaml"}], "used twice"),
    ([{"name": "a", "config": "x.yaml", "inti": "b"}], "stages.0.inti: unknown key"),
    ([{"name": "r", "reparam": {"source": "w.pt"}, "init": "a"}], "step 'r': init and set do not apply to a reparam"),
    ([{"name": "r", "reparam": {"source": "w.pt"}, "set": ["a=1"]}], "step 'r': init and set do not apply"),
    *[([{"name": bad, "config": "x.yaml"}], f"step name {re.escape(repr(bad))}: use one folder name")
      for bad in ("", ".", "..", "../x", "a/b", "a b")],
    ([], "stages: give at least one step"),
])
def test_bad_recipes_are_one_line(tmp_path, stages, message):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "stages": stages}))
    with pytest.raises(PixArtError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_a_misspelt_recipe_key_or_a_folder_is_named(tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "stagez": [{"name": "a", "config": "x.yaml"}]}))
    with pytest.raises(PixArtError, match=re.escape(f"{tmp_path / 'r.yaml'}: stagez: unknown key")):
        load_recipe(tmp_path / "r.yaml")
    with pytest.raises(PixArtError, match=re.escape(f"{tmp_path} is a folder, not a recipe file")):
        load_recipe(tmp_path)
    for config, command in (("pixart_xl2/stage2_sam256.yaml", "train"), ("demo/stage2.yaml", "train"),
                            ("pixart_xl2/dmd512.yaml", "distill")):  # a stage's config given to `launch`
        path = ROOT / "configs" / config
        with pytest.raises(PixArtError, match=re.escape(f"{path}: one stage's config, not a recipe (a recipe lists "
                                                        f"`stages:`); run it with `pixart {command} {path}`")):
            load_recipe(path)


def test_a_reparam_source_file_is_relative_to_the_recipe_and_checked_first(tmp_path):
    from pixart.train.recipe import check_inputs, reparam_source

    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "stages": [
        {"name": "s", "reparam": {"source": "nothere.pt"}}, {"name": "t", "reparam": {"source": "s"}}]}))
    recipe = load_recipe(tmp_path / "r.yaml")
    s, t = recipe.stages
    assert reparam_source(tmp_path / "r.yaml", {}, s) == str(tmp_path / "nothere.pt")
    assert reparam_source(tmp_path / "r.yaml", {"s": "/o/s/checkpoint"}, t) == "/o/s/checkpoint"
    with pytest.raises(PixArtError, match=re.escape(
            f"{tmp_path / 'r.yaml'}: step s: reparam.source nothere.pt: no such file ({tmp_path / 'nothere.pt'}: the "
            "path is relative to the recipe file)")):
        check_inputs(tmp_path / "r.yaml", s, None)
    (tmp_path / "nothere.pt").write_bytes(b"")
    check_inputs(tmp_path / "r.yaml", s, None)


def test_a_bad_later_config_stops_the_launch_before_anything_runs(tmp_path, caplog):
    """The XL recipe's fourth stage is read when the launch starts, not after three stages have trained: its keys,
    its model's name and its DeepSpeed JSON stop the launch; its missing local shards, scores and own init are
    named in a warning, since they may be made while the first stages train."""
    from pixart.train.recipe import check_inputs, launch, step_config

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"")  # the check lists shards; it does not read them
    good = {"stage": "t", "data": {"shards": str(tmp_path / "shards")}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**good, "stage": "s"}))
    bad = {"keys.yaml": {**good, "optim": {"lr": "fast"}},
           "name.yaml": {**good, "model": {"name": "DiT-Q/2"}},
           "ds.yaml": {**good, "deepspeed": {"config": str(tmp_path / "nothing.json")}},
           "later.yaml": {**good, "data": {"shards": str(tmp_path / "shardz"), "scores_dir": str(tmp_path / "scorez")},
                          "model": {"init": str(tmp_path / "nothing")}}}
    for file, cfg in bad.items():
        (tmp_path / file).write_text(yaml.safe_dump(cfg))
    (tmp_path / "dit.pt").write_bytes(b"")  # the check looks for it; it does not read it
    stages = [{"name": "reparam", "reparam": {"source": str(tmp_path / "dit.pt")}},
              {"name": "s", "config": "s.yaml", "init": "reparam"}]
    for last, message in (
            ({"name": "t", "config": "missing.yaml", "init": "s"}, "missing.yaml: no such config file"),
            ({"name": "t", "config": "keys.yaml", "init": "s"}, "keys.yaml: optim.lr"),
            ({"name": "t", "config": "name.yaml"}, "name.yaml: model.name: unknown model name 'DiT-Q/2'"),
            ({"name": "t", "config": "ds.yaml", "init": "s"}, "ds.yaml: deepspeed.config .*nothing.json: cannot read")):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "stages": [*stages, last]}))
        with pytest.raises(PixArtError, match=message):
            launch(tmp_path / "r.yaml", tmp_path / "run")
        assert not (tmp_path / "run").exists()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "stages": [
        *stages, {"name": "t", "config": "later.yaml"}]}))
    recipe = load_recipe(tmp_path / "r.yaml")
    step = recipe.stages[-1]
    with caplog.at_level("WARNING", logger="pixart.train"):
        check_inputs(tmp_path / "r.yaml", step, step_config(tmp_path / "r.yaml", recipe, step, None))
    for key, problem in (("data.shards", "shardz: no such shard"), ("data.scores_dir", "scorez: no such folder"),
                         ("model.init", "nothing: not a checkpoint folder")):
        assert re.search(f"later.yaml: {key}: .*{problem}.*; step t stops there unless it exists by then", caplog.text)


def test_shipped_xl_recipes_and_configs_are_valid():
    import torch

    for recipe in sorted((ROOT / "configs" / "pixart_xl2").glob("recipe*.yaml")):
        for step in load_recipe(recipe).stages:
            if step.config:
                cfg = TrainConfig.load(recipe.parent / step.config)
                if "stage1" in step.name:
                    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-4, 0.0)  # DiT's
                    continue
                # PixArt's: lr 2e-5 scaled by its auto_lr sqrt rule at base batch 256 (PixArt-alpha's
                # configs/PixArt_xl2_internal.py auto_lr, diffusion/utils/optimizer.py auto_scale_lr), on 8 GPUs
                official = 2e-5 * math.sqrt(cfg.data.batch_size * 8 / 256)
                assert cfg.optim.lr == pytest.approx(official, rel=1e-3) and cfg.optim.weight_decay == 0.03
    stage4 = TrainConfig.load(ROOT / "configs" / "pixart_xl2" / "stage4_aesthetic1024.yaml")
    with torch.device("meta"):
        model = build_model("PixArt-XL/2", **stage4.model.arch)
    assert sum(p.numel() for p in model.parameters()) == 611_349_152  # PixArtMS-XL/2
    assert json.loads((ROOT / stage4.deepspeed.config).read_text())["zero_optimization"]["stage"] == 3


def test_a_step_made_from_another_input_is_refused_not_skipped_or_resumed(tmp_path):
    """A finished (DONE.json) or interrupted (its latest checkpoint's trainer.json) step records the input it was
    made from; a launch that would now hand it another one stops, naming both, instead of reusing its output."""
    from pixart.train.recipe import Step, check_input

    step = Step(name="stage3", config="s3.yaml", init="stage2")
    out = tmp_path / "stage3"
    out.mkdir()
    check_input(step, out, "model.init", "stage2/checkpoints/step-000020")  # nothing recorded yet
    (out / "DONE.json").write_text(json.dumps({"checkpoint": "x", "steps": 5}))  # recorded before inputs were
    check_input(step, out, "model.init", "stage2/checkpoints/step-000020")
    (out / "DONE.json").write_text(json.dumps({"checkpoint": "x", "steps": 5,
                                               "model.init": "stage2/checkpoints/step-000010"}))
    check_input(step, out, "model.init", "stage2/checkpoints/step-000010")
    with pytest.raises(PixArtError, match=re.escape(
            f"step stage3: {out} was made from model.init stage2/checkpoints/step-000010, now "
            f"stage2/checkpoints/step-000020; delete {out}")):
        check_input(step, out, "model.init", "stage2/checkpoints/step-000020")
    (out / "DONE.json").unlink()  # interrupted: its latest checkpoint's record
    ckpt = out / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-000002")
    (ckpt / "trainer.json").write_text(json.dumps({"step": 2, "teacher.init": "stage3/checkpoints/step-000010"}))
    with pytest.raises(PixArtError, match="was made from teacher.init stage3/checkpoints/step-000010, now /w"):
        check_input(step, out, "teacher.init", "/w")


def test_a_run_names_its_input_the_same_wherever_the_recipe_run_was_moved(tmp_path):
    from pixart.train.checkpoints import started_from

    for root in (tmp_path / "a", tmp_path / "b"):
        ckpt = root / "stage2" / "checkpoints" / "step-000010"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text("{}")
        (root / "stage2" / "checkpoints" / "latest").write_text("step-000010")
        for init in (ckpt, root / "stage2" / "checkpoints" / "latest"):  # the pointer: the step it names
            assert started_from(init, root / "stage3") == "stage2/checkpoints/step-000010"
    outside = tmp_path / "a" / "stage2" / "checkpoints" / "step-000010"
    assert started_from(outside, tmp_path / "b" / "runs" / "stage3") == str(outside.resolve())
    assert started_from(None, tmp_path) is None


def test_the_recipe_timeout_governs_each_steps_watchdog_and_a_bad_set_names_the_recipe(tmp_path):
    """The launch's process group has the recipe's `collective_timeout_s`; each step's watchdog
    (`train.collective_timeout_s`) gets the same. The recipe's `elastic: true` is every step's; without it a step
    keeps its own. A bad key in a step's `set:` is the recipe's, not its file's."""
    from pixart.train.recipe import step_config

    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"stage": "s", "data": {"shards": "x"},
                                                     "train": {"collective_timeout_s": 900}}))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"name": "r", "collective_timeout_s": 42, "stages": [
        {"name": "s", "config": "s.yaml"}, {"name": "t", "config": "s.yaml", "set": ["optim.lrr=1"]}]}))
    recipe = load_recipe(tmp_path / "r.yaml")
    assert step_config(tmp_path / "r.yaml", recipe, recipe.stages[0], None).train.collective_timeout_s == 42
    assert not step_config(tmp_path / "r.yaml", recipe, recipe.stages[0], None).train.elastic
    for elastic, step_set in ((True, []), (False, ["train.elastic=true"])):
        rewritten = recipe.model_copy(update={"elastic": elastic, "stages": [
            recipe.stages[0].model_copy(update={"set": step_set})]})
        assert step_config(tmp_path / "r.yaml", rewritten, rewritten.stages[0], None).train.elastic
    with pytest.raises(PixArtError, match=re.escape(f"{tmp_path / 'r.yaml'}: step t's set: optim.lrr: unknown key")):
        step_config(tmp_path / "r.yaml", recipe, recipe.stages[1], None)
