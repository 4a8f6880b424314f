"""`pixart relabel`: outputs, bad input, OOM halving, quality retries, and SIGKILL-then-rerun."""
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_pipelines.relabel.captioner import CaptionerConfig
from data_pipelines.relabel.job import (
    Batcher,
    RelabelConfig,
    _loader,
    _lock,
    assign,
    caption_shard,
    input_path,
    paths,
    relabel,
)
from data_pipelines.relabel.metadata import MetadataCaptioner
from data_pipelines.relabel.quality import QualityConfig
from data_pipelines.shapes import ShapesConfig, make_sample, write_shapes
from pixart.errors import PixArtError

ROOT = Path(__file__).resolve().parents[1]


def slow_metadata(config):
    """The metadata captioner, slowed down so a test can kill the job half-way (`--captioner
    tests.test_relabel_job:slow_metadata`)."""
    class Slow(MetadataCaptioner):
        def caption(self, samples, seed=None):
            time.sleep(0.015 * len(samples))
            return super().caption(samples, seed)
    return Slow(config)


def _keys(tar) -> list[str]:
    with tarfile.open(tar) as t:
        return list(dict.fromkeys(m.name.split(".")[0] for m in t.getmembers()))


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """3 shapes shards x 16, a shard with a broken png / no json / bad json, and a truncated copy."""
    root = tmp_path_factory.mktemp("world")
    write_shapes(root / "shapes", count=48, seed=0, resolution=32, shard_size=16)
    good = [make_sample(5, i, ShapesConfig(32)) for i in range(4)]
    (root / "bad").mkdir()
    with wds.TarWriter(str(root / "bad" / "bad-000000.tar")) as w:
        w.write({**good[0], "__key__": "ok0"})
        w.write({**good[1], "__key__": "brokenpng", "png": b"\x89PNG broken"})
        w.write({k: v for k, v in {**good[2], "__key__": "nojson"}.items() if k != "json"})
        w.write({**good[3], "__key__": "badjson", "json": b"{not json"})
    data = (root / "shapes" / "shapes-000000.tar").read_bytes()
    (root / "bad" / "cut-000000.tar").write_bytes(data[:len(data) // 2])
    return root


def _cfg(name="metadata", **kw):
    return RelabelConfig(CaptionerConfig(name, device="cpu", dtype="fp32"), **{"batch_size": 4, "decode_workers": 1,
                                                                              "progress": False, **kw})


def test_outputs_bad_input_and_rerun(world, tmp_path):
    out, logs = tmp_path / "cap", []
    res = relabel([world / "shapes", world / "bad"], out, _cfg(), log=logs.append)
    for tar in sorted((world / "shapes").glob("*.tar")):
        rows = _rows(out / f"{tar.stem}.metadata.jsonl")
        assert [r["__key__"] for r in rows] == _keys(tar)  # every key once, input order
        assert all(r["status"] == "ok" and r["model"] == "shapes-metadata-v1" and r["attempts"] == 1 for r in rows)
    bad = {r["__key__"]: r for r in _rows(out / "bad-000000.metadata.jsonl")}
    assert bad["ok0"]["status"] == "ok" and bad["ok0"]["caption"]
    assert bad["brokenpng"]["status"] == "failed" and bad["brokenpng"]["reason"].startswith("bad image")
    assert bad["brokenpng"]["caption"] is None  # extract-features counts it as a missing caption
    for k in ("nojson", "badjson"):
        assert bad[k]["status"] == "failed" and "no usable metadata" in bad[k]["reason"]
    assert not (out / "cut-000000.metadata.jsonl").exists()  # damaged: not finished, its partial kept
    cut = _rows(paths(out, "cut-000000", "metadata")[1])
    assert 0 < len(cut) < 16 and all(r["status"] == "ok" for r in cut)
    s = json.loads((out / "metadata-summary.json").read_text())
    assert s["counts"] == {"done": 48 + 1, "failed": 3, "skipped": 0}
    assert s["failure_reasons"] == {"bad image": 1, "captioner error": 2}
    assert list(s["shards"]["damaged"]) == ["cut-000000"] and s["shards"]["finished"] == 4
    assert res.captioned == 48 + 4 + len(cut) and "captions/s" in logs[0]
    assert "1 shard damaged: cut-000000 (" in logs[0] and "rerun to retry" in logs[0]
    assert s["captions"]["distinct_mean"] > 5 * s["alt_text"]["distinct_mean"]
    assert [p.name for p in out.glob(".*.partial")] == [".cut-000000.metadata.jsonl.partial"]
    before = {p: p.read_bytes() for p in out.iterdir() if p.name != "metadata-summary.json"}
    again = relabel([world / "shapes", world / "bad"], out, _cfg(), log=logs.append)  # retries the damaged one
    assert [(r.name, r.skipped, r.done, bool(r.damaged)) for r in again.runs] == [("cut-000000", len(cut), 0, True)]
    assert {p: p.read_bytes() for p in out.iterdir() if p.name != "metadata-summary.json"} == before
    logs.clear()
    shapes = relabel(world / "shapes", out, _cfg(), log=logs.append)  # nothing to do: the summary is still written
    assert logs == ["all 3 shards already captioned by metadata; nothing to do"] and shapes.runs == []
    assert json.loads(shapes.summary_path.read_text())["shards"] == {"total": 3, "finished": 3, "damaged": {}}


def test_damaged_shard_is_retried_until_whole(world, tmp_path):
    """A cut tar stays unfinished; once the whole tar is back, a rerun finishes it with every key.
    --accept-damaged finishes a cut tar with what was read."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    whole = (world / "shapes" / "shapes-000000.tar").read_bytes()
    (src / "s-000000.tar").write_bytes(whole[:len(whole) // 2])
    first = relabel(src, out, _cfg(), log=lambda m: None)
    assert first.runs[0].damaged and not (out / "s-000000.metadata.jsonl").exists()
    (src / "s-000000.tar").write_bytes(whole)
    second = relabel(src, out, _cfg(), log=lambda m: None)
    assert second.runs[0].skipped == first.runs[0].done and not second.runs[0].damaged
    keys = [r["__key__"] for r in _rows(out / "s-000000.metadata.jsonl")]
    assert keys == _keys(world / "shapes" / "shapes-000000.tar")
    assert not list(out.glob(".*.partial")) and second.summary["shards"]["damaged"] == {}
    (src / "s-000000.tar").write_bytes(whole[:len(whole) // 2])
    kept = relabel(src, tmp_path / "kept", _cfg(accept_damaged=True), log=lambda m: None)
    assert 0 < len(_rows(tmp_path / "kept" / "s-000000.metadata.jsonl")) < 16
    assert list(kept.summary["shards"]["damaged_kept"]) == ["s-000000"]


def test_the_command_exits_1_while_a_damaged_shard_is_left_to_retry(world, tmp_path):
    """So that `pixart relabel ... && pixart extract-features ...` stops at a job that is not finished."""
    from pixart.cli.main import main

    src = tmp_path / "in"
    src.mkdir()
    whole = (world / "shapes" / "shapes-000000.tar").read_bytes()
    (src / "s-000000.tar").write_bytes(whole[:len(whole) // 2])
    argv = ["relabel", str(src), "--out", str(tmp_path / "out"), "--captioner", "metadata"]
    assert main(argv) == 1
    assert main([*argv[:3], str(tmp_path / "kept"), *argv[4:], "--accept-damaged"]) == 0  # finished as read
    (src / "s-000000.tar").write_bytes(whole)
    assert main(argv) == 0


def crashing(config):
    """A captioner that raises on every call."""
    class Crash(MetadataCaptioner):
        def caption(self, samples, seed=None):
            raise ValueError("weights are garbage")
    return Crash(config)


def test_a_crashing_captioner_stops_the_job(world, tmp_path):
    with pytest.raises(PixArtError, match="raised on every sample.*ValueError: weights are garbage"):
        relabel(world / "shapes", tmp_path, _cfg("tests.test_relabel_job:crashing"), log=lambda m: None)
    assert not list(tmp_path.glob("*.jsonl"))  # nothing marked failed for good; a rerun retries
    fake = FakeVLM(limit=0)  # out of memory even at batch 1
    with pytest.raises(PixArtError, match="out of memory at batch 1"):
        Batcher(fake, 2, log=lambda m: None)([{"__key__": "a"}, {"__key__": "b"}])


def unloadable(config):
    """A captioner whose model cannot be loaded (its files there, but not a model)."""
    raise PixArtError("--model m: cannot load (not a LLaVA checkpoint)")


def test_a_model_that_will_not_load_leaves_no_output_folder(world, tmp_path, monkeypatch):
    out = tmp_path / "captions"
    with pytest.raises(PixArtError, match="cannot load"):
        relabel(world / "shapes", out, _cfg("tests.test_relabel_job:unloadable"), log=lambda m: None)
    assert not out.exists()

    def busy(self):
        raise OSError(16, "Device or resource busy", str(self))

    monkeypatch.setattr(Path, "rmdir", busy)  # the cleanup fails: the error that brought us there is still said
    with pytest.raises(PixArtError, match="cannot load"):
        relabel(world / "shapes", out, _cfg("tests.test_relabel_job:unloadable"), log=lambda m: None)


def picky(config):
    """A captioner whose model ("--model") will not load ("unloadable"), or fails every sample ("crash"), or works."""
    if config.model == "unloadable":
        raise PixArtError(f"--model {config.model}: cannot load")
    fake = crashing(config) if config.model == "crash" else FakeVLM()
    fake.model_id = config.model
    return fake


def _picky(model, **kw):
    return RelabelConfig(CaptionerConfig("tests.test_relabel_job:picky", model=model),
                         **{"batch_size": 4, "decode_workers": 0, "progress": False, **kw})


def test_a_run_that_failed_before_its_first_line_binds_nothing(world, tmp_path):
    """A model that would not load, or a captioner failing every sample, leaves no job record, input record or
    partial that refuses the fixed rerun; nor does a record that a kill left before the first line."""
    out, shard = tmp_path / "captions", world / "shapes" / "shapes-000000.tar"
    relabel(shard, out, _cfg(), log=lambda m: None)  # other captions there
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for model, said in (("unloadable", "cannot load"), ("crash", "raised on every sample")):
        with pytest.raises(PixArtError, match=said):
            relabel(shard, out, _picky(model), log=lambda m: None)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        with pytest.raises(PixArtError, match=said):
            relabel(shard, tmp_path / "new", _picky(model), log=lambda m: None)
        assert not (tmp_path / "new").exists()
    (out / "picky-job.json").write_text(json.dumps({"captioner": "tests.test_relabel_job:picky", "model": "killed"}))
    res = relabel(shard, out, _picky("good"), log=lambda m: None)  # the kill's record binds nothing either
    assert [(r.done, r.failed) for r in res.runs] == [(16, 0)]
    assert json.loads((out / "picky-job.json").read_text())["model"] == "good"
    with pytest.raises(PixArtError, match=r"made with --model 'good' \(this run: 'other'\)"):  # now it binds
        relabel(shard, out, _picky("other"), log=lambda m: None)


def not_a_captioner(config):
    """A plain function, where a captioner object belongs."""
    return lambda samples: ["a caption"] * len(samples)


def half_a_captioner(config):
    class Half:
        name, prompt = "half", None
    return Half()


def broken_constructor(config):
    raise ValueError("no GPU here")


def numbers(config):
    """A captioner whose captions are not strings."""
    fake = FakeVLM()
    fake.caption = lambda samples, seed=None: [7] * len(samples)
    return fake


def test_a_custom_captioner_is_checked(world, tmp_path):
    """`module:callable` must build an object with model_id, prompt and caption(); each lack, or a constructor
    that raises, is one line and leaves nothing; a caption that is not a str fails its sample, with the reason."""
    for name, said in (("ROOT", "ROOT is a PosixPath, not a callable that builds a captioner from a CaptionerConfig"),
                       ("not_a_captioner", "returned a function, not a captioner: it lacks model_id, prompt, "
                        "a method caption(samples) (a captioner has model_id, prompt and caption(samples))"),
                       ("half_a_captioner", "returned a Half, not a captioner: it lacks model_id, a method "
                        "caption(samples) ("),
                       ("broken_constructor", "its constructor failed: ValueError: no GPU here")):
        with pytest.raises(PixArtError, match="^" + re.escape(f"--captioner tests.test_relabel_job:{name}: {said}")):
            relabel(world / "shapes", tmp_path / "out", _cfg(f"tests.test_relabel_job:{name}"), log=lambda m: None)
        assert not (tmp_path / "out").exists()
    res = relabel(world / "shapes" / "shapes-000000.tar", tmp_path / "out", _cfg("tests.test_relabel_job:numbers"),
                  log=lambda m: None)
    rows = _rows(tmp_path / "out" / "shapes-000000.numbers.jsonl")
    assert len(rows) == 16 and res.summary["failure_reasons"] == {"captioner error": 16}
    assert all(r["status"] == "failed" and r["reason"] == "captioner error: the caption is not a str (int)"
               for r in rows)


def test_decode_in_workers_or_not_same_bytes(world, tmp_path):
    for n in (0, 2):
        relabel(world / "shapes", tmp_path / str(n), _cfg(decode_workers=n), log=lambda m: None)
    files = sorted(f.name for f in (tmp_path / "0").glob("*.jsonl"))
    assert len(files) == 3 and files == sorted(f.name for f in (tmp_path / "2").glob("*.jsonl"))  # one per shard
    for name in files:
        assert (tmp_path / "0" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_assignment_is_disjoint_and_complete():
    for n, world_size, workers in ((10, 1, 1), (10, 2, 3), (5, 3, 2), (1, 2, 2)):
        got = [i for r in range(world_size) for mine in assign(n, r, world_size, workers) for i in mine]
        assert sorted(got) == list(range(n))


def test_clear_errors_before_work(world, tmp_path):
    out = tmp_path / "never"
    for name, model, match in (("gpt-9", None, "unknown captioner 'gpt-9'"),
                               ("llava", None, "needs --model"),
                               ("llava", str(tmp_path / "no" / "such" / "model"), "does not exist locally"),
                               ("no_such_module:make", None, "no_such_module")):
        cfg = RelabelConfig(CaptionerConfig(name, model=model), progress=False)
        with pytest.raises(PixArtError, match=match):
            relabel(world / "shapes", out, cfg)
    assert not out.exists()


def test_bad_counts_and_flags_the_captioner_ignores_are_one_line(world, tmp_path, capsys):
    """Counts out of range, and --model/--prompt for a captioner that reads neither, are refused before any work."""
    from pixart.cli.main import main

    base = ["relabel", str(world / "shapes"), "--out", str(tmp_path / "o"), "--captioner"]
    for flag, value, said in (("--max-words", "0", "0 is not a positive integer"),
                              ("--max-new-tokens", "0", "0 is not a positive integer"),
                              ("--batch-size", "0", "0 is not a positive integer"),
                              ("--workers", "-1", "-1 is not a positive integer"),
                              ("--decode-workers", "-1", "-1 is not 0 or more")):
        with pytest.raises(SystemExit) as e:
            main([*base, "metadata", flag, value])
        assert e.value.code == 2 and capsys.readouterr().err.endswith(f"error: argument {flag}: {said}\n")
    for flag, value in (("--model", "x"), ("--prompt", ""), ("--image-size", "64")):
        assert main([*base, "metadata-short", flag, value]) == 2
        assert capsys.readouterr().err == \
            f"pixart relabel: error: {flag} applies to VLM and custom captioners, not metadata-short\n"
    with pytest.raises(PixArtError, match=r"^--max-words -3: must be positive$"):
        relabel(world / "shapes", tmp_path / "o", _cfg(quality=QualityConfig(max_words=-3)), log=lambda m: None)
    with pytest.raises(PixArtError, match=r"^--max-new-tokens 0: must be positive$"):
        CaptionerConfig("llava", model="m", max_new_tokens=0)
    assert not (tmp_path / "o").exists()


def test_an_out_that_is_a_file_is_one_line(world, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(PixArtError, match=r"^--out \S*afile is not a folder$"):
        relabel(world / "shapes", tmp_path / "afile", _cfg(), log=lambda m: None)
    with pytest.raises(PixArtError, match=r"^--out \S*afile/sub is not a folder \(\S*afile is a file\)$"):
        relabel(world / "shapes", tmp_path / "afile" / "sub", _cfg(), log=lambda m: None)


def test_a_finished_file_that_is_not_utf8_is_one_line_before_work(world, tmp_path):
    """A finished file is never rewritten: a first line that cannot be read is named before any work."""
    out = tmp_path / "out"
    relabel(world / "shapes", out, _cfg(), log=lambda m: None)
    path = out / "shapes-000000.metadata.jsonl"
    data = path.read_bytes()
    at = data.index(b'"caption": "') + 14
    path.write_bytes(data[:at] + b"\xe9" + data[at:])
    (out / "shapes-000002.metadata.jsonl").unlink()  # work left
    with pytest.raises(PixArtError, match=r"^" + re.escape(f"{path}:1: not UTF-8 (invalid continuation byte at byte")):
        relabel(world / "shapes", out, _cfg(), log=lambda m: None)
    assert not (out / "shapes-000002.metadata.jsonl").exists()


def test_a_raw_sa1b_tar_is_refused(tmp_path):
    """SA-1B tars as Meta ships them: members shuffled, a key's jpg and json apart, the json in SA-1B's published
    schema (facebookresearch/segment-anything, README.md, "Dataset"; tests/test_sam.py has real annotations).
    Refused in one line (not half the images "bad image"), with nothing left behind."""
    import io
    import random

    from PIL import Image

    members = []
    for i in range(30):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (8 * i, 20, 30)).save(buf, format="JPEG")
        image = {"image_id": i, "width": 40, "height": 30, "file_name": f"sa_{i}.jpg"}
        members += [(f"sa_{i}.jpg", buf.getvalue()),
                    (f"sa_{i}.json", json.dumps({"image": image, "annotations": []}).encode())]
    random.Random(0).shuffle(members)
    (tmp_path / "sa").mkdir()
    tar = tmp_path / "sa" / "sa_000000.tar"
    with tarfile.open(tar, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    for decode in (0, 2):
        with pytest.raises(PixArtError, match=r"^" + re.escape(f"{tar}: the members of ") + r"sa_\d+ are not "
                           r"adjacent \(a raw SA-1B tar\?\): run `pixart data sam` first$"):
            relabel(tar, tmp_path / "out", _picky("good", decode_workers=decode), log=lambda m: None)
        assert not (tmp_path / "out").exists()


def test_lines_name_a_local_model_as_the_record_does(world, tmp_path, monkeypatch):
    """A local model given by a relative path: every line names it by its absolute path, as the job record does,
    from whichever folder the job runs."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    out, shards = tmp_path / "out", [world / "shapes" / f"shapes-00000{i}.tar" for i in (0, 1)]
    relabel(shards[0], out, _picky("ckpt"), log=lambda m: None)
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = relabel(shards, out, _picky("../ckpt"), log=lambda m: None)
    assert [r.name for r in res.runs] == ["shapes-000001"]
    want = str(tmp_path / "ckpt")
    assert json.loads((out / "picky-job.json").read_text())["model"] == want and res.summary["model"] == want
    for f in ("shapes-000000", "shapes-000001"):
        assert {r["model"] for r in _rows(out / f"{f}.picky.jsonl")} == {want}


def dying(config):
    """The metadata captioner, slow; the first worker to caption is killed (-9, as by the OOM killer)."""
    class Dying(MetadataCaptioner):
        def caption(self, samples, seed=None):
            with contextlib.suppress(FileExistsError):
                Path(config.model).touch(exist_ok=False)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.1 * len(samples))
            return super().caption(samples, seed)
    return Dying(config)


def test_a_killed_worker_stops_the_job_at_once(world, tmp_path):
    """A job worker killed while the other works: one line, at once (the other's shard is not finished, and it
    writes no more); a rerun finishes every shard."""
    out, died = tmp_path / "out", tmp_path / "died"
    cfg = RelabelConfig(CaptionerConfig("tests.test_relabel_job:dying", model=str(died)), batch_size=4, workers=2,
                        decode_workers=0, progress=False)
    with pytest.raises(PixArtError, match=r"^relabel worker [01] died \(exit code -9, killed: out of memory\?\); "
                       r"finished captions are kept, rerun to resume$"):
        relabel(world / "shapes", out, cfg, log=lambda m: None)
    assert not list(out.glob("*.jsonl")) and died.exists()
    n = _lines(out)
    time.sleep(0.5)
    assert _lines(out) == n  # the other worker was stopped
    res = relabel(world / "shapes", out, cfg, log=lambda m: None)
    assert res.summary["shards"]["finished"] == 3 and res.summary["counts"]["done"] == 48 - res.summary["counts"][
        "skipped"]
    assert [r["__key__"] for r in _rows(out / "shapes-000001.dying.jsonl")] == _keys(world / "shapes" /
                                                                                      "shapes-000001.tar")


class FakeVLM:
    """Raises CUDA OOM above `limit` samples; refuses or loops on chosen keys (on every seed, or only
    the first attempt)."""
    name, model_id, prompt = "fake", "fake-vlm", "describe"

    def __init__(self, limit=99, refuse_once=(), loop=()):
        self.limit, self.refuse_once, self.loop, self.calls = limit, set(refuse_once), set(loop), []

    def caption(self, samples, seed=None):
        self.calls.append((len(samples), seed))
        if len(samples) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out = []
        for s in samples:
            if s["__key__"] in self.loop:
                out.append("a red circle, " * 30)
            elif s["__key__"] in self.refuse_once and seed is None:
                out.append("I'm sorry, but I cannot describe images.")
            else:
                out.append(f"an image with the key {s['__key__']} and seed {seed}")
        return out


def test_oom_halves_the_batch(world, tmp_path):
    fake, logs = FakeVLM(limit=2), []
    tar = sorted((world / "shapes").glob("*.tar"))[0]
    batcher = Batcher(fake, 8, log=logs.append)
    run = caption_shard(str(tar), tar.stem, tmp_path, fake, batcher, _cfg("fake", batch_size=8))
    rows = _rows(paths(tmp_path, tar.stem, "fake")[0])
    assert run.done == 16 and [r["__key__"] for r in rows] == _keys(tar) and all(r["status"] == "ok" for r in rows)
    assert batcher.size == 2 and logs == ["out of memory at batch 8; retrying with batch 4",
                                          "out of memory at batch 4; retrying with batch 2"]
    assert max(n for n, _ in fake.calls[3:]) == 2  # stays halved


def test_quality_retry_then_failed(world, tmp_path):
    tar = sorted((world / "shapes").glob("*.tar"))[1]
    keys = _keys(tar)
    fake = FakeVLM(refuse_once=keys[:2], loop=keys[2:3])
    caption_shard(str(tar), tar.stem, tmp_path, fake, Batcher(fake, 4), _cfg("fake"))
    rows = {r["__key__"]: r for r in _rows(paths(tmp_path, tar.stem, "fake")[0])}
    for k in keys[:2]:  # refused, then fine with seed + 1
        assert rows[k]["status"] == "ok" and rows[k]["attempts"] == 2 and rows[k]["caption"].endswith("seed 1")
    loop = rows[keys[2]]
    assert loop["status"] == "failed" and loop["reason"].startswith("repetition") and loop["attempts"] == 2
    assert loop["caption"] is None and loop["rejected"].startswith("a red circle")
    assert rows[keys[3]] == {"__key__": keys[3], "caption": f"an image with the key {keys[3]} and seed None",
                             "model": "fake-vlm", "prompt": "describe", "status": "ok", "attempts": 1}


def test_resume_from_torn_partial(world, tmp_path):
    tar = sorted((world / "shapes").glob("*.tar"))[2]
    keys = _keys(tar)
    final, partial, stats = paths(tmp_path, tar.stem, "metadata")
    kept = {"__key__": keys[5], "caption": "kept from the killed run", "model": "shapes-metadata-v1", "prompt": None,
            "status": "ok", "attempts": 1}
    partial.write_text(json.dumps(kept) + "\n" + '{"__key__": "' + keys[6] + '", "capt')  # torn mid-line
    # the temp files of a writer killed on another host of a shared filesystem, in each of the shard's atomic writes
    stale = [tmp_path / f".{n}.tmp-otherhost-1-abc" for n in (final.name, stats.name, input_path(tmp_path, tar.stem,
                                                                                                  "metadata").name)]
    for p in stale:
        p.write_text("half")
    cap = MetadataCaptioner()
    run = caption_shard(str(tar), tar.stem, tmp_path, cap, Batcher(cap, 4), _cfg())
    rows = _rows(final)
    assert [r["__key__"] for r in rows] == keys and rows[5] == kept and run.skipped == 1 and run.done == 15
    assert not partial.exists() and not any(p.exists() for p in stale)


def test_a_run_removes_the_temp_files_of_this_hosts_killed_runs(world, tmp_path):
    """A SIGKILL during the job record's or summary's atomic write leaves a temp file that no shard's lock covers."""
    host = socket.gethostname()
    tmp_path.mkdir(exist_ok=True)
    dead = [tmp_path / f".{n}.tmp-{host}-999999999-abc" for n in ("metadata-job.json", "metadata-summary.json")]
    for p in dead:
        p.write_text("half")  # no process has that pid
    relabel(world / "shapes", tmp_path, _cfg())
    assert not any(p.exists() for p in dead)


def _pixart(*argv):
    return [sys.executable, "-m", "pixart", "relabel", *map(str, argv)]


def _lines(out: Path) -> int:
    """Lines written so far, read while the job writes: a `.partial` renamed into place between the listing and
    the read is counted under its final name on the next poll."""
    def count(p: Path) -> int:
        try:
            return p.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    return sum(count(p) for p in out.glob("*.jsonl")) + sum(count(p) for p in out.glob(".*.partial"))


def test_sigkill_at_any_moment_then_rerun(tmp_path):
    """Kill -9 the CLI three times at growing amounts of work (once with 2 job workers), rerun:
    every key exactly once, valid lines, the same bytes as an uninterrupted run."""
    shards = tmp_path / "shards"
    write_shapes(shards, count=96, seed=3, resolution=32, shard_size=24)
    keys = sorted(k for t in shards.glob("*.tar") for k in _keys(t))
    ref = tmp_path / "ref"
    relabel(shards, ref, _cfg(), log=lambda m: None)
    out = tmp_path / "out"
    args = ["--captioner", "tests.test_relabel_job:slow_metadata", "--out", out, "--batch-size", 4, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    kills = []
    for at, workers in ((6, 1), (34, 2), (60, 1)):  # the last one 0.5 s before the end: room for a slow poll
        p = subprocess.Popen(_pixart(shards, *args, "--workers", workers, "--decode-workers", 1), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while _lines(out) < at and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert p.poll() is None, p.stderr.read().decode()[-2000:]
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append(_lines(out))
        time.sleep(0.3)  # job workers notice within 0.1 s
        n = _lines(out)
        time.sleep(0.2)
        assert _lines(out) == n  # no orphaned worker goes on writing
    assert kills[0] < 96 and kills[-1] < 96, kills
    resumed = sum(p.read_bytes().count(b"\n") for p in out.glob(".*.partial")  # a kill between the final
                  if not (out / p.name[1:].removesuffix(".partial")).exists())  # write and the unlink leaves both
    done = subprocess.run(_pixart(shards, *args), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"skipped {resumed} (already captioned)" in done.stdout, done.stdout
    rows = [r for f in sorted(out.glob("*.jsonl")) for r in _rows(f)]
    got = [r["__key__"] for r in rows]
    assert sorted(got) == keys and len(set(got)) == len(got) == 96  # every key, exactly once
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.tmp-*"))
    for f in ref.glob("*.jsonl"):
        assert (out / f.name.replace(".metadata.", ".slow_metadata.")).read_bytes() == f.read_bytes()
    print(f"killed after {kills} of 96 lines; rerun resumed {resumed}; 96 keys, 0 duplicates")


def test_ranks_split_the_shards(world, tmp_path):
    logs = []
    a = relabel(world / "shapes", tmp_path, _cfg(), rank=0, world=2, log=logs.append)
    assert sorted(r.name for r in a.runs) == ["shapes-000000", "shapes-000002"]
    relabel(world / "shapes", tmp_path, _cfg(), rank=0, world=2, log=logs.append)
    assert logs[-1] == "rank 0: its shards are already captioned by metadata (1 of other ranks remain); nothing to do"
    b = relabel(world / "shapes", tmp_path, _cfg(), rank=1, world=2, log=logs.append)
    assert [r.name for r in b.runs] == ["shapes-000001"] and b.summary["shards"]["finished"] == 3


def test_extract_features_reads_the_output(world, tmp_path):
    """failed lines have caption null: extract-features counts them as samples without that caption."""
    from data_pipelines.features_encode import read_captions

    relabel(world / "bad", tmp_path, _cfg(), log=lambda m: None)
    caps = read_captions(str(tmp_path / "bad-000000.metadata.jsonl"))
    assert caps["brokenpng"] is None and caps["ok0"].strip()


def test_another_model_into_the_same_output_is_refused(tmp_path):
    """An older job's output (no settings record): the lines' model and prompt are checked."""
    from data_pipelines.relabel.captioner import CaptionerConfig
    from data_pipelines.relabel.job import RelabelConfig, relabel
    from data_pipelines.shapes import write_shapes
    from pixart.errors import PixArtError

    write_shapes(tmp_path / "s", count=12, seed=0, resolution=32, shard_size=3)
    first = str(tmp_path / "s" / "shapes-00000{0..1}.tar")  # caption half the shards
    relabel(first, tmp_path / "o", RelabelConfig(CaptionerConfig("metadata"), progress=False), log=lambda m: None)
    for line in (tmp_path / "o" / "shapes-000000.metadata.jsonl").read_text().splitlines():
        assert json.loads(line)["model"] == "shapes-metadata-v1"
    (tmp_path / "o" / "metadata-job.json").unlink()  # as an older version left it
    path = tmp_path / "o" / "shapes-000000.metadata.jsonl"
    path.write_text(path.read_text().replace("shapes-metadata-v1", "another-model"))
    with pytest.raises(PixArtError, match="holds metadata captions by model 'another-model'.*use another --out"):
        relabel(tmp_path / "s", tmp_path / "o", RelabelConfig(CaptionerConfig("metadata"), progress=False),
                log=lambda m: None)


def _decode_workers() -> set[int]:
    """Live (not zombie) DataLoader worker processes on this machine."""
    got = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().strip() == "pt_data_worker" \
                    and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                got.add(int(d.name))
        except OSError:
            pass
    return got


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_job_worker_killed_while_its_loader_starts(world, tmp_path):
    """Kill -9 a job worker 0-5 ms after it starts its shard's decode processes: none outlives it
    (holding the partial's lock), and a rerun finishes the shard."""
    import random
    import threading

    tar = sorted((world / "shapes").glob("*.tar"))[0]
    before = _decode_workers()
    for _ in range(40):  # the race hit ~3 in 40 before the fix (reviewer's repro)
        pid = os.fork()
        if pid == 0:
            try:
                with open(paths(tmp_path, tar.stem, "metadata")[1], "a+b") as f:
                    _lock(f, "partial", print)  # as caption_shard holds it while its loader runs
                    threading.Timer(random.uniform(0, 0.005), os.kill, (os.getpid(), signal.SIGKILL)).start()
                    iter(_loader(str(tar), frozenset(), None, _cfg(decode_workers=2)))
                    time.sleep(5)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    deadline = time.time() + 10
    while _decode_workers() - before and time.time() < deadline:
        time.sleep(0.05)
    assert not _decode_workers() - before
    def hung(signum, frame):
        raise TimeoutError("caption_shard waited 120 s: a lock nobody releases")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)  # a lock nobody releases would hang here
    try:
        cap = MetadataCaptioner()
        caption_shard(str(tar), tar.stem, tmp_path, cap, Batcher(cap, 4), _cfg(decode_workers=2))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [r["__key__"] for r in _rows(paths(tmp_path, tar.stem, "metadata")[0])] == _keys(tar)


def test_replaced_input_shards_are_captioned_again(tmp_path):
    """Input shards regenerated under the same names (other images): their finished and partial outputs are
    forgotten and captioned again; a copy with the same bytes (a new mtime) is not."""
    import shutil

    write_shapes(tmp_path / "a", count=32, seed=0, resolution=32, shard_size=16)
    write_shapes(tmp_path / "b", count=32, seed=1, resolution=32, shard_size=16)
    src, out, logs = tmp_path / "in", tmp_path / "out", []
    src.mkdir()
    shutil.copy(tmp_path / "a" / "shapes-000000.tar", src)
    data = (tmp_path / "a" / "shapes-000001.tar").read_bytes()
    (src / "shapes-000001.tar").write_bytes(data[:len(data) // 2])  # damaged: left as a partial
    relabel(src, out, _cfg(), log=logs.append)
    assert (out / ".shapes-000000.metadata.input.json").exists() and paths(out, "shapes-000001", "metadata")[1].exists()
    for name in ("shapes-000000", "shapes-000001"):
        shutil.copy(tmp_path / "b" / f"{name}.tar", src)  # as `pixart data shapes --overwrite` leaves them
    logs.clear()
    again = relabel(src, out, _cfg(), log=logs.append)
    assert sorted((r.name, r.skipped, r.done) for r in again.runs) == [("shapes-000000", 0, 16),
                                                                       ("shapes-000001", 0, 16)]
    assert f"shapes-000000: its input {src / 'shapes-000000.tar'} changed since it was captioned; " \
           "captioning it again" in logs
    relabel(tmp_path / "b", tmp_path / "ref", _cfg(), log=lambda m: None)
    for name in ("shapes-000000", "shapes-000001"):
        want = (tmp_path / "ref" / f"{name}.metadata.jsonl").read_bytes()
        assert (out / f"{name}.metadata.jsonl").read_bytes() == want
    data = (src / "shapes-000000.tar").read_bytes()
    (src / "shapes-000000.tar").unlink()
    (src / "shapes-000000.tar").write_bytes(data)  # same bytes, new mtime: recognised by its sha256
    logs.clear()
    assert relabel(src, out, _cfg(), log=logs.append).runs == []
    assert logs == ["all 2 shards already captioned by metadata; nothing to do"]


def test_a_shorter_copy_of_an_input_is_left_as_it_is(tmp_path):
    """A local input now shorter than when it was captioned (a cp or download in progress): its finished captions
    and its partial are kept, and it is not captioned this run, not even with --accept-damaged; the whole copy
    then resumes (the cut one) or is recognised (the finished one)."""
    write_shapes(tmp_path / "a", count=32, seed=0, resolution=32, shard_size=16)
    src, out, logs = tmp_path / "in", tmp_path / "out", []
    src.mkdir()
    whole = {n: (tmp_path / "a" / f"{n}.tar").read_bytes() for n in ("shapes-000000", "shapes-000001")}
    (src / "shapes-000000.tar").write_bytes(whole["shapes-000000"])
    (src / "shapes-000001.tar").write_bytes(whole["shapes-000001"][:len(whole["shapes-000001"]) // 2])  # cut
    relabel(src, out, _cfg(decode_workers=0), log=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if "summary" not in p.name}
    for name, data in whole.items():
        (src / f"{name}.tar").write_bytes(data[:len(data) // 4])  # copies in progress
    res = relabel(src, out, _cfg(decode_workers=0, accept_damaged=True), log=logs.append)
    assert res.runs == [] and {p.name: p.read_bytes() for p in out.iterdir() if "summary" not in p.name} == before
    assert logs == [f"{n}: its input is shorter than when it was captioned (a copy in progress?); left as it is"
                    for n in whole] + ["rank 0: nothing to do now; 1 of its unfinished shards left as they are"]
    for name, data in whole.items():
        (src / f"{name}.tar").write_bytes(data)  # the copies, done
    res = relabel(src, out, _cfg(decode_workers=0), log=lambda m: None)
    assert [(r.name, r.skipped > 0, r.done > 0, r.damaged) for r in res.runs] == [("shapes-000001", True, True, "")]
    assert (out / "shapes-000000.metadata.jsonl").read_bytes() == before["shapes-000000.metadata.jsonl"]


def test_a_shard_captioned_anew_while_waiting_for_its_lock_is_kept(tmp_path, monkeypatch):
    """Two runs see the input regenerated: the one that waited for the partial's lock finds the record the other
    wrote captioning the new input, and deletes nothing."""
    import data_pipelines.relabel.job as job

    write_shapes(tmp_path / "a", count=16, seed=0, resolution=32, shard_size=16)
    url, out = str(tmp_path / "a" / "shapes-000000.tar"), tmp_path / "out"
    relabel(url, out, _cfg(decode_workers=0), log=lambda m: None)
    write_shapes(tmp_path / "b", count=16, seed=1, resolution=32, shard_size=16)
    os.replace(tmp_path / "b" / "shapes-000000.tar", url)  # regenerated: other images
    lock = job._lock

    def other_run_first(f, name, log):  # the other run forgot the shard and captioned the new input meanwhile
        job.input_path(out, "shapes-000000", "metadata").write_text(json.dumps(job.input_record(url)))
        lock(f, name, log)

    monkeypatch.setattr(job, "_lock", other_run_first)
    logs = []
    assert job._forget_if_input_changed(out, "shapes-000000", url, "metadata", logs.append)
    assert (out / "shapes-000000.metadata.jsonl").exists() and logs == []
    assert not paths(out, "shapes-000000", "metadata")[1].exists()


def counting(config):
    """A VLM-like captioner whose captions depend on its settings; counts its loads."""
    counting.loads += 1
    fake = FakeVLM()
    fake.model_id, fake.prompt = config.model, config.prompt
    return fake


counting.loads = 0


def test_the_settings_that_shape_captions_are_checked_on_every_run(world, tmp_path, monkeypatch):
    """Recorded once; any run (also one with nothing left to do) with other settings is refused before a model
    loads; a local model given by another path to the same folder, or another dtype, resumes."""
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    out, name = tmp_path / "out", "tests.test_relabel_job:counting"

    def cfg(max_words=150, **kw):
        return RelabelConfig(CaptionerConfig(name, **{"model": str(tmp_path / "ckpt"), "prompt": "describe", **kw}),
                             batch_size=4, decode_workers=0, progress=False, quality=QualityConfig(max_words))

    relabel([world / "shapes" / "shapes-000000.tar", world / "bad" / "cut-000000.tar"], out, cfg(),
            log=lambda m: None)
    record = json.loads((out / "counting-job.json").read_text())
    assert record == {"captioner": name, "model": str(tmp_path / "ckpt"), "prompt": "describe", "max_new_tokens": 160,
                      "image_size": None, "seed": 0, "min_pixels": None, "max_pixels": None, "max_words": 150}
    before, loads = {p.name: p.read_bytes() for p in out.iterdir()}, counting.loads
    for kw, said in (({"seed": 1}, "--seed 0 (this run: 1)"),
                     ({"prompt": "say"}, "--prompt 'describe' (this run: 'say')"),
                     ({"max_new_tokens": 32, "image_size": 64},
                      "--max-new-tokens 160 (this run: 32), --image-size None (this run: 64)"),
                     ({"model": "org/other"}, f"--model '{tmp_path / 'ckpt'}' (this run: 'org/other')"),
                     ({"max_words": 40}, "--max-words 150 (this run: 40)")):
        with pytest.raises(PixArtError, match=r"^" + re.escape(f"{out}: its counting captions were made with {said}; ")
                           + r".*use another --out$"):
            relabel(world / "shapes" / "shapes-000000.tar", out, cfg(**kw), log=lambda m: None)
    assert counting.loads == loads and {p.name: p.read_bytes() for p in out.iterdir()} == before
    resumed = relabel([world / "shapes" / "shapes-000000.tar", world / "bad" / "cut-000000.tar"], out,
                      cfg(model="ckpt", dtype="fp32"), log=lambda m: None)  # the same folder, relative, and
    # another dtype (its default follows the device: a GPU job resumed on a CPU node): its partial resumes
    assert [(r.name, r.skipped > 0, r.done) for r in resumed.runs] == [("cut-000000", True, 0)]


@contextlib.contextmanager
def serve(folder):
    """`folder` over HTTP on 127.0.0.1: (base URL, handler class); `handler.head = 403` refuses HEAD requests, as
    a presigned GET-only URL does."""
    class Handler(SimpleHTTPRequestHandler):
        head = None

        def do_HEAD(self):
            if Handler.head:
                return self.send_error(Handler.head)
            return super().do_HEAD()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    finally:
        httpd.shutdown()


def test_inputs_of_which_nothing_could_be_read_are_reported_and_never_finished(world, tmp_path):
    """An HTTP 404, a failed pipe: command, an empty file: no error before work (nothing is checked up front),
    but never finished, not even with --accept-damaged (which the summary then does not offer)."""
    (tmp_path / "empty-000000.tar").write_bytes(b"")
    logs = []
    with serve(world / "shapes") as (base, _):
        unreadable = [f"{base}/nope-000000.tar", "pipe:false pipe-000000.tar", str(tmp_path / "empty-000000.tar")]
        res = relabel([world / "shapes" / "shapes-000000.tar", *unreadable], tmp_path / "out",
                      _cfg(accept_damaged=True, decode_workers=0), log=logs.append)
    damaged = {r.name: r.damaged for r in res.runs if r.damaged}
    assert sorted(damaged) == ["empty-000000", "nope-000000", "pipe-000000"]
    assert all(why.startswith("nothing could be read (") for why in damaged.values())
    assert "nothing could be read (HTTPError: HTTP Error 404" in damaged["nope-000000"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["shapes-000000.metadata.jsonl"]
    assert res.summary["shards"]["finished"] == 1 and "rerun to retry\n" in logs[-1]  # no --accept-damaged hint
    cap = MetadataCaptioner()
    run = caption_shard(str(tmp_path / "vanished-000000.tar"), "vanished-000000", tmp_path, cap, Batcher(cap, 4),
                        _cfg(accept_damaged=True))
    assert run.damaged.startswith("nothing could be read (FileNotFoundError")
    assert not paths(tmp_path, "vanished-000000", "metadata")[0].exists()


def test_only_urls_with_a_record_are_checked_and_a_failed_check_keeps_them(world, tmp_path):
    """A URL's identity is read when its captioning starts, and on later runs only for shards with a record;
    one that cannot be read then (a presigned URL refusing HEAD, a 5xx) leaves the shard as it is, with a line."""
    logs = []
    with serve(world / "shapes") as (base, handler):
        relabel(f"{base}/shapes-000001.tar", tmp_path / "web", _cfg(decode_workers=0), log=lambda m: None)
        assert [r["__key__"] for r in _rows(tmp_path / "web" / "shapes-000001.metadata.jsonl")] == \
            _keys(world / "shapes" / "shapes-000001.tar")
        assert json.loads((tmp_path / "web" / ".shapes-000001.metadata.input.json").read_text())["url"] == \
            f"{base}/shapes-000001.tar"
        handler.head = 403
        before = {p.name: p.read_bytes() for p in (tmp_path / "web").iterdir()}
        res = relabel(f"{base}/shapes-000001.tar", tmp_path / "web", _cfg(decode_workers=0), log=logs.append)
        assert res.runs == [] and logs[0].startswith(
            f"shapes-000001: cannot check its input ({base}/shapes-000001.tar: cannot reach the shard (HTTPError: "
            "HTTP Error 403") and logs[0].endswith("; left as it is")
        assert {p.name: p.read_bytes() for p in (tmp_path / "web").iterdir() if "summary" not in p.name} == \
            {k: v for k, v in before.items() if "summary" not in k}
        got = relabel(f"{base}/shapes-000002.tar", tmp_path / "get-only", _cfg(decode_workers=0), log=lambda m: None)
        assert [(r.name, r.done, r.damaged) for r in got.runs] == [("shapes-000002", 16, "")]


def test_a_bad_rank_is_one_line(world, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(PixArtError, match=r"^RANK='x' is not an integer$"):
        relabel(world / "shapes", tmp_path / "out", _cfg(), log=lambda m: None)
