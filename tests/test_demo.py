import json

from PIL import Image

from pixart.cli.main import main


def test_demo_runs_end_to_end_and_writes_its_outputs(tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == {"seconds", "prompts", "samples", "export"}
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (32 * 4 * len(report["prompts"]), 32 * 4)
    assert (tmp_path / "export" / "model_index.json").is_file()
    assert (tmp_path / "pixart" / "config.json").is_file()
