"""tools/bench_loader.py: local files and an HTTP server on 127.0.0.1, measured in interleaved rounds."""
import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_loader.py"


def test_the_bench_reports_medians_of_its_rounds_and_the_ratio_to_local_files():
    tiny = ["--samples", "64", "--shards", "2", "--latent", "4", "--tokens", "8", "--dim", "16", "--batch", "8",
            "--steps", "2", "--warmup", "1"]
    run = subprocess.run([sys.executable, str(TOOL), *tiny, "--rounds", "3", "--workers", "0", "--sources", "local",
                          "http"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {}
    for line in run.stdout.splitlines():
        m = re.match(r"(\w+) +workers=0 .*: ([\d,]+) samples/s(?: \(([\d.]+)x local\))?, median of (.+)$", line)
        if m:
            rows[m[1]] = (float(m[2].replace(",", "")), m[3], [float(v.replace(",", "")) for v in m[4].split(", ")])
    assert set(rows) == {"local", "http"}
    for median, _, rounds in rows.values():
        assert len(rounds) == 3 and median == sorted(rounds)[1]
    assert rows["local"][1] is None
    (http, ratio, _), (local, _, _) = rows["http"], rows["local"]
    # the printed ratio is the rates' own, to the rounding of the three printed numbers (2 decimals; whole samples/s)
    assert abs(float(ratio) - http / local) <= 0.005 + http / local * (0.5 / http + 0.5 / local) + 1e-9


def test_a_count_of_zero_is_argparses_usage_error_naming_the_argument():
    for flag in ("--rounds", "--samples", "--steps"):
        run = subprocess.run([sys.executable, str(TOOL), flag, "0"], capture_output=True, text=True)
        assert run.returncode == 2
        assert run.stderr.strip().splitlines()[-1].endswith(f"error: argument {flag}: 0 is not a positive integer")
