"""Aesthetic scores for the stage-3 filter: one sidecar per shard, `<shard>.aesthetic.jsonl`.

Each line is `{"__key__": ..., "score": ...}`; samples that cannot be scored are left
out, counted by reason and reported. A shard of which nothing could be read (missing, HTTP 404, a failed
`pipe:` command, not a tar) gets no sidecar, so an earlier run's stays. A finished shard's record
(`.done/<shard>.aesthetic.json`: its input and scorer) lets a rerun skip it, so a killed job resumes and a new
threshold is counted from the sidecars without scoring again. Two scorers:

- `shapes`: the shapes world's own `aesthetic` from the sample's `.json` (1 clean, lower damaged), marked down
  for a busy background (`BACKGROUND_APPEAL`): the world's own rule of what looks best;
- `laion`: LAION's improved aesthetic predictor: an MLP on the L2-normalised CLIP image
  embedding (ViT-L/14 in the original, 768-d; the head's input follows the CLIP model's
  projection dim). Scores are about 1-10, 5 and up is the usual "aesthetic" cut.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pixart.atomic import atomic_write, check_out_folder, remove_dead_writers
from pixart.data.manifest import file_sha256
from pixart.data.shards import check_unique_names, input_record, same_input
from pixart.errors import PixArtError

SIDECAR = "{}.aesthetic.jsonl"
SUMMARY = "aesthetic-summary.json"
RECORD = ".done/{}.aesthetic.json"  # written after the sidecar: the shard is finished
DEFAULT_THRESHOLD = {"shapes": 0.5, "laion": 5.0}
HEAD_FILE = "aesthetic_head.safetensors"
# A gradient or a texture behind the object looks busier than a plain background. With the demo's stage-3 cut
# (0.99) only clean scenes on plain backgrounds are kept: the model does not read a caption's background words,
# so it drew the mean of the three backgrounds, a mottle, where a prompt asked for a plain one.
BACKGROUND_APPEAL = {"plain": 1.0, "gradient": 0.9, "texture": 0.8}
NO_AESTHETIC = "json has no 'aesthetic'"  # a shard of another dataset, when none of a batch has one


def _shapes_score(sample: dict) -> float | str:
    """The sample's `aesthetic` times its background's appeal (1 when the json names no background), or why it
    has none."""
    if "json" not in sample:
        return "no json"
    try:
        meta = json.loads(sample["json"])
    except ValueError:
        return "bad json"
    if not isinstance(meta, dict) or "aesthetic" not in meta:
        return NO_AESTHETIC
    background = meta.get("background")
    if background is not None and (not isinstance(background, str) or background not in BACKGROUND_APPEAL):
        return f"unknown background {background!r}"
    try:
        return float(meta["aesthetic"]) * BACKGROUND_APPEAL.get(background, 1.0)
    except (TypeError, ValueError):
        return "'aesthetic' is not a number"


class ShapesScorer:
    """The rendered quality recorded in the shapes world's metadata, marked down for a busy background. A batch of
    which no sample's json has one is another dataset's shard: an error, rather than a run that scores nothing."""

    name = "shapes"
    identity = {"scorer": "shapes", "background_appeal": BACKGROUND_APPEAL}

    def __call__(self, samples: list[dict]) -> list[float | str]:
        out = [_shapes_score(s) for s in samples]
        if out and all(r == NO_AESTHETIC for r in out):
            raise PixArtError(f"--scorer shapes reads the shapes world's metadata (KEY.json 'aesthetic'); the "
                              f"samples of {samples[0].get('__url__', 'this shard')} have none: use --scorer laion")
        return out


def aesthetic_head(dim: int = 768):
    """LAION's improved-aesthetic-predictor MLP; its state-dict keys (`layers.N.*`) match the released weights."""
    from torch import nn

    class AestheticHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    return AestheticHead()


