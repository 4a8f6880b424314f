"""2 processes over gloo (ZeRO-2, ZeRO-3) against 1 process on the same global batches.

Tolerances (tests/tolerance.py): per-step losses to float32 reordering; weights and EMA after 4 AdamW
steps (lr 1e-3, warmup 2) to a fraction of lr x steps. Only the order of floating-point reductions differs
(gradient all-reduce, ZeRO's flat buffers), and Adam divides by sqrt(v), so tiny gradients' rounding shows in
the update.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pickles import RunsCode
from safetensors.torch import load_file
from tolerance import adam_steps, approx, reordered

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
STEPS, GLOBAL_BATCH = 4, 8
WEIGHTS = adam_steps(1e-3, STEPS - 1.5)  # warmup 2: 0 + 0.5 + 1 + 1 steps of lr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(run_dir: Path, zero: int, nproc: int, precision: str = "fp32", lr: float = 1e-3, flags: str = "",
        torch_logs: str = "", train: dict | None = None, fails: bool = False, ds_json: dict | None = None,
        conversion_s: float = 0) -> Path:
    """Trains the worker's stage into `run_dir` (`train`: its `train.` settings; `ds_json`: a DeepSpeed JSON;
    `conversion_s`: how long ds_to_universal takes at least) and asserts it succeeds (or, with `fails`, that it
    does not); its stderr is kept as `run_dir/stderr.log`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), DIST_WORKER_TRAIN=json.dumps(train or {}),
               **({"TORCH_LOGS": torch_logs} if torch_logs else {}),
               **({"DIST_WORKER_SLOW_CONVERSION": str(conversion_s)} if conversion_s else {}))
    if ds_json:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        (run_dir.parent / "deepspeed.json").write_text(json.dumps(ds_json))
        env["DIST_WORKER_DEEPSPEED"] = str(run_dir.parent / "deepspeed.json")
    args = [str(WORKER), str(run_dir), str(zero), precision, str(GLOBAL_BATCH), str(STEPS), str(lr), flags]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), *args]
    else:
        cmd = [sys.executable, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (r.returncode != 0) == fails, r.stderr[-3000:]
    (run_dir / "stderr.log").write_text(r.stderr)
    return run_dir


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final(run_dir: Path, file: str) -> dict:
    return load_file(run_dir / "checkpoints" / f"step-{STEPS:06d}" / file)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single") / "run", zero=0, nproc=1)


@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_match_one_on_the_same_global_batch(single, tmp_path, zero):
    two = run(tmp_path / "run", zero=zero, nproc=2)
    assert losses(two) == approx(losses(single), reordered(losses(single)))
    assert len(losses(two)) == STEPS
    # the gradient norm before clipping: DeepSpeed's ZeRO computes its own; on the one-rank ZeRO-0 fp32 path,
    # where DeepSpeed drops the norm it clips by, the trainer keeps it (it logged 0.0 there)
    norms = losses(single, "grad_norm")
    assert losses(two, "grad_norm") == approx(norms, reordered(norms)) and min(norms) > 0
    for file in ("model.safetensors", "ema.safetensors"):  # ZeRO-3: the EMA of partitioned parameters
        a, b = final(single, file), final(two, file)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], **WEIGHTS, msg=f"{file} {k}")
    moved = max((final(single, "model.safetensors")[k] - final(single, "ema.safetensors")[k]).abs().max().item()
                for k in a)
    assert moved > 1e-3  # the EMA really lags the weights: the comparison above is not vacuous


