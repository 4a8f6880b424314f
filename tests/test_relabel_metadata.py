"""The shapes world's captioners, dense and short: complete, varied, deterministic per seed."""
import json
import re

import pytest

from data_pipelines.relabel.captioner import CaptionerConfig, build_captioner
from data_pipelines.relabel.metadata import MetadataCaptioner, ShortCaptioner
from data_pipelines.relabel.quality import check
from data_pipelines.shapes import ShapesConfig, make_sample

SIZE = {"small": r"\b(small|little)\b", "large": r"\b(large|big)\b"}
VERT = {"top": r"\b(top|upper)\b", "bottom": r"\b(bottom|lower)\b"}
BACKGROUND = {"plain": r"\b(plain|flat|solid)\b", "gradient": r"\bgradient\b", "texture": r"\btextur"}


@pytest.fixture(scope="module")
def samples():
    out = []
    for i in range(120):
        s = make_sample(0, i, ShapesConfig(resolution=32))
        out.append({"__key__": s["__key__"], "json": json.loads(s["json"]), "txt": s["txt"].decode()})
    return out


def _object_clause(caption: str, obj: dict, objects: list[dict]) -> list[str]:
    """The clauses naming this object (split at ';' or ',' and ' and ' where objects are listed); a piece naming no
    object belongs to the next one ("and in the upper right, a little pink star")."""
    parts = re.split(r";|: | and (?=an? |in |at |on |along )|, (?=an? )", caption.lower())
    clauses, before = [], ""
    for part in parts:
        if any(o["color"] in part and o["shape"] in part for o in objects):
            clauses.append(before + part)
            before = ""
        else:
            before += part + " "
    hits = [c for c in clauses if obj["color"] in c and obj["shape"] in c]
    assert hits, (caption, obj)
    return hits


def _position_pattern(word: str) -> str:
    return VERT.get(word, rf"\b{word}\b" if word != "center" else r"\b(center|middle)\b")


def test_names_everything(samples):
    cap = build_captioner(CaptionerConfig("metadata"))
    for s, text in zip(samples, cap.caption(samples), strict=True):
        meta, low = s["json"], text.lower()
        for o in meta["objects"]:
            assert o["color"] in low and o["shape"] in low
            assert re.search(SIZE[o["size"]], low), (text, o)
            for word in o["position"].split():
                assert re.search(_position_pattern(word), low), (text, o)
        assert re.search(BACKGROUND[meta["background"]], low), text
        if meta["quality"] == "clean":
            assert re.search(r"\b(clean|crisp)\b", low), text
        else:
            assert re.search(r"\b(degraded|damaged|noisy)\b", low), text
            assert re.search(r"\b(slightly|noticeably|heavily)\b", low), text


def test_position_and_size_stay_with_their_object(samples):
    """Each object's own clause carries its size and position words, not a neighbour's."""
    cap = MetadataCaptioner()
    for s, text in zip(samples[:60], cap.caption(samples[:60]), strict=True):
        objs = s["json"]["objects"]
        if len({(o["color"], o["shape"]) for o in objs}) < len(objs):
            continue  # two look-alike objects: no way to tell the clauses apart
        for o in objs:
            clause = " ".join(_object_clause(text, o, objs))
            assert re.search(SIZE[o["size"]], clause), (text, o)
            for word in o["position"].split():
                assert re.search(_position_pattern(word), clause), (text, o)


def test_deterministic_per_seed_and_varied(samples):
    a = MetadataCaptioner(CaptionerConfig("metadata", seed=0)).caption(samples)
    assert a == MetadataCaptioner(CaptionerConfig("metadata", seed=0)).caption(samples[::-1])[::-1]  # order-free
    b = MetadataCaptioner(CaptionerConfig("metadata", seed=1)).caption(samples)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 0.8 * len(a)
    assert MetadataCaptioner().caption(samples[:5], seed=1) == b[:5]  # a retry's seed
    openings = {" ".join(t.split()[:2]) for t in a}
    assert len(openings) >= 10, openings  # no single template
    assert len(set(a)) == len(a)