def _read_head(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise PixArtError(f"{path}: no aesthetic head (pass --head PATH)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:  # the released .pth is a plain state dict
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PixArtError(f"{path}: cannot read aesthetic head ({type(e).__name__})") from None
    if "layers.0.weight" not in state:
        raise PixArtError(f"{path}: not an aesthetic head (no layers.0.weight)")
    return state


class LaionScorer:
    """CLIP image embedding -> L2 normalise -> MLP head, in batches; a sample without a readable image gets why."""

    name = "laion"

    def __init__(self, model: str | os.PathLike, head: str | os.PathLike | None = None, device: str = "cpu"):
        import torch
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        from pixart.encoders.loading import config_kind, local_config

        model = Path(model)
        if not (model / "config.json").is_file():
            raise PixArtError(f"--model {model}: not a CLIP model folder (no config.json)")
        config = local_config(str(model), None)
        if config is None:
            raise PixArtError(f"--model {model}: its config.json is not a JSON object")
        if config.get("model_type") not in ("clip", "clip_vision_model"):
            raise PixArtError(f"--model {model}: not a CLIP model (its config has {config_kind(config)}, not "
                              "model_type 'clip')")
        if not (model / "preprocessor_config.json").is_file():
            raise PixArtError(f"--model {model}: no preprocessor_config.json (CLIP's image processor; the hub's CLIP "
                              "folders have it)")
        try:
            self.clip = CLIPVisionModelWithProjection.from_pretrained(model).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(model)
        except (OSError, ValueError) as e:  # no weights, or no preprocessor_config.json
            raise PixArtError(f"--model {model}: cannot load its CLIP ({str(e).strip().splitlines()[0]})") from None
        state = _read_head(Path(head) if head else model / HEAD_FILE)
        dim = self.clip.config.projection_dim
        if state["layers.0.weight"].shape[1] != dim:
            raise PixArtError(f"aesthetic head takes {state['layers.0.weight'].shape[1]}-d embeddings, "
                              f"the CLIP model at {model} makes {dim}-d ones")
        self.head = aesthetic_head(dim)
        self.head.load_state_dict(state)
        self.head.to(device).eval()
        self.device, self.torch = device, torch
        parts = sorted(p for p in model.iterdir() if p.is_file() and p.name != HEAD_FILE)  # weights, processor
        self.identity = {"scorer": "laion", "head": file_sha256(Path(head) if head else model / HEAD_FILE),
                         "model": {p.name: file_sha256(p) for p in parts}}

    def __call__(self, samples: list[dict]) -> list[float | str]:
        from pixart.data.tars import decode_image

        images, where = [], []
        out: list[float | str] = [""] * len(samples)
        for i, s in enumerate(samples):
            try:
                images.append(decode_image(s))
                where.append(i)
            except ValueError as e:  # no image, or not decodable: skipped and counted
                out[i] = str(e)
        if images:
            with self.torch.no_grad():
                pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
                emb = self.clip(pixel_values=pixels).image_embeds
                scores = self.head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).float().cpu().tolist()
            for i, s in zip(where, scores, strict=True):
                out[i] = s
        return out


@dataclass
class ShardResult:
    name: str
    samples: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)  # why samples were skipped: reason -> count
    error: str | None = None  # why the shard broke off part-way (truncated tar), or why nothing could be read

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())


@dataclass
class Summary:
    scorer: str
    threshold: float
    shards: list[ShardResult] = field(default_factory=list)
    reused: int = 0  # shards an earlier run had scored

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.shards)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.shards)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.shards)

    @property
    def reasons(self) -> Counter:
        return sum((r.reasons for r in self.shards), Counter())

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.samples if self.samples else 0.0

    def to_json(self) -> dict:
        return {"scorer": self.scorer, "threshold": self.threshold, "samples": self.samples, "kept": self.kept,
                "kept_fraction": self.kept_fraction, "skipped": self.skipped,
                "skipped_reasons": dict(self.reasons.most_common()),
                "shards": {r.name: {"samples": r.samples, "kept": r.kept, "skipped": r.skipped,
                                    "skipped_reasons": dict(r.reasons.most_common()), "error": r.error}
                           for r in self.shards}}