@pytest.mark.parametrize("zero, before, after", [(2, 2, 1), (3, 1, 2), (0, 2, 1)])
def test_a_run_resumed_at_another_world_size_ends_where_an_uninterrupted_one_does(single, tmp_path, zero, before,
                                                                                  after):
    """A run that lost a node goes on with fewer processes (or more, when it comes back) under `train.elastic`.
    ZeRO's partitioned optimizer state is converted by DeepSpeed's own ds_to_universal, and every Adam moment
    and step count must survive: on the same global batches, the run ends on the weights of one uninterrupted
    process. ZeRO-3 runs with several parameter sub-groups, to which DeepSpeed's universal load hands one shared
    step tensor (each sub-group's update would count it again). Where several ranks wait for rank 0's conversion,
    it outlasts their collective timeout, as an XL state's may: they wait on a group of their own."""
    ds_json = {"zero_optimization": {"sub_group_size": 20_000}} if zero == 3 else None
    run_dir = run(tmp_path / "run", zero, before, train={"max_steps": 2, "ckpt_every": 2}, ds_json=ds_json)
    slow = {"train": {"elastic": True, "collective_timeout_s": 15}, "conversion_s": 30} if after > 1 else {}
    run(run_dir, zero, after, **{"train": {"elastic": True}, "ds_json": ds_json, **slow})
    assert "resumed from" in (run_dir / "stderr.log").read_text()
    assert losses(run_dir) == approx(losses(single), reordered(losses(single)))
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = final(single, file), final(run_dir, file)
        for k in a:
            torch.testing.assert_close(b[k], a[k], **WEIGHTS, msg=f"{file} {k}")
    converted = run_dir / "checkpoints" / "step-000002" / "deepspeed-universal" / "state"
    assert converted.is_dir() == (zero > 0)  # ZeRO 0's whole state loads at any world size as it is


def test_converting_for_another_world_size_never_runs_a_pickles_code(tmp_path):
    """DeepSpeed's ds_to_universal unpickles every state file with weights_only=False; a run folder may be a
    teammate's or a download, so the conversion reads them as data too. The rank waiting for it stops with rank
    0's reason."""
    run_dir = run(tmp_path / "run", 2, 1, train={"max_steps": 2, "ckpt_every": 2})
    shard = run_dir / "checkpoints" / "step-000002" / "deepspeed" / "state" / \
        "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ran = tmp_path / "ran"
    torch.save({"optimizer_state_dict": RunsCode(f"touch {ran}")}, shard)
    run(run_dir, 2, 2, train={"elastic": True}, fails=True)
    assert not ran.exists()
    err, reason = (run_dir / "stderr.log").read_text(), f"{shard}: not read: it holds objects other than tensors"
    assert reason in err
    assert f"deepspeed/state: rank 0 could not convert it for this world size (failed: {reason}" in err


def test_compiled_checkpointed_blocks_under_zero3_match_one_eager_rank_without_tracing_hooks(single, tmp_path):
    """ZeRO-3 gathers each block whole (a leaf module) and only a block's `forward` is compiled, so DeepSpeed's
    hooks stay eager: dynamo traces the block's math alone, once. Without the leaf marking it traced the
    sub-modules' hooks and hit its recompile limit (37 recompiles per rank in 4 steps)."""
    two = run(tmp_path / "run", zero=3, nproc=2, flags="compile,grad_checkpointing", torch_logs="recompiles,dynamo")
    log = (two / "stderr.log").read_text()
    traced = [line.split("start tracing ")[1] for line in log.splitlines() if "start tracing " in line]
    assert traced and all(t.startswith("forward ") and t.split(":")[0].endswith("pixart/models/pixart.py")
                          for t in traced), traced
    assert "Recompiling" not in log
    assert losses(two) == approx(losses(single), reordered(losses(single)))
    a, b = final(single, "model.safetensors"), final(two, "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], **WEIGHTS, msg=k)


def test_bf16_masters_start_from_the_exact_fp32_init(tmp_path):
    """DeepSpeed builds bf16 masters from the bf16 copy of the model; the trainer puts the fp32 init back.
    With lr 1e-12 no update reaches fp32 resolution, so the saved masters are the init, bit for bit."""
    import yaml

    from pixart.models import build_model

    run_dir = run(tmp_path / "run", zero=2, nproc=1, precision="bf16", lr=1e-12)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    torch.manual_seed(cfg["train"]["seed"])
    init = build_model(cfg["model"]["name"], **cfg["model"]["arch"]).state_dict()
    w, w0 = final(run_dir, "model.safetensors")["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"]
    assert w.dtype == torch.float32
    assert not torch.equal(w0.bfloat16().float(), w0)  # the init is not bf16-representable...
    assert torch.equal(w, w0)  # ...and the masters kept every bit of it
