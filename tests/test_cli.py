"""The `pixart` command as users call it: exit codes, one-line errors, nothing half-written."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_
from tolerance import reordered

from pixart.checkpoint import load_model
from pixart.cli.main import main
from pixart.models import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dit_file(tmp_path):
    dit = perturb_(build_model("DiT-S/2", input_size=8, depth=2, num_classes=10)).eval()
    path = tmp_path / "DiT-S-2.pt"
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "opt": {}}, path)  # DiT's train.py layout
    return dit, path


def run_cli(*argv):
    """A real subprocess, as a user's shell would run it."""
    return subprocess.run([sys.executable, "-m", "pixart", *map(str, argv)], capture_output=True, text=True)


def test_convert_dit_writes_an_exact_pixart_checkpoint(tmp_path, dit_file):
    dit, path = dit_file
    assert main(["convert-dit", str(path), "--out", str(tmp_path / "ck"), "--caption-channels", "16"]) == 0
    pixart = load_model(tmp_path / "ck").eval()
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500)
    ref = dit(x, t, torch.full((2,), 10))
    torch.testing.assert_close(pixart(x, t, torch.randn(2, 9, 16)), ref, **reordered(ref))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "reparam.json"]


def test_convert_dit_accepts_safetensors_and_raw_state_dicts(tmp_path, dit_file):
    from safetensors.torch import save_file

    dit, _ = dit_file
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, tmp_path / "d.safetensors")
    torch.save(dit.state_dict(), tmp_path / "raw.pth")
    for src in ("d.safetensors", "raw.pth"):
        assert main(["convert-dit", str(tmp_path / src), "--out", str(tmp_path / f"out-{src}"),
                     "--caption-channels", "8"]) == 0


