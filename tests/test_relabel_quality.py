"""Caption quality checks and the job summary's statistics."""
import json

import pytest

from data_pipelines.relabel.metadata import MetadataCaptioner
from data_pipelines.relabel.quality import QualityConfig, check
from data_pipelines.relabel.stats import ShardStats, TextStats, content_words, summarize
from data_pipelines.shapes import ShapesConfig, make_sample


@pytest.mark.parametrize("text, kind", [
    ("", "empty"), ("   \n", "empty"), ("... 123 !!", "empty"), (None, "empty"),
    ("I'm sorry, but I cannot describe this image.", "refusal"),
    ("I\u2019m sorry, I can\u2019t help with that.", "refusal"),
    ("As an AI language model, I do not see images.", "refusal"),
    ("I cannot determine what is shown.", "refusal"),
    ("a red circle a red circle a red circle a red circle a red circle", "repetition"),
    ("the the the the the image", "repetition"),
    ("A photo of a dog on grass. " + "The dog is happy and " * 6, "repetition"),  # a loop after a good start
    ("red red blue red red green red red", "repetition"),  # one word is most of the text
    ("The image shows a person. I'm sorry, but I can't identify people.", "refusal"),
    (" ".join(f"word{i}" for i in range(151)), "over-long"),
])
def test_rejects(text, kind):
    reason = check(text)
    assert reason is not None and reason.split(":")[0] == kind, reason


@pytest.mark.parametrize("text", [
    "A red circle in the top left corner and a small blue square at the bottom, on a plain gray background.",
    "A close-up photograph of a golden retriever lying on green grass in the sun; the fur is soft, "
    "the background is blurred, and the colors are warm and natural.",
    "The sign in the background says: I cannot wait for summer! A woman stands beside it.",  # not a refusal
    "very very good",
    "a cat, a dog, a bird, a cow, a horse, a sheep, a goat, a pig, a duck",  # 'a' is half, not more
])
def test_accepts(text):
    assert check(text) is None


def test_max_words_setting():
    text = " ".join(["word"] * 3 + [f"w{i}" for i in range(20)])
    assert check(text, QualityConfig(max_words=10)).startswith("over-long: 23 words > 10")
    assert check(text, QualityConfig(max_words=30)) is None


def test_dense_captions_all_pass():
    """The metadata captioner's 300 captions never trip the detectors."""
    cap = MetadataCaptioner()
    samples = []
    for i in range(300):
        s = make_sample(1, i, ShapesConfig(resolution=32))
        samples.append({"__key__": s["__key__"], "json": json.loads(s["json"])})
    bad = [(t, check(t)) for t in cap.caption(samples) if check(t)]
    assert not bad, bad[:3]


def test_content_words_and_histograms():
    assert content_words("A red circle and a RED square, on the left.") == {"red", "circle", "square", "left"}
    s = TextStats()
    for t in ("one", "one two", "one two three", "a b c d e f g h"):
        s.add(t)
    out = s.summary()
    assert out["texts"] == 4 and out["words_mean"] == 3.5 and out["words_median"] == 2.5
    merged = TextStats.from_json(json.loads(json.dumps(s.to_json()))).merge(s)
    assert merged.summary()["words_median"] == 2.5 and merged.count == 8


def test_summary_side_by_side():
    a = ShardStats()
    a.add_row({"status": "ok", "caption": "a large red circle at the top"})
    a.add_row({"status": "failed", "reason": "refusal: 'i cannot'"})
    a.alt_text.add("shapes")
    a.alt_text.add("a red thing")
    s = summarize("metadata", "m", None, {"x": ShardStats.from_json(a.to_json()), "y": None},
                  {"done": 1, "failed": 1, "skipped": 0, "seconds": 2.0})
    assert s["counts"] == {"done": 1, "failed": 1, "skipped": 0} and s["failure_reasons"] == {"refusal": 1}
    assert s["shards"] == {"total": 2, "finished": 1, "damaged": {}}
    assert s["captions"]["distinct_mean"] == 4 and s["alt_text"]["distinct_mean"] == 1.5
    assert s["this_run"]["captions_per_s"] == 1.0
