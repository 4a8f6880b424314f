"""`pixart personalize CKPT --data ... --concept NAME --super WORD --out FILE.safetensors`: a Perfusion concept."""
from __future__ import annotations

import argparse

from pixart.cli import seed32

EPILOG = """\
examples:
  pixart personalize runs/stage3/checkpoints/latest --data my_mug/ --concept mymug --super mug \\
      --captions data/captions/ --out concepts/mymug.safetensors
  pixart sample runs/stage3/checkpoints/latest --concept concepts/mymug.safetensors \\
      --prompt "a mymug on a wooden table" --beta 0.7 --tau 0.15

Only the concept learns: its value targets (one vector per block, lr 0.03) and its word's T5 embedding (lr 0.006),
starting from the super-category word's; its keys stay locked to the super-category's. The loss is masked to the
object (a folder's masks/<stem>.png, or the boxes in a shard's json), with no caption dropout. The first concept of
a base model estimates C, the caption tokens' second moment after the caption projection, from --captions and saves
it beside the checkpoint (perfusion-covariance-<id>.safetensors) for every later concept. The run folder (OUT.run/)
holds a state that a rerun resumes from, and loss.png.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("personalize", help="teach a trained model a new concept (Perfusion, ~100 KB)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="the base model's checkpoint folder, or its run's RUN/checkpoints/latest")
    p.add_argument("--data", required=True, help="a folder of images (+ masks/<stem>.png, + <stem>.txt captions "
                   "naming the concept) or webdataset shards")
    p.add_argument("--concept", required=True, help="the concept's word, as prompts will write it (one new token)")
    p.add_argument("--super", dest="super_word", required=True,
                   help="its super-category word (one token the model knows), e.g. mug")
    p.add_argument("--out", required=True, help="the concept file to write (.safetensors)")
    p.add_argument("--captions", help="caption corpus for C (a text file, one per line, a relabeling job's output "
                   "folder, or a glob of one captioner's files: 'DIR/*.llava.jsonl'); needed the first time for a "
                   "base model")
    p.add_argument("--covariance", help="a covariance file to use instead of the one beside the checkpoint")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400, Perfusion's)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr-value", type=float, default=0.03, help="learning rate of the value targets (default 0.03)")
    p.add_argument("--lr-embedding", type=float, default=0.006, help="learning rate of the embedding (default 0.006)")
    p.add_argument("--mask-floor", type=float, default=0.0, help="loss weight outside the object's mask (default 0: "
                   "the loss is masked to the object; 1: unmasked)")
    p.add_argument("--timesteps", choices=("uniform", "logit_normal"), default="uniform",
                   help="training timestep sampling (default uniform, Perfusion's)")
    p.add_argument("--seed", type=seed32, default=0, help="seed of the training draws, 0 to 2**32 - 1 (default 0)")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="stored precision of the concept (default fp16: 78 KB for PixArt-XL/2)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="the EMA weights (default: when the checkpoint has them)")
    p.add_argument("--text-encoder", help="T5 folder or hub id (default: the checkpoint's encoders.json)")
    p.add_argument("--vae", help="AutoencoderKL folder or hub id, or pixel:F[:K] (default: encoders.json)")
    p.add_argument("--run-dir", help="state and loss curve (default: OUT.run)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that this run did not write")
    p.set_defaults(run=run)


def run(args) -> None:
    from pixart.cli import pick_device
    from pixart.personalize.trainer import ConceptTrainer, PersonalizeConfig

    cfg = PersonalizeConfig(args.ckpt, args.data, args.concept, args.super_word, args.out, captions=args.captions,
                            covariance=args.covariance, steps=args.steps, batch=args.batch, lr_value=args.lr_value,
                            lr_embedding=args.lr_embedding, mask_floor=args.mask_floor, timesteps=args.timesteps,
                            seed=args.seed, ema=args.ema, precision=args.precision,
                            run_dir=args.run_dir, device=pick_device(args.device),
                            overwrite=args.overwrite, text_encoder=args.text_encoder, vae=args.vae)
    ConceptTrainer(cfg).train()
