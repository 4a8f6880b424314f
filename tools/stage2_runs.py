"""Stage-2 variants on a finished `pixart demo` folder, for the toy experiments (not a command).

Each variant is the demo's stage-2 config with a few keys changed, trained to the same number of
steps from the same seed, then scored on the demo's held-out prompts at stage 2's resolution with the
repo's sampler at the stage's validation steps and CFG. A demo whose world holds two-object scenes
(`TWO_OBJECT_FRACTION` > 0 in pixart/demo/pipeline.py) is also scored on every pair of objects it held out
(`pixart.eval.two_objects`). Runs land in OUT/<variant>/ and are skipped when finished (reruns are cheap).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml


def run_variant(demo: Path, out: Path, name: str, sets: list[str], steps: int | None) -> dict:
    from pixart.checkpoint import load_model, load_prediction_type
    from pixart.demo.pipeline import HOLDOUT, PIXEL_FACTOR
    from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout
    from pixart.eval.judge import Judge
    from pixart.eval.two_objects import pair_prompt, score_two_objects, two_object_specs
    from pixart.train.config import TrainConfig
    from pixart.train.encoders import cache_manifest, load_autoencoder, load_text_encoder
    from pixart.train.trainer import Trainer, is_done
    from pixart.train.validation import sample_prompts

    config = demo / "configs" / "stage2.yaml"
    if not config.is_file():
        raise SystemExit(f"{config}: run `pixart demo --out {demo}` first")
    cfg = TrainConfig.load(config, sets + ([f"train.max_steps={steps}"] if steps else []) +
                            ["validation.prompts=[]", f"train.ckpt_every={10 ** 9}"])
    run_dir = out / "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    ckpt = is_done(run_dir, cfg.train.max_steps) or Trainer(cfg, run_dir).run()
    model = load_model(ckpt, ema=True)
    side = model.config.input_size * PIXEL_FACTOR
    manifest = cache_manifest(cfg)
    text_encoder, autoencoder = load_text_encoder(cfg.encoders, manifest), load_autoencoder(cfg.encoders, manifest)

    def draw(prompts: list[str]) -> list:
        return sample_prompts(model, prompts, text_encoder, autoencoder, (model.config.input_size,) * 2,
                              prediction_type=load_prediction_type(ckpt), steps=cfg.validation.steps,
                              cfg=cfg.validation.cfg, sampler=cfg.validation.sampler)

    judge = Judge.load_or_train()
    specs = heldout_specs(HOLDOUT)
    scores = score_heldout(judge, draw([prompt_for(s, side, side) for s in specs]), specs)
    two, world = None, held_out_pair_world(demo)
    if world:
        pairs = two_object_specs(world["pair_holdout"], world.get("holdout", 0))
        two = score_two_objects(judge, draw([pair_prompt(p, side, side) for p in pairs]), pairs)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tail = [r["loss"] for r in rows[-max(1, len(rows) // 10):]]
    return {"variant": name, "steps": cfg.train.max_steps, "final_loss": sum(tail) / len(tail),
            "heldout": scores, "two_objects": two, "history": rows, "set": sets}


def held_out_pair_world(demo: Path) -> dict | None:
    """The stage-2 world's settings (`holdout`, `pair_holdout`) when it was written with two-object scenes and
    held-out pairs to prompt; None for a one-object world (or a folder too old to record its world)."""
    from pixart.checkpoint import read_json

    record = demo / "data" / "shapes32" / "shapes.json"
    world = read_json(record)["config"] if record.is_file() else {}
    if world.get("two_object_fraction", 0.0) > 0 and world.get("pair_holdout", 0) > 0:
        return world
    return None


def report(results: list[dict], out: Path, title: str) -> None:
    from pixart.atomic import atomic_write
    from pixart.train.monitor import save_loss_curve

    save_loss_curve({r["variant"]: r["history"] for r in results}, out / f"{title}.png")
    atomic_write(out / f"{title}.json", json.dumps([{k: v for k, v in r.items() if k != "history"} for r in results],
                                                   indent=2))
    print(f"\n{title} ({results[0]['steps']} stage-2 steps each, held-out prompts at stage-2 resolution)")
    two = results[0]["two_objects"] is not None
    print(f"{'variant':28s} {'final loss':>10s} {'color':>7s} {'position':>9s} {'shape':>7s}" +
          (f" {'two: both right':>15s} {'swapped':>8s} {'missing':>8s}" if two else ""))
    for r in results:
        h, t = r["heldout"], r["two_objects"]
        print(f"{r['variant']:28s} {r['final_loss']:10.4f} {h['color']:7.1%} {h['position']:9.1%} {h['shape']:7.1%}" +
              (f" {t['both_right']:15.1%} {t['swapped']:8.1%} {t['missing']:8.1%}" if two else ""))
    print(f"wrote {out / (title + '.json')} and {out / (title + '.png')}")


def reparam_arch(demo: Path) -> str:
    """--set value that builds the reparameterized architecture from scratch (random init)."""
    arch = json.loads((demo / "runs" / "reparam" / "checkpoint" / "config.json").read_text())
    return "model.arch=" + yaml.safe_dump(arch, default_flow_style=True).strip()


def main(doc: str, title: str, variants, options=None, prepare=None) -> None:
    """The experiments' shared command line: `variants(demo)` gives [(name, --set list)], baseline first;
    `options(parser)` adds a tool's flags and `prepare(demo, args)` gives the folder the variants train from."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a finished `pixart demo` folder")
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps per variant (default: the demo's)")
    if options:
        options(p)
    a = p.parse_args()
    demo = Path(a.demo).resolve()
    if not (demo / "configs" / "stage2.yaml").is_file():  # what every variant trains from
        p.error(f"--demo {a.demo}: not a `pixart demo` folder (no configs/stage2.yaml)")
    demo = prepare(demo, a) if prepare else demo
    out = demo / "experiments"
    report([run_variant(demo, out, name, sets, a.steps) for name, sets in variants(demo)], out, title)
