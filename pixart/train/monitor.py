"""What a run shows: TensorBoard scalars, `metrics.jsonl`, the loss-curve PNG and an MFU estimate.

Rank 0 writes; `metrics.jsonl` is cut back to the resumed step on restart, so a resumed run's
log reads as if it had never stopped.
"""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import torch

from pixart.atomic import atomic_write
from pixart.models import ModelConfig

# Dense bf16 peaks per GPU (TFLOP/s) for the MFU estimate when the config gives none.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def train_flops_per_sample(blocks: int, config: ModelConfig, tokens: int, text_tokens: int) -> float:
    """Forward + backward (3x forward) matmul FLOPs: 2 per weight of the `blocks` per token, plus attention."""
    D, depth = config.hidden_size, config.depth
    attention = 4 * depth * tokens * tokens * D
    if config.arch == "pixart":
        attention += 4 * depth * tokens * text_tokens * D
    return 3.0 * (2.0 * blocks * tokens + attention)


def peak_flops(configured_tflops: float | None) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def read_log(path: Path) -> list[dict]:
    """The rows of an append-only JSON-lines log, without a line a crash or a full disk tore (it is cut off when
    the log is written again): a torn last line must not stop a run from resuming."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


class Monitor:
    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled, self.path = enabled, run_dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.writer = None
        if not enabled:
            return
        if self.path.is_file():
            self.history = [r for r in read_log(self.path) if r["step"] <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self.history.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def image(self, tag: str, step: int, path: Path) -> None:
        if self.enabled:
            import numpy as np
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")

    def loss_curve(self, out: Path, title: str, keys: tuple[str, ...] = ()) -> None:
        """The run's loss against step; with `keys`, one line per logged scalar of those names instead."""
        if not self.enabled or not self.history:
            return
        runs = {k: [{"step": r["step"], "loss": r[k]} for r in self.history if k in r] for k in keys}
        save_loss_curve(runs or {title: self.history}, out)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def save_loss_curve(runs: dict[str, list[dict]], out: Path, key: str = "loss") -> None:
    """One PNG with each run's `key` against step (a smoothed line over the raw points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, rows in runs.items():
        steps = [r["step"] for r in rows if key in r]
        values = [r[key] for r in rows if key in r]
        if not steps:
            continue
        line = ax.plot(steps, values, alpha=0.25)[0]
        ax.plot(steps, trailing_mean(values, max(1, len(values) // 20)), color=line.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out)


def trailing_mean(values: list[float], k: int) -> list[float]:
    """Each value's mean with the k - 1 before it (fewer at the start), from running sums: linear in the points,
    where a list of windows held k times as many (34 GB for the curve of 300k logged steps)."""
    sums = list(itertools.accumulate(values, initial=0.0))
    return [(sums[i + 1] - sums[max(0, i + 1 - k)]) / min(i + 1, k) for i in range(len(values))]


def save_figure(fig, out: Path) -> None:
    """A matplotlib figure to PNG, atomically (temp file, then rename), and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    data = io.BytesIO()
    fig.savefig(data, format="png")
    plt.close(fig)
    atomic_write(out, data.getvalue())
