"""`score-aesthetic`: sidecar schema, kept fraction, skipped samples, and the LAION predictor on a tiny CLIP."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tolerance import approx, reordered

from data_pipelines.aesthetic import BACKGROUND_APPEAL, LaionScorer, aesthetic_head
from data_pipelines.shapes import write_shapes
from pixart.errors import PixArtError


def run_cli(*argv):
    """`pixart data score-aesthetic ...` in-process, through the real entry point."""
    from pixart.cli.main import main

    return main(["data", "score-aesthetic", *map(str, argv)])


def sidecar(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, 60, seed=0, resolution=32, shard_size=25)
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=24)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    head = aesthetic_head(24)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
    save_file(head.state_dict(), path / "aesthetic_head.safetensors")
    return path


def test_shapes_scores_are_the_metadata_and_kept_fraction_matches(tmp_path, shapes, capsys):
    assert run_cli(shapes, "--out", tmp_path / "s", "--threshold", 0.6) == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [".done", "aesthetic-summary.json"] + [f"shapes-00000{i}.aesthetic.jsonl" for i in range(3)]
    import webdataset as wds

    metas = {s["__key__"]: json.loads(s["json"])
             for s in wds.WebDataset(str(shapes / "shapes-{000000..000002}.tar"), shardshuffle=False)}
    truth = {k: round(m["aesthetic"] * BACKGROUND_APPEAL[m["background"]], 6) for k, m in metas.items()}  # as stored
    rows = [r for i in range(3) for r in sidecar(tmp_path / "s" / f"shapes-00000{i}.aesthetic.jsonl")]
    assert all(set(r) == {"__key__", "score"} for r in rows)
    assert {r["__key__"]: r["score"] for r in rows} == truth and len(rows) == 60
    summary = json.loads((tmp_path / "s" / "aesthetic-summary.json").read_text())
    kept = sum(v >= 0.6 for v in truth.values())
    assert summary["kept"] == kept and summary["samples"] == 60 and summary["skipped"] == 0
    assert summary["kept_fraction"] == pytest.approx(kept / 60) and 0 < kept < 60
    assert f"kept {kept} ({kept / 60:.1%})" in capsys.readouterr().out


def test_the_demos_stage_3_cut_keeps_clean_scenes_on_plain_backgrounds(tmp_path, shapes):
    """The demo's stage 3 keeps scores of at least 0.99: clean renders on a plain background, no damaged scene and
    no gradient or texture behind the object, however clean its render."""
    import webdataset as wds

    from data_pipelines.shapes import BACKGROUNDS

    assert set(BACKGROUND_APPEAL) == set(BACKGROUNDS)  # every background the world draws has its appeal
    assert run_cli(shapes, "--out", tmp_path / "s") == 0
    scores = {r["__key__"]: r["score"]
              for i in range(3) for r in sidecar(tmp_path / "s" / f"shapes-00000{i}.aesthetic.jsonl")}
    metas = {s["__key__"]: json.loads(s["json"])
             for s in wds.WebDataset(str(shapes / "shapes-{000000..000002}.tar"), shardshuffle=False)}
    plain_and_clean = {k for k, m in metas.items() if m["quality"] == "clean" and m["background"] == "plain"}
    assert {k for k, v in scores.items() if v >= 0.99} == plain_and_clean and plain_and_clean
    busy_and_clean = {k for k, m in metas.items() if m["quality"] == "clean" and m["background"] != "plain"}
    assert busy_and_clean and all(0.5 < scores[k] < 0.99 for k in busy_and_clean)


def _shard(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as tw:
        for s in samples:
            tw.write(s)


def _png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_laion_scorer_is_clip_embedding_then_mlp(tmp_path, clip):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    _shard(tmp_path / "web-000000.tar", [
        {"__key__": "a", "png": _png(0)}, {"__key__": "b", "jpg": b"not an image"}, {"__key__": "c", "png": _png(1)},
        {"__key__": "d", "txt": b"no image at all"}])
    assert run_cli(tmp_path / "web-000000.tar", "--out", tmp_path / "o", "--scorer", "laion", "--model", clip,
                   "--threshold", 0, "--batch-size", 3) == 0
    rows = sidecar(tmp_path / "o" / "web-000000.aesthetic.jsonl")
    assert [r["__key__"] for r in rows] == ["a", "c"]
    summary = json.loads((tmp_path / "o" / "aesthetic-summary.json").read_text())
    assert summary["skipped"] == 2 and summary["samples"] == 2 and summary["scorer"] == "laion"
    assert summary["skipped_reasons"] == {
        "bad image: UnidentifiedImageError: cannot identify image file <_io.BytesIO>": 1, "no image": 1}

    model, proc = CLIPVisionModelWithProjection.from_pretrained(clip).eval(), CLIPImageProcessor.from_pretrained(clip)
    head = aesthetic_head(24).eval()
    from safetensors.torch import load_file
    head.load_state_dict(load_file(clip / "aesthetic_head.safetensors"))
    with torch.no_grad():
        emb = model(**proc(images=[Image.open(io.BytesIO(_png(0)))], return_tensors="pt")).image_embeds
        want = head(emb / emb.norm(dim=-1, keepdim=True)).item()
    assert rows[0]["score"] == approx(want, reordered(want))  # scored in a batch of 3, here alone
    # a rerun reuses these scores only with the same head, weights and image processor
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(LaionScorer(clip).identity["model"])
    assert rows[0]["score"] != pytest.approx(rows[1]["score"])


def test_head_must_match_the_clip_projection(tmp_path, clip):
    from safetensors.torch import save_file

    save_file(aesthetic_head(768).state_dict(), tmp_path / "head.safetensors")
    with pytest.raises(PixArtError, match="takes 768-d embeddings"):
        LaionScorer(clip, tmp_path / "head.safetensors")
    torch.save(aesthetic_head(24).state_dict(), tmp_path / "head.pth")  # the released format
    assert LaionScorer(clip, tmp_path / "head.pth").head.layers[0].in_features == 24


def test_unreadable_metadata_and_broken_shards_are_counted(tmp_path, shapes, capsys):
    _shard(tmp_path / "odd-000000.tar", [
        {"__key__": "x", "json": b'{"aesthetic": 0.9}'}, {"__key__": "y", "json": b"{broken"},
        {"__key__": "z", "png": _png(2)}, {"__key__": "w", "json": b'{"aesthetic": 1.0, "background": "noise"}'}])
    data = (shapes / "shapes-000000.tar").read_bytes()
    (tmp_path / "cut-000000.tar").write_bytes(data[: len(data) // 2 + 100])  # mid-member, as a killed copy
    # 1: a shard is left for a rerun to retry
    assert run_cli(tmp_path / "odd-000000.tar", tmp_path / "cut-000000.tar", "--out", tmp_path / "o") == 1
    assert sidecar(tmp_path / "o" / "odd-000000.aesthetic.jsonl") == [{"__key__": "x", "score": 0.9}]
    summary = json.loads((tmp_path / "o" / "aesthetic-summary.json").read_text())
    assert summary["shards"]["odd-000000"]["skipped"] == 3
    assert summary["shards"]["odd-000000"]["skipped_reasons"] == {"bad json": 1, "no json": 1,
                                                                  "unknown background 'noise'": 1}
    assert summary["shards"]["cut-000000"]["error"] and 0 < summary["shards"]["cut-000000"]["samples"] < 25
    out = capsys.readouterr().out
    assert "3 skipped (1: bad json; 1: no json; 1: unknown background 'noise');" in out
    assert out.rstrip().endswith("shards damaged: cut-000000; rerun to retry")


def test_shapes_scorer_on_another_datasets_shards_is_one_error(tmp_path, shapes, capsys):
    """SA-1B shards (`data sam`'s json has no 'aesthetic'): not a run that scores nothing and writes empty
    sidecars, but an error naming the shard and the scorer to use, before anything is written for that shard."""
    meta = json.dumps({"width": 48, "height": 40, "image": {"image_id": 1, "width": 48, "height": 40,
                                                             "file_name": "sa_1.jpg"}, "annotations": []})
    _shard(tmp_path / "sam-000000.tar", [{"__key__": f"sa_{i}", "png": _png(i), "json": meta.encode()}
                                         for i in range(5)])
    assert run_cli(tmp_path / "sam-000000.tar", "--out", tmp_path / "o") == 2
    assert run_cli(shapes / "shapes-000000.tar", tmp_path / "sam-000000.tar", "--out", tmp_path / "o2") == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pixart")]  # not the bar's
    assert len(errs) == 2 and errs[0] == errs[1] == (
        "pixart data score-aesthetic: error: --scorer shapes reads the shapes world's metadata (KEY.json "
        f"'aesthetic'); the samples of {tmp_path / 'sam-000000.tar'} have none: use --scorer laion")
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == [".done", "shapes-000000.aesthetic.jsonl"]


def test_a_shard_of_which_nothing_could_be_read_gets_no_sidecar(tmp_path, shapes, capsys):
    """A failed pipe: command or an empty file: reported, and no empty sidecar (which would read as "no sample
    scored") is written; an earlier run's sidecar stays."""
    (tmp_path / "empty-000000.tar").write_bytes(b"")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "pipe-000000.aesthetic.jsonl").write_text('{"__key__": "a", "score": 0.7}\n')
    assert run_cli(shapes / "shapes-000000.tar", tmp_path / "empty-000000.tar", "pipe:false pipe-000000.tar",
                   "--out", tmp_path / "o") == 1
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".done", "aesthetic-summary.json", "pipe-000000.aesthetic.jsonl", "shapes-000000.aesthetic.jsonl"]
    assert [p.name for p in (tmp_path / "o" / ".done").iterdir()] == ["shapes-000000.aesthetic.json"]
    assert sidecar(tmp_path / "o" / "pipe-000000.aesthetic.jsonl") == [{"__key__": "a", "score": 0.7}]
    shards = json.loads((tmp_path / "o" / "aesthetic-summary.json").read_text())["shards"]
    for name in ("empty-000000", "pipe-000000"):
        assert shards[name]["error"].startswith("nothing could be read (") and shards[name]["samples"] == 0
    assert shards["shapes-000000"] == {"samples": 25, "kept": shards["shapes-000000"]["kept"], "skipped": 0,
                                       "skipped_reasons": {}, "error": None}