@pytest.mark.parametrize("case,message", [
    ("truncated", "DiT-S-2.pt: not a readable checkpoint"),
    ("text", "DiT-S-2.pt: not a PyTorch checkpoint (zip or pickle) file"),  # torch's reason: "(101)"
    ("pickle", "DiT-S-2.pt: a plain Python pickle, not a torch.save checkpoint"),  # "Unsupported operand 149"
    ("wrong_model", "not a DiT state dict"),
    ("bad_heads", "num_heads=7 does not divide hidden_size=384"),
])
def test_convert_dit_bad_input_is_one_line_and_writes_nothing(tmp_path, dit_file, case, message):
    _, path = dit_file
    extra = []
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:4096])
    elif case == "text":
        path.write_text("hello world\n")
    elif case == "pickle":
        path.write_bytes(pickle.dumps({"model": {"w": [1.0]}}, protocol=4))  # torch warned twice about protocol 4
    elif case == "wrong_model":
        torch.save(build_model("PixArt-S/2", depth=1, input_size=8).state_dict(), path)
    else:
        extra = ["--num-heads", "7"]
    result = run_cli("convert-dit", path, "--out", tmp_path / "out", *extra)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() and "WARNING" not in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_and_import_commands_round_trip(tmp_path, dit_file):
    _, path = dit_file
    assert main(["convert-dit", str(path), "--out", str(tmp_path / "ck"), "--caption-channels", "16"]) == 0
    assert main(["export-diffusers", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    a, b = load_model(tmp_path / "ck").state_dict(), load_model(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_import_keeps_how_the_export_samples(tmp_path, dit_file):
    """A v-prediction checkpoint (and a one-step student) exported and imported again must sample the same way:
    diffusers records the prediction type in the scheduler's config, and we read it back from there."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    from pixart.checkpoint import DIFFUSION_FILE, STUDENT_FILE, load_prediction_type, load_student

    _, path = dit_file
    assert main(["convert-dit", str(path), "--out", str(tmp_path / "ck"), "--caption-channels", "16"]) == 0
    (tmp_path / "ck" / DIFFUSION_FILE).write_text(json.dumps({"prediction_type": "v_prediction"}))
    (tmp_path / "ck" / STUDENT_FILE).write_text(json.dumps({"start_timestep": 999, "teacher": "t"}))
    assert main(["export-diffusers", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
    scheduler = DPMSolverMultistepScheduler.from_pretrained(tmp_path / "hf", subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    for src in (tmp_path / "hf", tmp_path / "hf" / "transformer"):
        back = tmp_path / f"back-{src.name}"
        assert main(["import", str(src), "--out", str(back)]) == 0
        assert load_prediction_type(back) == "v_prediction"
        assert load_student(back) == {"start_timestep": 999, "teacher": "t"}
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "eps"), "--prediction-type", "epsilon"]) == 0
    assert load_prediction_type(tmp_path / "eps") == "epsilon"


def test_export_needs_both_pipeline_parts(tmp_path, dit_file):
    _, path = dit_file
    main(["convert-dit", str(path), "--out", str(tmp_path / "ck"), "--caption-channels", "16"])
    result = run_cli("export-diffusers", tmp_path / "ck", "--out", tmp_path / "hf", "--vae", tmp_path)
    assert result.returncode == 2 and "needs both --text-encoder and --vae" in result.stderr
    result = run_cli("export-diffusers", tmp_path / "ck", "--out", tmp_path / "hf", "--ema")
    assert result.returncode == 2 and "has no ema.safetensors" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_help_explains_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("convert-dit", "import", "export-diffusers", "demo"):
        assert command in result.stdout
    assert "--global-init" in run_cli("convert-dit", "--help").stdout


def test_a_misspelt_flag_is_shown_with_its_own_commands_usage(capsys):
    for argv, usage, extra in ((["relabel", "x", "--out", "o", "--captioner", "metadata", "--modle", "m"],
                                "pixart relabel", "--modle m"),
                               (["data", "sam", "x", "--out", "o", "--frob"], "pixart data sam", "--frob")):
        with pytest.raises(SystemExit, match="2"):
            main(argv)
        err = capsys.readouterr().err
        assert err.startswith(f"usage: {usage} ")
        assert err.strip().endswith(f"{usage}: error: unrecognized arguments: {extra}")


def test_every_option_with_a_default_says_it_in_its_help():
    """A user reads what an option does when it is left out; repeatable options (default []) need not say."""
    import argparse

    from pixart.cli.main import build_parser

    def options(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield from options(subparser, f"{name} {sub}")
            elif action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                yield f"{name} {action.option_strings[-1]}", action.help or ""

    silent = [option for option, text in options(build_parser(), "pixart") if "default" not in text]
    assert not silent, f"options whose help does not give their default: {silent}"


def test_convert_dit_without_a_null_class(tmp_path):
    dit = build_model("DiT-S/2", input_size=8, depth=1, num_classes=10, class_dropout_prob=0.0)
    torch.save(dit.state_dict(), tmp_path / "d.pt")
    result = run_cli("convert-dit", tmp_path / "d.pt", "--out", tmp_path / "o", "--num-classes", "10")
    assert result.returncode == 2 and "no null-class embedding" in result.stderr
    result = run_cli("convert-dit", tmp_path / "d.pt", "--out", tmp_path / "o", "--num-classes", "3")
    assert result.returncode == 2 and "num_classes=3 does not fit a class table of 10 rows" in result.stderr
    assert main(["convert-dit", str(tmp_path / "d.pt"), "--out", str(tmp_path / "o")]) == 0  # 9 classes + null


def test_convert_dit_takes_the_class_count_from_a_training_checkpoints_args(tmp_path, capsys):
    """facebookresearch/DiT's train.py saves {"model", "ema", "opt", "args"}, its argparse.Namespace holding
    --num-classes: a DiT trained without label dropout has exactly that many rows and no null class to fold. The
    released DiT-XL-2-256x256.pt is a bare state dict (1001 rows): there the null class is assumed, and said."""
    import argparse

    nodrop = build_model("DiT-S/2", input_size=8, depth=1, num_classes=10, class_dropout_prob=0.0)
    state = nodrop.state_dict()
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(num_classes=10)}, tmp_path / "t.pt")
    result = run_cli("convert-dit", tmp_path / "t.pt", "--out", tmp_path / "o")
    assert result.returncode == 2 and "no null-class embedding" in result.stderr, result.stderr
    dropped = build_model("DiT-S/2", input_size=8, depth=1, num_classes=10).state_dict()  # 11 rows
    torch.save({"model": dropped, "ema": dropped, "opt": {}, "args": argparse.Namespace(num_classes=10)},
               tmp_path / "t.pt")
    torch.save(dropped, tmp_path / "bare.pt")
    for src, said in (("t.pt", "10 DiT classes (from its args.num_classes)"),
                      ("bare.pt", "10 DiT classes (assumed: the class table's last row is the null class; "
                       "--num-classes says otherwise)")):
        assert main(["convert-dit", str(tmp_path / src), "--out", str(tmp_path / src.replace(".", "-"))]) == 0
        assert capsys.readouterr().out.strip().endswith(f"; {said}")


@pytest.mark.parametrize("command", ["export-diffusers", "import", "convert-dit"])
def test_a_bad_out_is_refused_before_anything_is_loaded(tmp_path, monkeypatch, capsys, command):
    """Loading T5-XXL or an XL checkpoint takes minutes: what the final write would refuse comes first. A plain
    file --out is the user's: never replaced by a folder, even with --overwrite."""
    import pixart.checkpoint
    import pixart.export.diffusers
    import pixart.export.dit
    import pixart.export.official

    def loading(*args, **kwargs):
        raise AssertionError("loaded before --out was checked")

    for module, name in ((pixart.checkpoint, "load_model"), (pixart.export.diffusers, "import_diffusers"),
                         (pixart.export.official, "import_official"), (pixart.export.dit, "load_dit")):
        monkeypatch.setattr(module, name, loading)
    (tmp_path / "src").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("old")
    (tmp_path / "file").write_text("mine")
    for out, extra, message in (("full", [], f"--out {tmp_path / 'full'} already exists and is not empty; pass "
                                             "--overwrite to replace it"),
                                ("file", [], f"--out {tmp_path / 'file'} is not a folder"),
                                ("file", ["--overwrite"], f"--out {tmp_path / 'file'} is not a folder"),
                                ("src", ["--overwrite"], f"--out {tmp_path / 'src'} would overwrite the input "
                                                         f"{tmp_path / 'src'}")):
        assert main([command, str(tmp_path / "src"), "--out", str(tmp_path / out), *extra]) == 2
        assert capsys.readouterr().err.strip() == f"pixart {command}: error: {message}"
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "full" / "old.txt").read_text() == "old"


def test_outputs_are_never_silently_replaced(tmp_path, dit_file):
    _, path = dit_file
    ck = tmp_path / "ck"
    assert main(["convert-dit", str(path), "--out", str(ck), "--caption-channels", "16"]) == 0
    result = run_cli("convert-dit", path, "--out", ck)
    assert result.returncode == 2 and "pass --overwrite" in result.stderr
    result = run_cli("export-diffusers", ck, "--out", ck, "--overwrite")
    assert result.returncode == 2 and "would overwrite the input" in result.stderr
    assert (ck / "model.safetensors").is_file()
    assert main(["convert-dit", str(path), "--out", str(ck), "--caption-channels", "16", "--overwrite"]) == 0


def test_an_output_never_replaces_its_input_the_current_folder_or_a_pointer(tmp_path, dit_file, monkeypatch):
    from pixart.checkpoint import save_checkpoint

    dit, path = dit_file
    checkpoints = tmp_path / "run1" / "checkpoints"  # a stage-1 run: its step folder and the `latest` pointer
    save_checkpoint(checkpoints / "step-000001", dit.config, dit.state_dict())
    (checkpoints / "latest").write_text("step-000001")
    stage1 = checkpoints / "latest"
    result = run_cli("convert-dit", stage1, "--out", checkpoints / "step-000001", "--overwrite")  # what it points to
    assert result.returncode == 2 and "would overwrite the input" in result.stderr
    assert main(["convert-dit", str(stage1), "--out", str(tmp_path / "ck"), "--caption-channels", "16"]) == 0
    assert json.loads((tmp_path / "ck" / "reparam.json").read_text())["source"] == str(checkpoints / "step-000001")
    (tmp_path / "ck-run" / "checkpoints").mkdir(parents=True)
    os.replace(tmp_path / "ck", tmp_path / "ck-run" / "checkpoints" / "step-000002")
    latest = tmp_path / "ck-run" / "checkpoints" / "latest"
    latest.write_text("step-000002")
    result = run_cli("export-diffusers", latest, "--out", latest, "--overwrite")  # the pointer itself: a file
    assert result.returncode == 2 and f"--out {latest} is not a folder" in result.stderr
    assert latest.read_text() == "step-000002"
    assert main(["export-diffusers", str(latest), "--out", str(tmp_path / "export")]) == 0
    result = run_cli("import", tmp_path / "export", "--out", tmp_path / "export" / "transformer", "--overwrite")
    assert result.returncode == 2 and "would overwrite the input" in result.stderr  # a part of its input
    assert (tmp_path / "export" / "transformer" / "config.json").is_file()
    result = run_cli("export-diffusers", latest, "--out", tmp_path / "ck-run" / "checkpoints" / "step-000002" / "x")
    assert result.returncode == 2 and "would overwrite the input" in result.stderr  # not even a new folder in it
    monkeypatch.chdir(tmp_path)
    for out, message in (("", "--out is empty"), (".", "holds the current directory")):
        result = run_cli("export-diffusers", latest, "--out", out, "--overwrite")  # a quoted unset "$OUT"
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert (tmp_path / "export").is_dir() and (tmp_path / "run1").is_dir()
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")  # replacing even an empty current folder leaves the shell nowhere
    result = run_cli("export-diffusers", latest, "--out", ".")
    assert result.returncode == 2 and "holds the current directory" in result.stderr
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_device_this_machine_lacks_is_one_line():
    from pixart.cli import pick_device
    from pixart.errors import PixArtError

    assert pick_device("cpu") == "cpu" and pick_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PixArtError, match="--device 'gpu0': not a device"):
        pick_device("gpu0")
    with pytest.raises(PixArtError, match="--device cuda:99: this machine has"):
        pick_device("cuda:99")


def test_unwritable_output_is_one_line(tmp_path, dit_file):
    _, path = dit_file
    (tmp_path / "file").write_text("x")
    result = run_cli("convert-dit", path, "--out", tmp_path / "file" / "sub")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = f"error: --out {tmp_path / 'file' / 'sub'} is not a folder ({tmp_path / 'file'} is a file)"
    assert message in result.stderr, result.stderr  # before the DiT is read


def test_ctrl_c_is_one_line_and_a_subcommand_names_itself(tmp_path, monkeypatch, capsys):
    import data_pipelines.shapes

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_pipelines.shapes, "write_shapes", interrupted)
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--count", "4"]) == 130
    assert capsys.readouterr().err.strip() == "pixart data shapes: interrupted; rerun the same command to go on"
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--count", "0"]) == 2
    assert capsys.readouterr().err.startswith("pixart data shapes: error: --count must be at least 1")


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:6123"),
     "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
    (torch.distributed.DistStoreError("wait timeout after 600000ms, keys: /default_pg/0//cpu//0"),
     "DistStoreError: wait timeout after 600000ms"),
    (torch.distributed.DistNetworkError("The client socket has failed to connect to node0:29500"),
     "DistNetworkError: The client socket has failed to connect"),
])
def test_a_peer_lost_outside_the_training_loop_is_one_line(monkeypatch, capsys, error, shown):
    """Set-up (the loader's first broadcast, the store's rendezvous) and teardown run outside the loop's guard:
    a communication failure there is still one line naming the rank, not gloo's traceback."""
    from pixart.cli import launch

    def lost(args):
        raise error

    monkeypatch.setattr(launch, "run", lost)
    monkeypatch.setenv("RANK", "1")  # the launcher's, when the group is not (or no longer) formed
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 1
    assert main(["launch", "recipe.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pixart launch: error: rank {rank}: another rank or node was lost or never joined ({shown}")
    assert err.endswith("rerun every node's command to resume from the last checkpoint") and "\n" not in err


def test_a_peer_lost_after_a_torchrun_restart_says_to_give_each_attempt_its_own_store(monkeypatch, capsys):
    """After a restart with torchrun's shared store, the old attempt's addresses refuse rank 0 too, outside
    set-up's own hint (pytorch/pytorch#135712): every rank says what fixes it, not to rerun into the same."""
    from pixart.cli import launch

    def refused(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:144] Connection refused")

    monkeypatch.setattr(launch, "run", refused)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "pixart")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    assert main(["launch", "recipe.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the process group could not form after a torchrun restart ([../third_party/gloo" in err
    assert err.endswith("set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment on every node, so that "
                        "each attempt meets in a store of its own") and "\n" not in err


def test_other_runtime_errors_still_show_their_traceback(monkeypatch):
    from pixart.cli import launch

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(launch, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["launch", "recipe.yaml"])


def test_sample_help_says_the_seed_and_size_units(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seed of the whole grid's noise" in text and "first column" not in text
    assert "LATENT height and width, not pixels: pixels / 8 with the SD VAE" in text


def test_sample_shows_progress_batches_the_grid_and_refuses_a_huge_latent(tiny_concept_setup, tmp_path, capsys):
    ckpt = tiny_concept_setup / "ckpt"  # input_size 8
    argv = ["sample", str(ckpt), "--prompt", "a red circle", "--prompt", "a blue star", "--columns", "3",
            "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "all.png")]) == 0  # default --batch 8: all 6 at once
    assert "3/3" in capsys.readouterr().err  # the sampler's steps, as a bar
    assert main([*argv, "--out", str(tmp_path / "chunks.png"), "--batch", "4"]) == 0
    assert (tmp_path / "all.png").read_bytes() == (tmp_path / "chunks.png").read_bytes()
    assert capsys.readouterr().err.count("3/3") >= 2  # two batches: 4 images, then 2
    assert main([*argv, "--out", str(tmp_path / "x.png"), "--size", "8", "33"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--size 8 33: a latent size (pixels / 8 with the SD VAE); this model's is 8 (64 px with "
                            "the SD VAE), give at most 32 per side")
    assert not (tmp_path / "x.png").exists()


def test_sample_warns_when_no_prompt_names_a_concept(tiny_concept_setup, tmp_path, capsys):
    from safetensors.torch import save_file

    from pixart.personalize.concept import Concept, pixart_identity

    ckpt = tiny_concept_setup / "ckpt"
    model = load_model(ckpt)
    identity = pixart_identity(model)
    concept = Concept("zorb", "circle", torch.zeros(2, 32), torch.zeros(32), torch.zeros(32), torch.zeros(32),
                      identity)
    concept.save(tmp_path / "zorb.safetensors")
    save_file({"C": torch.eye(32)}, tmp_path / "cov.safetensors", metadata={"base_model": identity})
    argv = ["sample", str(ckpt), "--concept", str(tmp_path / "zorb.safetensors"), "--covariance",
            str(tmp_path / "cov.safetensors"), "--steps", "1", "--out", str(tmp_path / "s.png")]
    assert main([*argv, "--prompt", "a photo of zorbs"]) == 0  # "zorbs" is not the word "zorb"
    out = capsys.readouterr().out
    assert "warning: no --prompt uses the concept word 'zorb' as a whole word; those concepts change nothing" in out
    assert main([*argv, "--prompt", "a photo of zorb", "--global-lock", "--columns", "3", "--batch", "2"]) == 0
    assert "warning" not in capsys.readouterr().out


def test_counts_out_of_range_are_argparses_usage_error(tmp_path, monkeypatch, capsys):
    """--columns 100000000 was the allocator's traceback, convert-dit --num-heads 0 a ZeroDivisionError."""
    monkeypatch.chdir(tmp_path)
    for argv, shown in ((["sample", "ckpt", "--prompt", "a", "--columns", "100000000"],
                         "argument --columns: 100000000 is not from 1 to 256"),
                        (["convert-dit", "dit.pt", "--out", "o", "--num-heads", "0"],
                         "argument --num-heads: 0 is not a positive integer"),
                        # a traceback from torch, and a checkpoint written with no caption tokens (a review's finds)
                        (["convert-dit", "dit.pt", "--out", "o", "--caption-channels", "-1"],
                         "argument --caption-channels: -1 is not a positive integer"),
                        (["convert-dit", "dit.pt", "--out", "o", "--max-length", "0"],
                         "argument --max-length: 0 is not a positive integer"),
                        (["convert-dit", "dit.pt", "--out", "o", "--t-ref", "1000"],
                         "argument --t-ref: 1000 is not a timestep from 0 to 999"),
                        (["extract-features", "s.tar", "--out", "o", "--max-length", "0"],
                         "argument --max-length: 0 is not a positive integer"),
                        (["data", "shapes", "--count", "8", "--out", "o", "--workers", "-3"],
                         "argument --workers: -3 is not a positive integer"),
                        (["data", "sam", "a.tar", "--out", "o", "--max-side", "-5"],
                         "argument --max-side: -5 is not a positive integer")):
        with pytest.raises(SystemExit, match="2"):
            main(argv)
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {shown}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, config", [("train", "stage1.yaml"), ("distill", "dmd.yaml")])
def test_a_run_dir_that_is_a_file_is_named_as_the_flag(tmp_path, capsys, command, config):
    """It was `[Errno 17] File exists: '...'`, from the first mkdir."""
    (tmp_path / "notes").write_text("mine")
    assert main([command, str(ROOT / "configs" / "demo" / config), "--run-dir", str(tmp_path / "notes")]) == 2
    assert capsys.readouterr().err.strip() == f"pixart {command}: error: --run-dir {tmp_path / 'notes'} is not a folder"
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("argv", [["sample", "ckpt", "--prompt", "a"],
                                  ["data", "shapes", "--out", "o", "--count", "1"]])
def test_a_seed_out_of_range_is_argparses_usage_error(argv, tmp_path, monkeypatch, capsys):
    """-1 was taken (and failed later, or not at all), a 23-digit seed was a traceback from torch or numpy."""
    monkeypatch.chdir(tmp_path)
    for value in ("-1", "99999999999999999999999", "x"):
        with pytest.raises(SystemExit, match="2"):
            main([*argv, "--seed", value])
        shown = f"{value} is not a seed from 0 to 2**63 - 1 (9223372036854775807)" if value != "x" else \
            "'x' is not an integer"
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: argument --seed: {shown}")
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_a_prompt_that_is_not_utf8_and_warns_of_an_empty_one(tiny_concept_setup, tmp_path, capsys):
    argv = ["sample", str(tiny_concept_setup / "ckpt"), "--steps", "1"]
    bad = b"\xff\xfe bad".decode("utf-8", "surrogateescape")  # what the shell's bytes become in sys.argv
    assert main([*argv, "--prompt", bad, "--out", str(tmp_path / "bad.png")]) == 2
    assert capsys.readouterr().err.strip() == \
        r"pixart sample: error: --prompt '\xff\xfe bad' is not valid UTF-8 text; give prompts in UTF-8"
    assert not (tmp_path / "bad.png").exists()
    assert main([*argv, "--prompt", "", "--prompt", "a red circle", "--out", str(tmp_path / "e.png")]) == 0
    assert "warning: --prompt '' is empty: its row is drawn from no words" in capsys.readouterr().out


def test_bench_says_a_resolution_must_be_positive(tmp_path, capsys):
    assert main(["bench", "--resolution", "0", "--out", str(tmp_path / "b.json")]) == 2
    assert capsys.readouterr().err.strip() == \
        "pixart bench: error: --resolution must be a positive multiple of 16 (16, 32, 48, ...), got 0"
