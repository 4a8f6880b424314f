"""The training-step benchmark behind `pixart bench`: one step (forward, loss, backward, AdamW) on
cached-feature-shaped inputs, ours and optionally diffusers' `PixArtTransformer2DModel` with the
same weights and inputs, timed in alternation in one process so machine noise hits both alike.

MFU is against a peak measured in the same run: a large matmul in the step's precision (bf16
autocast over fp32 weights by default on a GPU, fp32 on a CPU), so it says how close the step is to
what this machine does. Every row runs in that one precision.
"""
from __future__ import annotations

import copy
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from pixart.diffusion import NoiseSchedule, diffusion_loss
from pixart.export.diffusers import to_diffusers_transformer
from pixart.models import build_model

from .compile import compile_blocks
from .monitor import train_flops_per_sample


@dataclass
class BenchConfig:
    model: str = "PixArt-S/2"
    resolution: int = 256  # pixels; latents are resolution / 8
    batch: int = 2
    tokens: int = 120  # caption length, a third of it padding
    device: str = "cpu"
    compare: str | None = None  # "diffusers"
    compile: bool = False  # also time ours with torch.compile'd blocks
    precision: str | None = None  # "bf16" or "fp32" for every row; None: bf16 on GPUs, fp32 on CPUs
    iters: int = 10
    warmup: int = 3


@dataclass
class StepResult:
    median_s: float
    min_s: float
    img_per_s: float
    tokens_per_s: float
    tflops: float
    mfu: float


@dataclass
class BenchResult:
    config: dict
    peak_tflops: float
    flops_per_img: float
    peak_memory_gb: float
    results: dict[str, StepResult] = field(default_factory=dict)
    ratio: float | None = None  # our fastest / diffusers step time (< 1: ours is faster)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Dense matmul throughput right now on this device (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        sync()
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e12


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # the process's peak RSS (KiB on Linux)


# Each row adds one optimization to the row before. "+bf16-weights" (bf16 runs only) keeps the model in bf16
# and fp32 master weights in the optimizer, as DeepSpeed's bf16 mode trains; the rows before it autocast
# over fp32 weights, as accelerate's mixed precision does.
ROWS = ("ours-padded", "+trim", "+fused-adamw", "+bf16-weights", "+compile")


def _has(row: str, optimization: str, rows: list[str]) -> bool:
    """Whether `row` includes `optimization`: it is that optimization's row or a later one."""
    return row in rows and optimization in rows and rows.index(row) >= rows.index(optimization)


class MasterWeightAdamW:
    """AdamW on fp32 copies of a bf16 model's weights: grads up-cast, the update copied back down."""

    def __init__(self, params, **adam):
        self.params = list(params)
        self.master = [p.detach().float().clone().requires_grad_() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, **adam)

    def step(self) -> None:
        for p, m in zip(self.params, self.master, strict=True):
            m.grad = p.grad.float()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def run_bench(cfg: BenchConfig) -> BenchResult:
    device = torch.device(cfg.device)
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"bench: precision must be bf16 or fp32, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    side = cfg.resolution // 8
    ours = build_model(cfg.model, input_size=side, class_dropout_prob=0.0)
    if ours.config.arch != "pixart" or ours.config.micro_conditions:
        raise ValueError(f"bench: {cfg.model}: use a PixArt (not DiT or PixArtMS) model")
    # Same weights and inputs in every row. "ours-padded" is the plain path: all cfg.tokens caption tokens
    # (diffusers' pipelines and scripts pad to max length) and torch's default AdamW, as diffusers' row.
    rows = [r for r in ROWS if (r != "+bf16-weights" or precision == "bf16") and (r != "+compile" or cfg.compile)]
    models = {name: ours if i == 0 else copy.deepcopy(ours) for i, name in enumerate(rows)}
    if cfg.compare == "diffusers":
        models["diffusers"] = to_diffusers_transformer(ours)
    schedule = NoiseSchedule.linear()
    B, C = cfg.batch, ours.config.in_channels
    x0 = torch.randn(B, C, side, side, device=device)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (B,), device=device)
    xt = schedule.q_sample(x0, t, noise)
    y = torch.randn(B, cfg.tokens, ours.config.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(B, cfg.tokens, device=device, dtype=torch.long)
    mask[:, 2 * cfg.tokens // 3:] = 0
    longest = int(mask.sum(1).max())

    steps = {}
    for name, model in models.items():
        model.to(device).train()
        adam = dict(lr=1e-6, weight_decay=0.03) | ({"fused": True} if _has(name, "+fused-adamw", rows) else {})
        bf16_weights = _has(name, "+bf16-weights", rows)
        if bf16_weights:
            model.to(torch.bfloat16)
            opt = MasterWeightAdamW(model.parameters(), **adam)
        else:
            opt = torch.optim.AdamW(model.parameters(), **adam)
        if _has(name, "+compile", rows):
            compile_blocks(model)
        autocast = dtype != torch.float32 and not bf16_weights

        trim = _has(name, "+trim", rows)

        def forward(model=model, name=name, trim=trim, autocast=autocast):
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                if name == "diffusers":
                    return model(xt, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                                 return_dict=False)[0]
                x = xt.to(next(model.parameters()).dtype)
                return model(x, t, y[:, :longest], mask[:, :longest]) if trim else model(x, t, y, mask)

        def step(model=model, opt=opt, forward=forward):
            loss = diffusion_loss(forward(), x0, xt, t, noise, schedule, learn_sigma=ours.config.learn_sigma).loss
            loss.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for i in range(cfg.warmup + cfg.iters):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= cfg.warmup:
                times[name].append(time.perf_counter() - start)
    peak = measured_peak_tflops(device, dtype)
    tokens = (side // ours.config.patch_size) ** 2
    blocks = sum(p.numel() for n, p in ours.named_parameters() if n.startswith("blocks."))
    flops = train_flops_per_sample(blocks, ours.config, tokens, longest)  # useful work: padding is waste
    out = BenchResult(asdict(cfg) | {"precision": precision}, peak, flops, _peak_memory_gb(device))
    for name, ts in times.items():
        med = statistics.median(ts)
        rate = B / med
        out.results[name] = StepResult(med, min(ts), rate, rate * tokens, flops * rate / 1e12,
                                       flops * rate / 1e12 / peak)
    if "diffusers" in out.results:
        fastest = min(v.median_s for k, v in out.results.items() if k != "diffusers")
        out.ratio = fastest / out.results["diffusers"].median_s
    return out


def table(r: BenchResult) -> str:
    c = r.config
    lines = [f"{c['model']} {c['resolution']} px, batch {c['batch']}, {c['tokens']} caption tokens, {c['device']}, "
             f"{c['precision']}, "
             f"{c['iters']} alternating steps (forward, loss, backward, AdamW); peak {r.peak_tflops:.2f} TFLOP/s "
             f"measured in this run",
             f"{'':13s} {'step ms':>9s} {'img/s':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s}"]
    for name, s in r.results.items():
        lines.append(f"{name:13s} {s.median_s * 1000:9.1f} {s.img_per_s:8.2f} {s.tokens_per_s:10.0f} "
                     f"{s.tflops:8.3f} {s.mfu:6.1%}")
    if r.ratio is not None:
        lines.append(f"ratio our fastest/diffusers step time: {r.ratio:.3f} (< 1: ours is faster)")
    kind = "CUDA allocated" if c["device"] != "cpu" else "process RSS"
    lines.append(f"peak memory: {r.peak_memory_gb:.2f} GB ({kind})")
    return "\n".join(lines)
