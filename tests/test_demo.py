"""`pixart demo` end to end at smoke scale: every stage runs and every promised output is there."""
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pixart.checkpoint import load_config, load_student
from pixart.cli.main import main
from pixart.demo.pipeline import FINAL_SIDE as S
from pixart.train.config import TrainConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--scale", "0.01"]) == 0
    return out


def test_demo_writes_metrics_grids_curves_and_stage_configs(demo):
    m = json.loads((demo / "report" / "metrics.json").read_text())
    for k in ("color", "position", "shape", "position_any", "count"):
        assert 0.0 <= m["heldout"][k] <= 1.0
    assert m["heldout"]["prompts"] == 9 and m["resolution"] == S
    assert 0.0 <= m["heldout"]["background"] <= 255.0 and 0.0 <= m["dmd"]["heldout"]["background"] <= 255.0
    assert list(m["phases"]) == ["data", "training", "personalize", "export", "evaluate"]
    assert all(s > 0 for s in m["phases"].values()) and abs(sum(m["phases"].values()) - m["seconds"]) < 0.5
    assert set(m["judge_self_accuracy"]) == {"color", "position", "shape"}
    phrasings = m["heldout_phrasings"]
    assert len(phrasings["kinds"]) >= 6 and phrasings["prompts"] == 3 * len(phrasings["kinds"])
    assert all(0.0 <= phrasings["mean"][k] <= 1.0 for k in ("color", "position", "shape"))
    two = m["two_objects"]
    assert two["prompts"] == 9 and all(0.0 <= two[k] <= 1.0 for k in ("both_right", "swapped", "missing"))
    assert " and " in two["example"] or ";" in two["example"]  # two objects named
    assert list(m["checkpoints"]) == ["stage1", "reparam", "stage2", "stage3", "dmd"]
    for png in ("heldout", "heldout_phrasings", "two_objects", "stage1", "stage2", "stage3", "loss", "dmd", "dmd_loss",
                "perfusion", "perfusion_loss"):
        assert Image.open(demo / "report" / f"{png}.png").size[0] > 0
    assert Image.open(demo / "report" / "heldout.png").size == (9 * S * 2, S * 2)
    assert Image.open(demo / "report" / "stage3.png").size[0] == 2 * S * 2  # two columns at stage 3's own side
    assert load_config(m["checkpoints"]["stage1"]).arch == "dit"
    stage2_arch, stage3_arch = (load_config(m["checkpoints"][s]) for s in ("stage2", "stage3"))
    assert (stage3_arch.input_size, stage3_arch.patch_size, stage3_arch.in_channels) == (S // 8, 1, 48)  # 8 px tokens
    assert json.loads((demo / "features" / "ms72" / "manifest.json").read_text())["image_encoder"] == "pixel:8:4"
    # More tokens per side (9 for 4), the same position coordinates across the image (PixArt's pe_interpolation).
    span = [a.input_size / a.patch_size / a.pe_interpolation for a in (stage2_arch, stage3_arch)]
    assert span == [4.0, 4.0]
    assert json.loads((demo / "export" / "transformer" / "config.json").read_text())["interpolation_scale"] == S / 32
    stage2 = TrainConfig.load(demo / "configs" / "stage2.yaml")
    assert stage2.model.init == m["checkpoints"]["reparam"]
    stage3 = TrainConfig.load(demo / "configs" / "stage3.yaml")
    assert stage3.model.init == m["checkpoints"]["stage2"]
    # dense captions beside short, user-style ones, as PixArt-Sigma trains (issue 19)
    assert stage2.data.caption == stage3.data.caption == {"metadata": 0.7, "metadata-short": 0.3}


def test_demo_export_loads_in_diffusers_with_the_training_objective(demo):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(demo / "export", vae=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.transformer.config.sample_size == S // 8


def test_the_students_export_samples_as_the_demo_page_shows(demo):
    """docs/demo.md's snippet, run on this demo: diffusers' own call at one step (a user's crashed on the
    resolution bins before the page said to pass the size)."""
    page = (Path(__file__).parents[1] / "docs" / "demo.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "export-dmd" in b)
    scope = {}
    exec(snippet.replace('"demo_out/', f'"{demo}/'), scope)  # noqa: S102 (our own docs)
    assert scope["latents"].shape == (1, 48, S // 8, S // 8)
    assert scope["images"].shape == (1, 3, S, S) and scope["images"].abs().max() <= 1.5


def test_demo_rerun_skips_finished_work_also_in_a_moved_folder(demo, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(demo, moved)  # keeps mtimes; every record inside still names the original's paths
    aside = demo.with_name(demo.name + "-aside")
    demo.rename(aside)  # gone, as after `mv`: reading any of its paths fails
    try:
        kept = [*(moved / "runs").rglob("model.safetensors"), moved / "concepts" / "zorb.safetensors"]
        before = {p: p.stat().st_mtime_ns for p in kept}
        assert main(["demo", "--out", str(moved), "--scale", "0.01"]) == 0
    finally:
        aside.rename(demo)
    assert {p: p.stat().st_mtime_ns for p in kept} == before
    out = capsys.readouterr().out
    assert "was encoded with the T5 of a folder this one was moved or copied from" in out
    assert "(this run's alone: it resumed a folder an earlier run started)" in out
    assert json.loads((moved / "report" / "metrics.json").read_text())["resumed"] is True  # its seconds are partial
    assert json.loads((demo / "report" / "metrics.json").read_text())["resumed"] is False
    outputs = json.loads((moved / "runs" / "launch.json").read_text())["outputs"]
    assert all(Path(o).is_relative_to(moved) for o in outputs.values()), outputs  # chained from its own
    facts = json.loads((moved / "runs" / "perfusion" / "facts.json").read_text())
    assert Path(facts["base_checkpoint"]).is_relative_to(moved)


def test_a_contended_cpu_is_named_beside_the_latencies():
    from pixart.demo.dmd import contention_warning

    assert contention_warning(360.0, 300.0) is None
    assert "the latencies are inflated" in contention_warning(360.0, 120.0)


def test_a_teacher_without_diversity_gets_no_ratio():
    from pixart.demo.dmd import diversity_line, over

    assert over(0.05, 0.1) == 0.5 and over(0.0, 0.0) is None
    assert diversity_line({"student": 0.05, "teacher": 0.1, "student_over_teacher": 0.5}) == \
        "diversity 0.50x the teacher's"
    assert "the teacher's 0" in diversity_line({"student": 0.0, "teacher": 0.0, "student_over_teacher": None})


def test_demo_distills_a_one_step_student_and_reports_it(demo):
    from pixart.demo.dmd import over

    m = json.loads((demo / "report" / "metrics.json").read_text())["dmd"]
    assert set(m["heldout"]) >= {"color", "position", "shape"} and m["heldout"]["prompts"] == 9
    assert m["teacher_heldout"]["color"] == json.loads((demo / "report" / "metrics.json").read_text())["heldout"][
        "color"]
    for batch in (1, 16):
        for who in ("teacher", "student"):
            assert m["latency"][f"{who}_batch{batch}"]["denoise_s"] > 0
        assert m["latency"][f"speedup_denoise_batch{batch}"] > 1  # one forward against 20 guided steps
    assert m["latency"]["fp32_matmul_gflops"] > 0  # the CPU's rate around the timing, beside the start's
    d = m["diversity"]
    assert d["student_over_teacher"] == over(d["student"], d["teacher"]) and d["data"] > 0
    assert Image.open(demo / "report" / "dmd.png").size == (8 * S * 2, 6 * S * 2)  # 4 teacher + 4 student
    assert load_student(demo / "export-dmd")["call"]["timesteps"] == [400]


def test_demo_personalizes_its_final_model_and_reports_it(demo):
    from pixart.personalize.concept import Concept

    m = json.loads((demo / "report" / "metrics.json").read_text())
    p = m["perfusion"]
    concept = Concept.load(demo / "concepts" / "zorb.safetensors")
    assert (concept.name, concept.super_word) == ("zorb", "circle") == (p["concept"]["name"], p["concept"]["super"])
    assert p["bytes"] == (demo / "concepts" / "zorb.safetensors").stat().st_size
    assert p["train_seconds"] > 0 and p["steps"] == 10
    assert p["text_alignment"]["prompts"] == 6  # one per cell the training images never showed
    assert not set(p["text_alignment"]["positions"]) & set(p["concept"]["train_positions"])
    for k in ("fidelity", "fidelity_base_super_word", "fidelity_base_new_word"):
        assert 0 <= p[k] <= 1
    assert 0 <= p["leakage"]["max_change"] <= 1
    # the training images (6), then 6 samples: one row of six each, at 2x
    assert Image.open(demo / "report" / "perfusion.png").size == (6 * S * 2, 2 * S * 2)
    assert len(list((demo / "data" / "concept").glob("*.png"))) == 6


def test_the_timed_denoiser_is_the_pipelines_own_computation(demo):
    """The latency's "denoising alone" runs the pipeline's components in its loop: bitwise its output."""
    import torch

    from pixart.demo.drawer import Drawer

    for folder, steps, cfg, timesteps in (("export", 3, 1.5, None), ("export-dmd", 1, 1.0, [400])):
        drawer = Drawer(demo / folder, steps, cfg, timesteps)
        embeds, mask = drawer.encode(["a red circle", "a blue square in the top left corner"])
        noise = torch.randn(2, 48, S // 8, S // 8, generator=torch.Generator().manual_seed(3))
        assert torch.equal(drawer.denoise_alone(embeds, mask, noise),
                           drawer.denoise(embeds, mask, torch.Generator().manual_seed(3)))


def test_one_dpm_solver_step_ends_at_the_models_x0(demo):
    """shape_probe starts the teacher's DPM-Solver++ late; a start that leaves one step gives the model's own x0
    estimate (x0 = sqrt(a) x - sqrt(1 - a) v for the demo's v-prediction), as DPM-Solver's final step to sigma 0
    does. It had failed: DPM-Solver's step returns no pred_original_sample."""
    import torch

    from pixart.demo.drawer import Drawer

    drawer = Drawer(demo / "export", 1, 1.5, [400])
    embeds, mask = drawer.encode(["a red circle"])
    x = torch.randn(1, 48, S // 8, S // 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = drawer.denoise_alone(embeds, mask, x)
        null = drawer.null[None].to(embeds.dtype)
        uncond, cond = drawer.predict(torch.cat([x, x]), torch.tensor(400), torch.cat([null, embeds]),
                                      torch.cat([torch.ones(1, null.shape[1]).to(mask), mask])).chunk(2)
    a = drawer.pipe.scheduler.alphas_cumprod[400]
    v = uncond + 1.5 * (cond - uncond)
    torch.testing.assert_close(got, a.sqrt() * x - (1 - a).sqrt() * v, rtol=0, atol=1e-5)


def test_the_pareto_tool_sweeps_the_demos_concept(demo):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "perfusion_pareto.py"
    run = subprocess.run([sys.executable, str(tool), "--demo", str(demo), "--betas", "0.6", "0.9", "--taus", "0.15"],
                         capture_output=True, text=True, check=True)
    rows = json.loads((demo / "report" / "perfusion_pareto.json").read_text())
    assert [(r["beta"], r["tau"]) for r in rows] == [(0.6, 0.15), (0.9, 0.15)]
    assert all(0 <= r["fidelity"] <= 1 and 0 <= r["position"] <= 1 for r in rows)
    assert Image.open(demo / "report" / "perfusion_pareto.png").size[0] > 0 and "fidelity" in run.stdout


def test_the_shape_probe_denoises_noised_scenes_from_each_start(demo, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "shape_probe.py"
    grid, x0_grid = tmp_path / "probe.png", tmp_path / "x0.png"
    run = subprocess.run([sys.executable, str(tool), "--demo", str(demo), "--scenes", "4", "--starts", "1000", "100",
                          "--grid", str(grid), "--x0", str(x0_grid)], capture_output=True, text=True, check=True)
    probe, x0_table = run.stdout.split("\n\n")
    rows = [line.split() for line in probe.splitlines()[1:]]
    assert [r[-5] if r[0] != "no" else "none" for r in rows] == ["none", "1000", "100"]
    assert [int(r[-4]) for r in rows] == [0, 20, 2]  # of the pipeline's 20 steps all, then those at t <= 100 (100, 50)
    assert float(rows[0][-1]) == 1.0  # the judge names every shape the pixel autoencoder kept
    assert [float(v) for v in rows[2][-3:-1]] == [1.0, 1.0]  # from t=100, as little noise as that, color and place stay
    assert all(0 <= float(v) <= 1 for r in rows for v in r[-3:])
    assert Image.open(grid).size == (4 * S * 2, 3 * S * 2)  # the scenes, then a row per start
    header, *x0_rows = x0_table.splitlines()
    assert header.split()[-7:] == ["true", "shape", "changed", "color", "changed", "null", "caption"]
    errors = {int(r.split()[0]): [float(v) for v in r.split()[1:]] for r in x0_rows}
    assert list(errors) == [999, 100] and all(len(v) == 4 for v in errors.values())
    # x0 from pure noise misses the scene by about its variance; from t=100 the scene is nearly all there
    assert errors[100][0] < 0.25 * errors[999][0]
    assert Image.open(x0_grid).size == (4 * S * 2, 3 * S * 2)


def test_the_shape_probe_names_a_folder_without_an_export(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "shape_probe.py"
    run = subprocess.run([sys.executable, str(tool), "--demo", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [f"--demo: {tmp_path / 'export'} is not an exported pipeline; run "
                                               f"`pixart demo --out {tmp_path}` first"]


def test_the_caption_experiment_writes_a_two_object_world_and_scores_its_held_out_pairs(demo):
    """tools/exp_captions.py --two-objects F writes the demo's 32 px world again with a share F of its scenes two
    objects, beside the demo, and trains on it from the demo's reparameterized checkpoint; it then also scores every
    pair that world held out. The scores' values are the judge's (tested in test_eval_two_objects), here their
    presence and count, and that the world and the runs are the new ones, not the demo's."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from pixart.demo.pipeline import PAIR_HOLDOUT
    from pixart.eval.two_objects import held_out_pairs

    tools = Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))
    try:
        from stage2_runs import held_out_pair_world
    finally:
        sys.path.remove(str(tools))
    assert held_out_pair_world(demo) is None  # the demo's own world: one object per scene

    run = subprocess.run([sys.executable, str(tools / "exp_captions.py"), "--demo", str(demo), "--two-objects", "0.5",
                          "--steps", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    world = demo / "experiments" / "two-objects-0.5"
    record = held_out_pair_world(world)  # None for a world of one object per scene
    assert record and record["two_object_fraction"] == 0.5 and record["pair_holdout"] == PAIR_HOLDOUT
    config = yaml.safe_load((world / "configs" / "stage2.yaml").read_text())
    assert config["model"]["init"] == str(demo / "runs" / "reparam" / "checkpoint")
    assert config["data"]["shards"] == str(world / "features" / "sq32")
    captions = (world / "data" / "captions32" / "shapes-000000.metadata.jsonl").read_text()
    assert " two shapes" in captions  # the relabeling job described two-object scenes
    header, dense, sparse = [line for line in run.stdout.splitlines() if "%" in line or line.startswith("variant")]
    assert header.split()[-5:] == ["two:", "both", "right", "swapped", "missing"]
    assert dense.startswith("dense captions") and sparse.startswith("sparse alt-text")
    assert all(len(re.findall(r"\d+\.\d%", row)) == 6 for row in (dense, sparse))
    for result in json.loads((world / "experiments" / "captions.json").read_text()):
        two = result["two_objects"]
        assert two["prompts"] == len(held_out_pairs(PAIR_HOLDOUT))
        assert all(0 <= two[k] <= 1 for k in ("both_right", "swapped", "missing"))
    bad = subprocess.run([sys.executable, str(tools / "exp_captions.py"), "--demo", str(demo), "--two-objects", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().endswith("--two-objects 0.0: a share of the scenes, above 0 "
                                                               "and at most 1")


def test_the_demos_aesthetic_summary_counts_the_scenes_stage_3_and_dmd_keep():
    import yaml

    from pixart.demo.pipeline import STAGE3_MIN_SCORE

    configs = Path(__file__).resolve().parents[1] / "configs" / "demo"
    for name in ("stage3.yaml", "dmd.yaml"):
        assert yaml.safe_load((configs / name).read_text())["data"]["min_score"] == STAGE3_MIN_SCORE, name


def test_the_t5_pretraining_corpus_describes_each_scene_twice():
    """In the shapes world a caption's colors are independent draws: span corruption can learn to read a masked one
    only from another mention of it. Each pretraining document is a scene's dense caption, then its short one, so
    every palette color in it is named an even number of times."""
    from data_pipelines.shapes import COLORS
    from pixart.demo.pipeline import caption_corpus

    documents, dense = caption_corpus(0, n=60, documents=True), caption_corpus(0, n=60)
    for doc, caption in zip(documents, dense, strict=True):
        assert doc.startswith(caption + " ") and len(doc) > len(caption) + 10
        words = re.findall(r"[a-z]+", doc.lower())
        assert all(words.count(c) % 2 == 0 for c in COLORS), doc
        assert any(words.count(c) >= 2 for c in COLORS), doc
        short = doc[len(caption) + 1:]
        assert len(short) < len(caption), doc  # the short caption, not the dense one again


def test_the_demos_t5_is_pretrained_again_after_a_run_without_pretraining(tmp_path, monkeypatch):
    """The folder keeps its T5 only when its record says it was pretrained as asked: switching pretraining off and
    on again must not find the first run's record beside a random T5 (which has no sentinels to pretrain with)."""
    from transformers import AutoTokenizer

    import pixart.demo.pipeline as pipeline
    from pixart.encoders.pretrain import sentinel_ids

    folder = tmp_path / "t5"
    for steps in (10, 0, 10):
        monkeypatch.setattr(pipeline, "T5_PRETRAIN_STEPS", steps)
        pipeline.tiny_text_encoder(folder, seed=0, scale=1.0)
        record = folder / "pretrain.json"
        assert record.is_file() == bool(steps)
        assert bool(sentinel_ids(AutoTokenizer.from_pretrained(folder))) == bool(steps)
        if steps:
            assert json.loads(record.read_text())["steps"] == steps


def report_keys(value: dict, parent: str | None = None) -> set[str]:
    """Every key name in a report, less those that are data (the phrasing kinds `kinds` and `examples` are keyed
    by, listed in the page's table of kinds)."""
    names = set()
    for key, child in value.items():
        if parent not in ("kinds", "examples"):
            names.add(key)
        if isinstance(child, dict):
            names |= report_keys(child, key)
    return names


def test_the_page_documents_every_key_of_the_report_and_no_other(demo):
    """docs/demo.md's "Reading the report" names each key metrics.json has (a reviewer found half of them
    missing), and no key it lacks: every backticked lowercase name there, split at dots, is a report key."""
    page = (Path(__file__).parents[1] / "docs" / "demo.md").read_text()
    section = page.split("## Reading the report\n", 1)[1].split("\n## ", 1)[0]
    spans = [s for s in re.findall(r"`([^`\n]+)`", section) if re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*", s)]
    documented = {part for s in spans if s not in ("metrics.json", "metrics.jsonl", "null") for part in s.split(".")}
    keys = report_keys(json.loads((demo / "report" / "metrics.json").read_text()))
    assert keys - documented == set(), "report keys the page does not name"
    assert documented - keys == set(), "names the page gives that the report does not have"


def test_a_smoke_demo_reports_every_stages_training_rate(demo):
    """At --scale 0.01 each stage logs often enough to have rows past its warm-up row (it logged once, every
    10 steps, and `training` was {})."""
    m = json.loads((demo / "report" / "metrics.json").read_text())
    assert set(m["training"]) == {"stage1", "stage2", "stage3", "dmd"}
    assert all(r["samples_per_s"] > 0 for r in m["training"].values())
    assert all("of_matmul_peak" in m["training"][s] for s in ("stage1", "stage2", "stage3"))
    assert m["resumed"] is False


def test_scaled_down_stages_checkpoint_and_log_within_their_steps_and_scale_1_is_the_shipped_configs(tmp_path):
    """Below scale 1 each stage checkpoints at the same fractions of its steps as at scale 1 (a kill at stage 2's
    51 of 100 had restarted it at 0) and logs at least twice; at scale 1 the shipped values stand."""
    import yaml

    from pixart.demo.pipeline import CONFIGS, write_configs

    for scale in (1.0, 0.1, 0.01, 1e-300):
        folder = write_configs(tmp_path / str(scale), 0, scale).parent
        for stage in ("stage1", "stage2", "stage3", "dmd"):
            train = yaml.safe_load((folder / f"{stage}.yaml").read_text())["train"]
            shipped = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())["train"]
            if scale == 1:
                assert {k: train[k] for k in shipped} == shipped
                continue
            full = shipped["max_steps"]
            assert train["ckpt_every"] == max(1, shipped["ckpt_every"] * train["max_steps"] // full), (scale, stage)
            assert 1 <= train["log_every"] <= shipped["log_every"] and train["max_steps"] // train["log_every"] >= 2


@pytest.fixture
def no_work(monkeypatch):
    """The demo's first step, replaced: a test of a refusal fails at once, not after a run, if it is not refused."""
    import pixart.demo.pipeline as pipeline

    def make_data(*args):
        raise AssertionError("the demo started working")

    monkeypatch.setattr(pipeline, "make_data", make_data)


def test_another_seed_or_scale_in_a_demo_folder_is_one_line_and_rewrites_nothing(demo, no_work, capsys):
    configs = {p: p.read_bytes() for p in (demo / "configs").iterdir()}
    for flag, value, was in (("--scale", "0.02", "0.01"), ("--seed", "1", "0")):
        argv = ["--scale", "0.01", flag, value] if flag == "--seed" else [flag, value]
        assert main(["demo", "--out", str(demo), *argv]) == 2
        assert capsys.readouterr().err.strip() == (
            f"pixart demo: error: {flag} {value}: {demo} holds a demo made with {flag} {was}; rerun with {flag} "
            f"{was} to resume it, or choose another --out")
    assert {p: p.read_bytes() for p in (demo / "configs").iterdir()} == configs
    assert json.loads((demo / "demo.json").read_text()) == {"seed": 0, "scale": 0.01}


def test_a_second_demo_into_a_busy_folder_is_one_line(tmp_path, no_work, capsys):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pixart.train.recipe import lock_run; lock_run(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(120)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["demo", "--out", str(tmp_path), "--scale", "0.01"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pixart demo: error: another demo is running in {tmp_path} (pid {holder.pid} on ")
    assert err.endswith("; wait for it or choose another --out") and "\n" not in err
    assert [p.name for p in tmp_path.iterdir()] == [".launch.lock"]  # its record (demo.json) not even written


@pytest.mark.parametrize("argv, message", [
    (["--out", ""], "--out is empty; name the demo's folder, e.g. --out demo_out"),
    (["--out", "."], "--out {cwd} holds the current directory; name a folder of its own, e.g. --out demo_out"),
    (["--out", "x", "--seed", "-1"], "argument --seed: -1 is not a seed from 0 to 2**32 - 1 (4294967295)"),
    (["--out", "x", "--seed", "99999999999999999999999"],
     "argument --seed: 99999999999999999999999 is not a seed from 0 to 2**32 - 1 (4294967295)"),
])
def test_a_bad_out_or_seed_is_one_line_and_writes_nothing(tmp_path, monkeypatch, no_work, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["demo", *argv])
    except SystemExit as stop:  # argparse's usage error
        code = stop.code
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pixart demo: error: {message.format(cwd=tmp_path)}"
    assert list(tmp_path.iterdir()) == []
