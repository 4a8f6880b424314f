"""Dense vs sparse captions (PixArt-alpha's data claim, in miniature).

Stage 2 from the same reparameterized checkpoint, same steps and seed, trained once on the
relabeling job's dense captions and once on the shapes world's `.txt` alt-text (sparse, noisy,
web-like); both scored by the judge on the held-out prompts, and in a world with two-object scenes
(`TWO_OBJECT_FRACTION` in pixart/demo/pipeline.py) on every held-out pair of objects too.

    pixart demo --out demo_out                       # once: data, features, stage 1, reparam
    python tools/exp_captions.py --demo demo_out [--steps 600]
"""
from stage2_runs import main

if __name__ == "__main__":
    main(__doc__, "captions", lambda demo: [("dense captions (relabeled)", ["data.caption=metadata"]),
                                            ("sparse alt-text (.txt)", ["data.caption=txt"])])