@pytest.mark.parametrize("meta, why", [
    (None, "no readable .json"), ({"background": "plain"}, "no objects"), ({"objects": []}, "no objects"),
    ({"objects": [{"shape": "circle", "color": "red"}]}, "lacks size, position"),
])
def test_unusable_metadata_raises(meta, why):
    with pytest.raises(ValueError, match=why):
        MetadataCaptioner().caption([{"__key__": "k", "json": meta}])


def test_short_names_each_object_in_a_few_words_and_nothing_else(samples):
    cap = build_captioner(CaptionerConfig("metadata-short"))
    assert isinstance(cap, ShortCaptioner) and cap.model_id != MetadataCaptioner.model_id
    for s, text in zip(samples, cap.caption(samples), strict=True):
        objs, low = s["json"]["objects"], text.lower()
        for o in objs:
            assert o["color"] in low and o["shape"] in low, (text, o)
            for word in o["position"].split():
                assert re.search(_position_pattern(word), low), (text, o)
        assert not re.search(r"background|plain|gradient|textur|clean|crisp|degraded|noisy|image|picture|scene|\.",
                             low), text
        assert len(text.split()) <= 9 * len(objs) and check(text) is None, text  # few words, a healthy caption


def test_short_is_deterministic_per_seed_varied_and_sometimes_sized(samples):
    a = ShortCaptioner(CaptionerConfig("metadata-short", seed=0)).caption(samples)
    assert a == ShortCaptioner(CaptionerConfig("metadata-short", seed=0)).caption(samples[::-1])[::-1]
    b = ShortCaptioner(CaptionerConfig("metadata-short", seed=1)).caption(samples)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 0.6 * len(a)
    forms = {":" if ":" in t else "," if "," in t else "a" if t.startswith(("a ", "an ")) else "-" for t in a}
    assert forms == {":", ",", "a", "-"}  # "top left: red circle", "red circle, top left", "a red circle in ..."
    sized = sum(bool(re.search(r"\b(small|little|large|big)\b", t)) for t in a)
    assert 0.15 * len(a) < sized < 0.85 * len(a)  # size sometimes, not always


def test_short_and_dense_captions_are_both_encoded_and_mixed(tmp_path):
    """The job writes `<shard>.metadata-short.jsonl` beside the dense file; extract-features encodes both
    sources; the loader's mix draws each."""
    from data_pipelines.features import FeatureConfig, extract_features
    from data_pipelines.relabel.job import RelabelConfig, relabel
    from data_pipelines.shapes import write_shapes
    from pixart.data.loader import Loader, LoaderConfig
    from pixart.encoders import make_tiny_t5

    shards = tmp_path / "shapes"
    write_shapes(shards, count=8, seed=0, resolution=32, shard_size=8)
    texts = {}
    for name in ("metadata", "metadata-short"):
        relabel(shards, shards, RelabelConfig(CaptionerConfig(name), decode_workers=0, progress=False),
                log=lambda m: None)
        rows = [json.loads(line) for line in (shards / f"shapes-000000.{name}.jsonl").read_text().splitlines()]
        texts[name] = {r["caption"] for r in rows if r["status"] == "ok"}
        assert len(texts[name]) == 8
    cfg = FeatureConfig(str(make_tiny_t5(tmp_path / "t5")), pixel_autoencoder=2, resolution=32,
                        captions=("metadata", "metadata-short"), dtype="fp32", batch_size=8, local_files_only=True)
    extract_features(shards, tmp_path / "f", cfg, progress=False)
    loader = Loader(LoaderConfig(str(tmp_path / "f"), batch_size=4, caption={"metadata": 0.5, "metadata-short": 0.5}))
    drawn = [c for _, batch in zip(range(8), loader, strict=False) for c in batch["captions"]]
    assert set(drawn) <= texts["metadata"] | texts["metadata-short"]
    assert set(drawn) & texts["metadata"] and set(drawn) & texts["metadata-short"]
