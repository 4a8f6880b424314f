"""Relabeling speed and caption statistics on the shapes world: metadata captioner, then tiny VLMs.

The metadata captioner needs no model, so its captions/s measure the job itself: tar reading,
image decoding in DataLoader workers, quality checks, fsynced progress lines. A tiny random VLM
(`make_tiny_vlm`, the other captioner module's test builder) runs the real transformers path on
this CPU; its text is nonsense, usually rejected as repetition and retried once, so its captions/s
count every sample the job finished, ok or failed. Real VLM speed needs a GPU and real weights.

    python tools/bench_relabel.py [--count 300] [--resolution 64] [--batch-size 16] [--vlm llava,blip2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.relabel.captioner import CaptionerConfig  # noqa: E402
from data_pipelines.relabel.job import RelabelConfig, relabel  # noqa: E402
from data_pipelines.relabel.stats import format_summary  # noqa: E402
from data_pipelines.shapes import write_shapes  # noqa: E402


def tiny_vlm_builder():
    """`make_tiny_vlm(name, out_dir)`, the tiny random VLM builder."""
    from data_pipelines.relabel.tiny_vlm import make_tiny_vlm

    return make_tiny_vlm


def run(shards, out, captioner: CaptionerConfig, args) -> dict:
    cfg = RelabelConfig(captioner, batch_size=args.batch_size, workers=args.workers,
                        decode_workers=args.decode_workers, progress=False)
    return relabel(shards, out, cfg, log=lambda m: None).summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300, help="shapes-world samples (metadata captioner)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--decode-workers", type=int, default=1)
    ap.add_argument("--vlm", default="llava", help="comma-separated tiny VLMs to time ('' for none)")
    ap.add_argument("--vlm-count", type=int, default=48, help="samples captioned by each tiny VLM")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shapes(tmp / "shapes", count=args.count, seed=0, resolution=args.resolution, shard_size=args.shard_size)
        s = run(tmp / "shapes", tmp / "meta", CaptionerConfig("metadata"), args)
        print(f"metadata: {s['this_run']['captions_per_s']} captions/s ({args.count} samples, {args.resolution} px, "
              f"batch {args.batch_size}, {args.workers} worker(s) x {args.decode_workers} decode process(es))")
        print(format_summary(s))

        names = [n for n in args.vlm.split(",") if n]
        make_tiny_vlm = tiny_vlm_builder() if names else None
        if names and make_tiny_vlm is None:
            print("tiny VLM: not available (data_pipelines.relabel.vlm provides no make_tiny_vlm)")
            return
        if names:
            write_shapes(tmp / "small", count=args.vlm_count, seed=1, resolution=args.resolution,
                         shard_size=args.vlm_count)
        for name in names:
            model = make_tiny_vlm(name, tmp / f"vlm-{name}")
            cap = CaptionerConfig(name, model=str(model), device="cpu", dtype="fp32",
                                  max_new_tokens=args.max_new_tokens)
            s = run(tmp / "small", tmp / f"cap-{name}", cap, args)
            c = s["counts"]
            print(f"tiny {name}: {s['this_run']['captions_per_s']} captions/s ({args.vlm_count} samples, "
                  f"{args.max_new_tokens} new tokens, CPU fp32; ok {c['done']}, failed {c['failed']}: "
                  f"{s['failure_reasons']})")


if __name__ == "__main__":
    main()
