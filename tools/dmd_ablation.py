"""Which of DMD's losses get the demo's one-step student there: each variant distills the finished demo's stage-3
teacher with the demo's own DMD config plus overrides, and is judged on the held-out prompts at one step, with
its diversity against the teacher's (python tools/dmd_ablation.py --help lists the variants).

    python tools/dmd_ablation.py --demo demo_out --steps 200
    python tools/dmd_ablation.py --demo demo_out --variant lr3e-4 optim.lr=3e-4 --variant dm-only
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixart.checkpoint import load_student  # noqa: E402
from pixart.demo.dmd import DIVERSITY_PROMPTS, DIVERSITY_SEEDS, spread_per_prompt  # noqa: E402
from pixart.demo.drawer import Drawer  # noqa: E402
from pixart.demo.pipeline import CFG_SCALE, FINAL_SIDE, HOLDOUT, SAMPLE_STEPS  # noqa: E402
from pixart.eval.heldout import heldout_specs, prompt_for, score_heldout, seen_specs  # noqa: E402
from pixart.eval.judge import Judge  # noqa: E402

VARIANTS = {  # name: --set overrides of the demo's configs/dmd.yaml (which has 3 fake updates per generator update)
    "dm-only": ["fake.updates_per_generator=1"],
    "dm+ttur": ["fake.updates_per_generator=3"],
    "dm+regression": ["fake.updates_per_generator=1", "regression.weight=0.25"],
    "dm+gan": ["fake.updates_per_generator=1", "gan.generator_weight=1e-2"],
    "dm+ttur+regression": ["fake.updates_per_generator=3", "regression.weight=0.25"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_out", help="a finished `pixart demo` folder (default demo_out)")
    p.add_argument("--steps", type=int, default=None, help="generator updates (default: the demo config's)")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help=f"a variant: one of {', '.join(VARIANTS)}, or a new name with --set overrides (repeatable)")
    p.add_argument("--out", default=None, help="runs and results.json (default DEMO/dmd_ablation)")
    args = p.parse_args()
    demo = Path(args.demo).resolve()
    out = Path(args.out) if args.out else demo / "dmd_ablation"
    variants = {v[0]: VARIANTS.get(v[0], []) + v[1:] for v in args.variant} if args.variant else VARIANTS
    unknown = [name for name, sets in variants.items() if not sets]
    if unknown:  # a misspelt variant would run the demo's config under its name
        p.error(f"--variant {unknown[0]}: not one of {', '.join(VARIANTS)}, and no KEY=VALUE overrides given")
    if not (demo / "export").is_dir() or not (demo / "configs" / "dmd.yaml").is_file():
        p.error(f"--demo {args.demo}: not a finished `pixart demo` folder (no export/ or configs/dmd.yaml)")
    judge = Judge.load_or_train()
    specs = heldout_specs(HOLDOUT)
    prompts = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in specs]
    seen = seen_specs(HOLDOUT, DIVERSITY_PROMPTS, 0)
    repeated = [prompt_for(s, FINAL_SIDE, FINAL_SIDE) for s in seen for _ in range(DIVERSITY_SEEDS)]
    teacher = Drawer(demo / "export", SAMPLE_STEPS, CFG_SCALE)
    teacher_scores = score_heldout(judge, teacher.images(prompts, 0), specs)
    teacher_spread = spread_per_prompt(teacher.images(repeated, 1), DIVERSITY_SEEDS)
    results = {"teacher": {**{k: teacher_scores[k] for k in ("color", "position", "shape")}, "diversity": 1.0}}
    print(f"{'variant':22s} {'color':>6s} {'position':>9s} {'shape':>6s} {'diversity':>10s} {'seconds':>8s}")
    print(f"{'teacher (20 steps)':22s} {teacher_scores['color']:6.2f} {teacher_scores['position']:9.2f} "
          f"{teacher_scores['shape']:6.2f} {1.0:10.2f}", flush=True)
    for name, sets in variants.items():
        run = out / name
        cmd = [sys.executable, "-m", "pixart", "distill", str(demo / "configs" / "dmd.yaml"), "--run-dir", str(run)]
        cmd += [a for s in sets for a in ("--set", s)] + (["--max-steps", str(args.steps)] if args.steps else [])
        start = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:  # distill's own one line, not a CalledProcessError
            sys.exit(f"variant {name}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done}")
        seconds = time.time() - start
        final = Path(json.loads((run / "DONE.json").read_text())["checkpoint"])
        subprocess.run([sys.executable, "-m", "pixart", "export-diffusers", str(final), "--out", str(run / "export"),
                        "--text-encoder", str(demo / "parts" / "t5"), "--vae", "none", "--overwrite"],
                       check=True, capture_output=True, text=True)
        student = Drawer(run / "export", 1, 1.0, [load_student(final)["start_timestep"]])
        scores = score_heldout(judge, student.images(prompts, 0), specs)
        spread = spread_per_prompt(student.images(repeated, 1), DIVERSITY_SEEDS) / teacher_spread
        results[name] = {"sets": sets, **{k: scores[k] for k in ("color", "position", "shape")},
                         "diversity": spread, "seconds": seconds}
        print(f"{name:22s} {scores['color']:6.2f} {scores['position']:9.2f} {scores['shape']:6.2f} {spread:10.2f} "
              f"{seconds:8.0f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"diversity: the student's per-prompt spread over the teacher's; wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
