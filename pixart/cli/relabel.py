"""`pixart relabel`: dense captions for every sample of SHARDS, as sidecar jsonl files; resumable."""
from __future__ import annotations

import os

from data_pipelines.relabel.captioner import QWEN_MAX_PIXELS
from pixart.cli import non_negative_int, positive_int, seed32


def add_parser(sub) -> None:
    p = sub.add_parser(
        "relabel", help="caption shards with a captioner (metadata or a VLM) into sidecar jsonl files",
        description="Write DIR/<shard>.<captioner>.jsonl per input shard: one {__key__, caption, model, prompt, "
        "status, attempts} per sample (and reason on failed ones), and DIR/<captioner>-summary.json (counts, "
        "caption length and distinct words beside the alt-texts'). Kill it any time and run the same command "
        "again: finished samples are kept, none is captioned twice. Shards are split over nodes by RANK/WORLD_SIZE "
        "and over --workers local processes (shard i to worker i mod WORLD_SIZE*workers). extract-features "
        "--captions NAME reads the output. Exits 1 while a damaged shard is left for a rerun to retry.")
    p.add_argument("shards", nargs="+", help="SHARDS: folder, glob, brace pattern or webdataset URL")
    p.add_argument("--captioner", required=True,
                   help="metadata (the shapes world's truth as dense captions), metadata-short (the same as a user "
                   "would type it), a VLM: llava, llava-next, qwen2-vl, qwen2.5-vl, blip2; "
                   "or module:callable building your own from a CaptionerConfig")
    p.add_argument("--out", required=True, help="folder for the caption files")
    p.add_argument("--model", help="VLM folder or hub id")
    p.add_argument("--prompt",
                   help="VLM prompt, written in each checkpoint's own chat format (default: PixArt-alpha's "
                   "\"Describe this image and its style in a very detailed manner\"). --prompt \"\" sends no "
                   "prompt: the image alone, i.e. BLIP-2's plain captioning (given a prompt, BLIP-2 is asked "
                   "\"Question: ... Answer:\")")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="longest side, in pixels, that decoded images are shrunk to before the VLM's processor "
                   "(default: the checkpoint's working resolution, e.g. 336 for LLaVA-1.5, 1024 for Qwen2-VL; "
                   "0: as decoded)")
    p.add_argument("--min-pixels", type=int, default=None, metavar="N",
                   help="qwen2-vl, qwen2.5-vl: smallest image area after resizing; a visual token covers 28x28 px "
                   "(default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help=f"qwen2-vl, qwen2.5-vl: largest image area after resizing (default {QWEN_MAX_PIXELS:,}: "
                   "at most 1024 visual tokens per image)")
    p.add_argument("--workers", type=positive_int, default=1, help="local job processes, e.g. one per GPU (default 1)")
    p.add_argument("--decode-workers", type=non_negative_int, default=None,
                   help="image-decoding processes per job worker; 0: decode in the job worker itself (default: "
                   "CPUs / workers, at most 8)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="samples per captioner call; halved on OOM (default 8)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--seed", type=seed32, default=0,
                   help="phrasing / sampling seed, 0 to 2**32 - 1; a retry uses seed + 1 (default 0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=160, help="VLM generation limit (default 160)")
    p.add_argument("--max-words", type=positive_int, default=150, help="longer captions are rejected (default 150)")
    p.add_argument("--accept-damaged", action="store_true",
                   help="finish a shard whose input tar breaks off with the samples read (default: leave it "
                   "unfinished and report it; a rerun retries it)")
    p.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                   help="VLM backend (default transformers)")
    p.set_defaults(run=run)


def captioner_config(args, device: str):
    """The CaptionerConfig the flags ask for. --prompt stays None when absent (the default prompt)
    and "" when given empty (no prompt)."""
    from data_pipelines.relabel.captioner import CaptionerConfig

    return CaptionerConfig(args.captioner, model=args.model, prompt=args.prompt, device=device,
                           dtype=args.dtype or ("bf16" if device.startswith("cuda") else "fp32"),
                           max_new_tokens=args.max_new_tokens, seed=args.seed, backend=args.backend,
                           image_size=args.image_size, min_pixels=args.min_pixels, max_pixels=args.max_pixels)


def run(args) -> int:
    from data_pipelines.relabel.job import RelabelConfig, relabel
    from data_pipelines.relabel.quality import QualityConfig
    from pixart.cli import pick_device

    device = pick_device(args.device)
    decode = args.decode_workers
    if decode is None:
        decode = max(1, min(8, (os.cpu_count() or 1) // max(1, args.workers)))
    cap = captioner_config(args, device)
    job = relabel(args.shards, args.out, RelabelConfig(cap, batch_size=args.batch_size, workers=args.workers,
                                                       decode_workers=decode,
                                                       quality=QualityConfig(max_words=args.max_words),
                                                       accept_damaged=args.accept_damaged))
    return 1 if any(r.damaged for r in job.runs) else 0  # shards left for a rerun
