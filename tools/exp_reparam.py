"""Reparameterized init vs random init (PixArt-alpha section 2.3, in miniature).

Stage 2 on the dense captions for the same steps and seed, once from the demo's reparameterized
stage-1 DiT and once from a random init of the same architecture; compares the stage-2 loss
curve and held-out alignment.

    pixart demo --out demo_out                       # once: data, features, stage 1, reparam
    python tools/exp_reparam.py --demo demo_out [--steps 600]
"""
from stage2_runs import main, reparam_arch

if __name__ == "__main__":
    main(__doc__, "reparam", lambda demo: [
        ("reparameterized init", ["data.caption=metadata"]),
        ("random init", ["data.caption=metadata", "model.init=null", reparam_arch(demo)])])
