"""tools/memory_plan.py: a plan that fits the GPU it names, and bad flags as argparse's one-line errors."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pixart.models import build_model

TOOL = Path(__file__).resolve().parents[1] / "tools" / "memory_plan.py"


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def test_the_largest_batch_fits_the_usable_memory_and_one_more_would_not():
    run = plan("--model", "PixArt-S/2", "--resolution", "64", "--gpu-gb", "1", "--usable", "0.9")
    assert run.returncode == 0, run.stderr[-2000:]
    params = sum(p.numel() for p in build_model("PixArt-S/2", input_size=8).parameters())
    assert f"for {params / 1e6:.0f}M params" in run.stdout
    states = float(re.search(r"states .*: ([\d.]+) GB", run.stdout)[1])
    rows = re.findall(r"([\d.]+) GB per image -> largest batch (\d+) \(([\d.]+) GB\)", run.stdout)
    assert len(rows) == 2
    for per_image, batch, total in rows:
        assert float(total) <= 0.9 + 0.05  # printed to 0.1 GB
        assert states + (int(batch) + 1) * float(per_image) > 0.9 - 0.1  # per_image is printed to 0.001 GB


@pytest.mark.parametrize("args, error", [
    (["--resolution", "0"], "argument --resolution: 0 is not a positive integer"),
    (["--resolution", "1000"], "--model PixArt-XL/2 at --resolution 1000: model config: patch_size=2 does not divide"),
    (["--usable", "1.5"], "--gpu-gb must be positive and --usable in (0, 1]"),
])
def test_bad_flags_are_one_line_naming_the_flag(args, error):
    run = plan(*args)
    assert run.returncode == 2
    assert error in run.stderr.strip().splitlines()[-1]