def test_a_rerun_skips_finished_shards_and_counts_a_new_threshold_from_their_sidecars(tmp_path, shapes, capsys,
                                                                                      monkeypatch):
    import shutil

    import data_pipelines.aesthetic as aesthetic

    src = tmp_path / "in"
    shutil.copytree(shapes, src)
    assert run_cli(src, "--out", tmp_path / "o", "--threshold", 0.6) == 0
    first = json.loads((tmp_path / "o" / "aesthetic-summary.json").read_text())
    scored = []
    monkeypatch.setattr(aesthetic, "_score_batch", lambda batch, *a: (scored.append(len(batch)), batch.clear()))
    assert run_cli(src, "--out", tmp_path / "o", "--threshold", 0.9) == 0  # nothing scored again
    assert not any(scored)
    again = json.loads((tmp_path / "o" / "aesthetic-summary.json").read_text())
    scores = [r["score"] for i in range(3) for r in sidecar(tmp_path / "o" / f"shapes-00000{i}.aesthetic.jsonl")]
    assert again["samples"] == first["samples"] == 60 and again["kept"] == sum(x >= 0.9 for x in scores)
    assert again["kept"] < first["kept"] == sum(x >= 0.6 for x in scores)
    assert "60 samples scored in 3 shards (3 of them by an earlier run)" in capsys.readouterr().out

    monkeypatch.undo()
    with open(src / "shapes-000001.tar", "ab") as f:  # the input changed: that shard is scored again
        f.write(b"\0" * 1024)
    (tmp_path / "o" / ".done" / "shapes-000002.aesthetic.json").write_text('{"inp')  # a torn record: again
    assert run_cli(src, "--out", tmp_path / "o") == 0
    assert "60 samples scored in 3 shards (1 of them by an earlier run)" in capsys.readouterr().out

    # another rule for backgrounds: every shard is scored again, none reused
    monkeypatch.setattr(aesthetic.ShapesScorer, "identity", {"scorer": "shapes", "background_appeal": {"plain": 1.0}})
    assert run_cli(src, "--out", tmp_path / "o") == 0
    assert "60 samples scored in 3 shards, 0 skipped;" in capsys.readouterr().out


