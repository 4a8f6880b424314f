"""Dense vs sparse captions (PixArt-alpha's data claim, in miniature).

Stage 2 from the same reparameterized checkpoint, same steps and seed, trained once on the
relabeling job's dense captions and once on the shapes world's `.txt` alt-text (sparse, noisy,
web-like); both scored by the judge on the held-out prompts, and in a world with two-object scenes
on every held-out pair of objects too. `--two-objects F` writes such a world beside the demo's (its
32 px world again with a share F of the scenes two objects, relabeled and encoded as the demo does,
in DIR/experiments/two-objects-F/) and trains on it from the demo's reparameterized checkpoint.

    pixart demo --out demo_out                       # once: data, features, stage 1, reparam
    python tools/exp_captions.py --demo demo_out [--steps 600]
    python tools/exp_captions.py --demo demo_out --two-objects 1.0 --steps 6000
"""
import json
from pathlib import Path

import yaml
from stage2_runs import main


def two_object_world(demo: Path, fraction: float) -> Path:
    """A folder with the demo's stage-2 config and its 32 px world written again with `fraction` of its scenes two
    objects (the held-out pairs never drawn), relabeled and encoded with the demo's T5; stage 2 starts from the
    demo's reparameterized checkpoint."""
    from data_pipelines.features import extract_features
    from data_pipelines.shapes import write_shapes
    from pixart.checkpoint import read_json
    from pixart.demo import pipeline as the_demo

    made = read_json(demo / "demo.json")
    out = demo / "experiments" / f"two-objects-{fraction}"
    config = yaml.safe_load((demo / "configs" / "stage2.yaml").read_text())
    config["data"]["shards"] = str(out / "features" / "sq32")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "stage2.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    data = out / "data"
    write_shapes(data / "shapes32", max(64, int(the_demo.SQUARE_COUNT * made["scale"])), seed=made["seed"], workers=2,
                 **the_demo.SQUARE_WORLD, **the_demo.world_settings(fraction))
    the_demo.relabel_world(data / "shapes32", data / "captions32", made["seed"])
    extract_features([str(data / "shapes32")], out / "features" / "sq32",
                     the_demo.feature_config(demo / "parts" / "t5", data / "captions32", **the_demo.SQUARE_FEATURES))
    print(f"two-object world: {out} ({json.dumps(read_json(data / 'shapes32' / 'shapes.json')['config'])})")
    return out


def options(parser) -> None:
    parser.add_argument("--two-objects", type=float, metavar="F",
                        help="train on the demo's 32 px world written again with a share F (0 < F <= 1) of its "
                        "scenes two objects, in DIR/experiments/two-objects-F/")


def prepare(demo: Path, args) -> Path:
    if args.two_objects is None:
        return demo
    if not 0 < args.two_objects <= 1:
        raise SystemExit(f"--two-objects {args.two_objects}: a share of the scenes, above 0 and at most 1")
    return two_object_world(demo, args.two_objects)


if __name__ == "__main__":
    main(__doc__, "captions", lambda demo: [("dense captions (relabeled)", ["data.caption=metadata"]),
                                            ("sparse alt-text (.txt)", ["data.caption=txt"])], options, prepare)