def _score_batch(batch: list[dict], scorer: Callable, threshold: float, result: ShardResult, lines: list[str],
                 progress: Callable[[int], None] | None) -> None:
    """Score `batch` into `result` and `lines` (one sidecar line per scored sample), then empty it."""
    for sample, score in zip(batch, scorer(batch), strict=True):
        if isinstance(score, str):  # why it was not scored
            result.reasons[score] += 1
            continue
        score = round(score, 6)  # as the sidecar keeps it, and the loader and a rerun read it
        lines.append(json.dumps({"__key__": sample["__key__"], "score": score}))
        result.samples += 1
        result.kept += score >= threshold
    progress and progress(len(batch))
    batch.clear()


def score_shards(shards: list[str], out_dir: str | os.PathLike, scorer: Callable, threshold: float,
                 batch_size: int = 32, progress: Callable[[int], None] | None = None) -> Summary:
    """Score every sample of every shard, write the sidecars and the summary; return the summary. A scorer returns
    a score or, for a sample it cannot score, why not."""
    from pixart.data.tars import TarDamage, iter_samples

    names = check_unique_names(shards)  # one sidecar per name: a second shard would overwrite the first
    out = Path(out_dir)
    check_out_folder(out)
    for folder in (out, (out / RECORD).parent):  # a killed run's temps (atomic_write clears a folder once per process)
        if folder.is_dir():
            remove_dead_writers(folder)
    summary = Summary(scorer=scorer.name, threshold=threshold)
    for url, name in zip(shards, names, strict=True):
        result = _finished(out, url, name, scorer.identity, threshold)
        if result is not None:
            summary.shards.append(result)
            summary.reused += 1
            continue
        result, lines, batch = ShardResult(name), [], []
        damage = TarDamage()
        try:  # before reading: a shard changed while it is scored is scored again by the next run
            identity = input_record(url)
        except (OSError, PixArtError):  # missing (reported below), or a URL that answers no HEAD: no record
            identity = None
        for sample in iter_samples(url, damage):
            batch.append(sample)
            if len(batch) == batch_size:
                _score_batch(batch, scorer, threshold, result, lines, progress)
        _score_batch(batch, scorer, threshold, result, lines, progress)
        result.error = damage.reason() if damage.error else None
        out.mkdir(parents=True, exist_ok=True)  # made only once there is something to write
        if damage.after or not damage.error:  # nothing read: no empty sidecar in place of an earlier one
            (out / RECORD.format(name)).unlink(missing_ok=True)  # the old record, until the new sidecar is in
            atomic_write(out / SIDECAR.format(result.name), "".join(line + "\n" for line in lines))
        if identity is not None and not damage.error:  # a damaged shard is read again by the next run
            (out / RECORD.format(name)).parent.mkdir(exist_ok=True)
            atomic_write(out / RECORD.format(name), json.dumps(
                {"input": identity, **scorer.identity, "samples": result.samples,
                 "skipped_reasons": dict(result.reasons)}))
        summary.shards.append(result)
    atomic_write(out / SUMMARY, json.dumps(summary.to_json(), indent=2))
    return summary


def _finished(out: Path, url: str, name: str, identity: dict, threshold: float) -> ShardResult | None:
    """A shard an earlier run scored from this input with this scorer, counted at `threshold`; else None."""
    record, sidecar = out / RECORD.format(name), out / SIDECAR.format(name)
    try:
        rec = json.loads(record.read_text())
        scores = [json.loads(line)["score"] for line in sidecar.read_text().splitlines()]
        if {k: rec.get(k) for k in identity} != identity or len(scores) != rec["samples"]:
            return None
        now = same_input(rec["input"], url)
        reasons = Counter(rec["skipped_reasons"])
    except (OSError, ValueError, KeyError, TypeError, PixArtError):  # no record, a torn one, an unreachable URL
        return None
    if now is None:
        return None
    if now != rec["input"]:  # the same bytes with a new mtime: remember it
        atomic_write(record, json.dumps({**rec, "input": now}))
    return ShardResult(name, len(scores), sum(score >= threshold for score in scores), reasons)