class _Fixed:
    """A scorer giving every sample one score; `during` runs once, after the first batch is scored."""
    name, identity = "fixed", {"scorer": "fixed"}

    def __init__(self, score, during=None):
        self.score, self.during = score, during

    def __call__(self, samples):
        during, self.during = self.during, None
        if during:
            during()
        return [self.score] * len(samples)


def test_what_a_rerun_reuses_is_what_a_fresh_run_would_write(tmp_path, shapes, monkeypatch):
    import shutil

    import data_pipelines.aesthetic as aesthetic

    src = tmp_path / "in" / "shapes-000000.tar"
    src.parent.mkdir()
    shutil.copy(shapes / "shapes-000000.tar", src)
    # kept is counted from the score the sidecar keeps (rounded to 6 places), which the loader filters on
    s = aesthetic.score_shards([str(src)], tmp_path / "o", _Fixed(4.9999996), 5.0, batch_size=8)
    assert s.kept == 25 and aesthetic.score_shards([str(src)], tmp_path / "o", _Fixed(0.0), 5.0).kept == 25

    # the input's identity is taken before reading: a shard changed while it was scored is scored again
    grow = lambda: src.write_bytes(src.read_bytes() + b"\0" * 1024)  # noqa: E731
    aesthetic.score_shards([str(src)], tmp_path / "o2", _Fixed(1.0, during=grow), 0.5, batch_size=8)
    assert aesthetic.score_shards([str(src)], tmp_path / "o2", _Fixed(0.0), 0.5).kept == 0

    # a URL that answers no HEAD (a presigned GET-only one): scored, with no record to resume from
    def no_head(url):
        raise PixArtError(f"{url}: cannot reach the shard (HTTPError: HTTP Error 403)")

    monkeypatch.setattr(aesthetic, "input_record", no_head)
    assert aesthetic.score_shards([str(src)], tmp_path / "o3", _Fixed(1.0), 0.5).kept == 25
    assert not (tmp_path / "o3" / ".done").exists()


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert run_cli(tmp_path / "nothing-*.tar", "--out", tmp_path / "o") == 2
    assert run_cli(tmp_path, "--out", tmp_path / "o") == 2  # a folder without shards
    (tmp_path / "a.tar").write_bytes(b"")
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "o", "--scorer", "laion") == 2
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "o", "--scorer", "laion", "--model", tmp_path) == 2
    (tmp_path / "t5").mkdir()  # the text encoder's folder, given for the CLIP's: transformers' 40-line report before
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5", "d_model": 8}')
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "o", "--scorer", "laion", "--model", tmp_path / "t5") == 2
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "clip",')  # cut short
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "o", "--scorer", "laion", "--model", tmp_path / "t5") == 2
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "clip"}')  # and no preprocessor_config.json
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "o", "--scorer", "laion", "--model", tmp_path / "t5") == 2
    (tmp_path / "afile").write_text("mine")
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "afile") == 2
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "afile" / "sub") == 2
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "o", "--threshold", "nan") == 2  # kept nothing, said 0 %
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 10 and all(e.startswith("pixart data score-aesthetic: error:") for e in errs)
    assert errs[9].endswith("--threshold nan: give a finite score") and not (tmp_path / "o").exists()
    assert "needs --model" in errs[2] and "not a CLIP model folder" in errs[3]
    assert errs[4].endswith(f"--model {tmp_path / 't5'}: not a CLIP model (its config has model_type 't5', not "
                            "model_type 'clip')")
    assert errs[5].endswith(f"--model {tmp_path / 't5'}: its config.json is not a JSON object")
    assert errs[6].endswith(f"--model {tmp_path / 't5'}: no preprocessor_config.json (CLIP's image processor; the "
                            "hub's CLIP folders have it)")
    assert errs[7].endswith(f"--out {tmp_path / 'afile'} is not a folder")
    assert errs[8].endswith(f"--out {tmp_path / 'afile' / 'sub'} is not a folder ({tmp_path / 'afile'} is a file)")
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("device", ["gpu", "cuda:99"])
def test_a_device_torch_or_this_machine_lacks_is_one_line(tmp_path, clip, capsys, device):
    (tmp_path / "a.tar").write_bytes(b"")
    assert run_cli(tmp_path / "a.tar", "--out", tmp_path / "o", "--scorer", "laion", "--model", clip,
                   "--device", device) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("pixart data score-aesthetic: error: --device ") and device in err


def test_two_shards_of_one_name_are_refused(tmp_path, shapes, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "shapes-000000.tar").write_bytes((shapes / "shapes-000000.tar").read_bytes())
    assert run_cli(shapes / "shapes-000000.tar", tmp_path / "b", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "both named shapes-000000.tar" in err and str(tmp_path / "b" / "shapes-000000.tar") in err
    assert not (tmp_path / "o").exists()  # refused before any sidecar was written
