"""VLM captioners on tiny random models of the real classes: nonsense text, real pipeline."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.relabel.captioner import CaptionerConfig, build_captioner
from data_pipelines.relabel.tiny_vlm import TINY_VLM_NAMES, make_tiny_vlm
from data_pipelines.relabel.vlm import VLLM_HINT
from pixart.errors import PixArtError

SIZES = [(48, 32), (64, 64), (24, 40)]  # (w, h): Qwen and LLaVA-NeXT give each a different token count


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {name: str(make_tiny_vlm(name, root / name)) for name in TINY_VLM_NAMES}


@pytest.fixture(scope="module")
def captioners(tiny_dir):
    return {name: build_captioner(CaptionerConfig(name, model=path, dtype="fp32", max_new_tokens=16))
            for name, path in tiny_dir.items()}


def _samples():
    rng = np.random.default_rng(0)
    return [{"__key__": f"k{i}", "image": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))}
            for i, (w, h) in enumerate(SIZES)]


@pytest.mark.parametrize("name", TINY_VLM_NAMES)
def test_batch_is_deterministic_and_equals_singles(captioners, tiny_dir, name):
    cap, samples = captioners[name], _samples()
    assert (cap.name, cap.model_id) == (name, tiny_dir[name])
    batch = cap.caption(samples)
    assert len(batch) == 3 and all(isinstance(c, str) for c in batch)
    assert cap.caption(samples) == batch
    assert [cap.caption([s])[0] for s in samples] == batch  # padding does not leak into the text


@pytest.mark.parametrize("name", ["llava-next", "qwen2-vl", "qwen2.5-vl"])
def test_mixed_sizes_are_left_padded(captioners, name):
    """These families spend more image tokens on bigger images, so the batch above was padded."""
    cap = captioners[name]
    inputs = cap.processor(images=[s["image"] for s in _samples()], text=[cap.text] * 3, padding=True,
                           return_tensors="pt")
    mask = inputs["attention_mask"]
    assert (mask == 0).any() and (mask[:, -1] == 1).all()  # pads on the left only
    assert len(set(mask.sum(1).tolist())) == 3


def test_prompt_formats(captioners):
    assert captioners["llava"].text == (
        "USER: <image>\nDescribe this image and its style in a very detailed manner ASSISTANT:")
    assert captioners["llava-next"].text.startswith("[INST] <image>\n")  # the checkpoint's chat template
    assert captioners["qwen2-vl"].text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert captioners["qwen2-vl"].text.endswith("<|im_start|>assistant\n")
    assert captioners["blip2"].text.startswith("Question: Describe")


def test_bf16(tiny_dir):
    cap = build_captioner(CaptionerConfig("llava", model=tiny_dir["llava"], dtype="bf16", max_new_tokens=4))
    assert cap.model.dtype == torch.bfloat16
    assert len(cap.caption(_samples())) == 3


def _one_line_error(config) -> str:
    with pytest.raises(PixArtError) as e:
        build_captioner(config)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_model_path():
    msg = _one_line_error(CaptionerConfig("llava", model="/no/such/llava-1.5-7b"))
    assert "/no/such/llava-1.5-7b" in msg and "does not exist" in msg


def test_dir_without_checkpoint(tmp_path):
    assert str(tmp_path) in _one_line_error(CaptionerConfig("qwen2-vl", model=str(tmp_path)))


def test_checkpoint_of_another_family(tiny_dir):
    assert "'qwen2_vl'" in _one_line_error(CaptionerConfig("llava", model=tiny_dir["qwen2-vl"]))


def test_unknown_name():
    assert "unknown captioner 'gpt-9'" in _one_line_error(CaptionerConfig("gpt-9"))


def test_vllm_backend_without_vllm(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    msg = _one_line_error(CaptionerConfig("llava", model=tiny_dir["llava"], backend="vllm"))
    assert VLLM_HINT in msg


def test_the_retry_seed_samples_instead_of_repeating_greedy(tmp_path_factory):
    path = make_tiny_vlm("llava", tmp_path_factory.mktemp("retry") / "llava")
    cap = build_captioner(CaptionerConfig("llava", model=str(path), dtype="fp32", max_new_tokens=12))
    images = [{"image": Image.new("RGB", (40, 40), (200, 30, 30))}]
    greedy = cap.caption(images)
    assert cap.caption(images) == greedy
    retries = {cap.caption(images, seed=s)[0] for s in range(1, 5)}
    assert cap.caption(images, seed=1) == cap.caption(images, seed=1)  # seeded: reproducible
    assert retries - set(greedy)  # and not just the greedy text again
