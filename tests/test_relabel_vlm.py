"""VLM captioners on tiny random models of the real classes: nonsense text, real pipeline."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.relabel.captioner import PIXART_PROMPT, CaptionerConfig, build_captioner
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
    assert captioners["qwen2-vl"].text.startswith(  # the default system turn first, as Qwen2-VL's own template
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>")
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


# ---------------------------------------------------------------- issue 18: prompts and preprocessing per checkpoint

Q = "What is shown in this image?"
DOCUMENTED = {  # each variant's prompt for Q as its docs give it (sources: docs/relabel.md, "Prompt formats")
    "llava-1.5": f"USER: <image>\n{Q} ASSISTANT:",
    "llava-interleave": f"<|im_start|>user\n<image>\n{Q}<|im_end|>\n<|im_start|>assistant\n",
    "llava-next-mistral": f"[INST] <image>\n{Q} [/INST]",
    "llava-next-vicuna": "A chat between a curious human and an artificial intelligence assistant. The assistant "
                         "gives helpful, detailed, and polite answers to the human's questions. "
                         f"USER: <image>\n{Q} ASSISTANT:",
    "llava-next-34b": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n"
                      f"{Q}<|im_end|><|im_start|>assistant\n",
    "llava-next-llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
                         "assistant. You are able to understand the visual content that the user provides, and "
                         "assist the user with a variety of tasks using natural language.<|eot_id|>"
                         f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llava-next-qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                       f"{Q}<|im_end|>\n<|im_start|>assistant\n",
    "qwen-vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               f"<|vision_start|><|image_pad|><|vision_end|>{Q}<|im_end|>\n<|im_start|>assistant\n",
    "blip2": f"Question: {Q} Answer:",
}


def _turn(prompt: str) -> list[dict]:
    content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
    return [{"role": "user", "content": content}]


def test_fallback_formats_are_the_documented_ones():
    from data_pipelines.relabel.vlm import FORMATS

    assert {k: FORMATS[k].render(Q) for k in DOCUMENTED} == DOCUMENTED and set(FORMATS) == set(DOCUMENTED)


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    path = make_tiny_vlm("llava-interleave", tmp_path_factory.mktemp("il") / "llava-interleave-qwen-0.5b-hf")
    return build_captioner(CaptionerConfig("llava", model=str(path), dtype="fp32", max_new_tokens=8))


@pytest.mark.parametrize("name, variant", [("llava", "llava-1.5"), ("llava-interleave", "llava-interleave"),
                                           ("llava-next", "llava-next-mistral"), ("qwen2-vl", "qwen-vl"),
                                           ("qwen2.5-vl", "qwen-vl")])
def test_prompt_is_what_the_checkpoint_template_renders(captioners, interleave, name, variant):
    """The tiny checkpoints carry the real ones' chat templates (data_pipelines/relabel/tiny_vlm.py);
    what we send is their rendering, with PixArt's prompt and with none, and equals the fallback format
    the checkpoint's variant would get without a template."""
    from data_pipelines.relabel.vlm import FAMILIES, FORMATS, prompt_text

    cap = interleave if name == "llava-interleave" else captioners[name]
    assert cap.variant == variant
    render = cap.processor.apply_chat_template
    assert (cap.prompt, cap.prompt_source) == (PIXART_PROMPT, "processor chat template")
    assert cap.text == render(_turn(PIXART_PROMPT), add_generation_prompt=True, tokenize=False)
    assert cap.text == FORMATS[cap.variant].render(PIXART_PROMPT)
    bare, _ = prompt_text(cap.processor, FAMILIES[cap.name], cap.variant, "")  # --prompt "": the image alone
    assert bare == render(_turn(""), add_generation_prompt=True, tokenize=False) == FORMATS[cap.variant].render("")
    assert "Describe" not in bare


def test_empty_prompt_means_no_prompt(tiny_dir, captioners):
    blip = build_captioner(CaptionerConfig("blip2", model=tiny_dir["blip2"], dtype="fp32", max_new_tokens=6, prompt=""))
    assert (blip.prompt, blip.text) == ("", None)  # plain captioning: BLIP-2 gets the image only
    inputs = blip.inputs([s["image"] for s in _samples()])
    assert "input_ids" not in inputs and set(inputs) == {"pixel_values"}
    assert len(blip.caption(_samples())) == 3
    assert captioners["blip2"].text == f"Question: {PIXART_PROMPT} Answer:"  # None: the default prompt, VQA-style
    llava = build_captioner(CaptionerConfig("llava", model=tiny_dir["llava"], dtype="fp32", prompt=""))
    assert llava.text == "USER: <image>\nASSISTANT:"  # a user turn with just the image


def test_cli_tells_absent_prompt_from_empty():
    from pixart.cli.main import build_parser
    from pixart.cli.relabel import captioner_config

    base = ["relabel", "shards", "--captioner", "blip2", "--out", "o"]
    assert captioner_config(build_parser().parse_args(base), "cpu").prompt is None
    assert captioner_config(build_parser().parse_args([*base, "--prompt", ""]), "cpu").prompt == ""


def test_cli_size_errors_are_one_line(tmp_path, capsys):
    from pixart.cli.main import main

    code = main(["relabel", str(tmp_path), "--captioner", "llava", "--out", str(tmp_path / "o"), "--max-pixels", "9"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "pixart relabel: error: --max-pixels applies to qwen2-vl and qwen2.5-vl only, not llava\n"


def test_tokenizer_template_comes_second(tmp_path, captioners):
    """Qwen2-VL-2B-Instruct ships its template in tokenizer_config.json: a checkpoint whose processor has
    none renders with the tokenizer's, and gets the same text as from the processor's."""
    import json

    from data_pipelines.relabel.tiny_vlm import CHAT_TEMPLATES

    path = make_tiny_vlm("qwen2-vl", tmp_path / "qwen", chat_template=False)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATES["qwen2-vl"]}))
    cap = build_captioner(CaptionerConfig("qwen2-vl", model=str(path), dtype="fp32", max_new_tokens=4))
    assert cap.processor.chat_template is None and cap.prompt_source == "tokenizer chat template"
    assert cap.text == captioners["qwen2-vl"].text


def test_a_tokenizer_template_bos_is_not_doubled(captioners):
    import copy

    from data_pipelines.relabel.vlm import FAMILIES, prompt_text

    proc = copy.deepcopy(captioners["llava-next"].processor)
    proc.chat_template = None
    proc.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]"
                                    "{% endfor %}")  # Mistral-Instruct style: the template writes <s> itself
    text, source = prompt_text(proc, FAMILIES["llava-next"], "llava-next-mistral", Q)
    assert (text, source) == (DOCUMENTED["llava-next-mistral"], "tokenizer chat template")
    ids = proc.tokenizer(text).input_ids
    assert ids.count(proc.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("tiny, folder, variant", [
    ("llava", "llava-1.5-7b-hf", "llava-1.5"),
    ("llava-interleave", "llava-interleave-qwen-0.5b-hf", "llava-interleave"),
    ("llava-next", "llava-v1.6-mistral-7b-hf", "llava-next-mistral")])
def test_checkpoint_without_any_template_gets_its_variant_format(tmp_path, tiny, folder, variant):
    name = tiny.replace("-interleave", "")
    path = make_tiny_vlm(tiny, tmp_path / folder, chat_template=False)
    cap = build_captioner(CaptionerConfig(name, model=str(path), dtype="fp32", max_new_tokens=4, prompt=Q))
    assert cap.processor.chat_template is None and cap.processor.tokenizer.chat_template is None
    assert (cap.variant, cap.prompt_source, cap.text) == (variant, f"{variant} format", DOCUMENTED[variant])
    assert len(cap.caption(_samples()[:1])) == 1


def test_variant_from_name_and_config():
    import transformers as tf

    from data_pipelines.relabel.vlm import FAMILIES, prompt_variant

    def next_cfg(text_type, base=""):
        cfg = tf.LlavaNextConfig(text_config={"model_type": text_type})
        cfg.text_config._name_or_path = base
        return cfg

    cases = [("llava-next", "llava-hf/llava-v1.6-mistral-7b-hf", next_cfg("mistral"), "llava-next-mistral"),
             ("llava-next", "/ckpt/llava-v1.6-vicuna-13b-hf", next_cfg("llama", "lmsys/vicuna-13b-v1.5"),
              "llava-next-vicuna"),
             ("llava-next", "/ckpt/llava-v1.6-34b-hf", next_cfg("llama", "NousResearch/Nous-Hermes-2-Yi-34B"),
              "llava-next-34b"),
             ("llava-next", "/ckpt/mine", next_cfg("llama", "meta-llama/Meta-Llama-3-8B-Instruct"),
              "llava-next-llama3"),
             ("llava-next", "llava-hf/llava-next-72b-hf", next_cfg("qwen2"), "llava-next-qwen"),
             ("llava", "llava-hf/llava-interleave-qwen-7b-hf",
              tf.LlavaConfig(text_config={"model_type": "qwen2"}), "llava-interleave"),
             ("llava", "llava-hf/llava-1.5-7b-hf", tf.LlavaConfig(), "llava-1.5")]
    assert [prompt_variant(FAMILIES[f], m, c) for f, m, c, _ in cases] == [v for *_, v in cases]


def test_llava_15_pads_to_square_instead_of_cropping(captioners):
    """A 2:3 image with a red top band and a blue bottom band: center-cropping would drop both."""
    img = np.zeros((48, 32, 3), np.uint8)
    img[:, :] = (0, 255, 0)
    img[:8], img[-8:] = (255, 0, 0), (0, 0, 255)
    cap = captioners["llava"]
    assert cap.processor.image_processor.do_pad
    px = cap.inputs([Image.fromarray(img)])["pixel_values"][0]  # (3, 32, 32), CLIP-normalized
    assert px.shape == (3, 32, 32)
    assert px[0, 0, 16] > 1.5 and px[2, -1, 16] > 1.5  # the red top and blue bottom survive
    assert px[:, 16, 0].abs().max() < 0.05 and px[:, 16, -1].abs().max() < 0.05  # padded with the mean color


def _qwen_tokens(image_processor, image) -> int:
    thw = image_processor(image, return_tensors="pt")["image_grid_thw"][0]
    return int(thw.prod()) // image_processor.merge_size ** 2


def test_qwen_visual_tokens_by_image_size():
    """Qwen2-VL-7B-Instruct's preprocessor_config.json (min_pixels 3136, max_pixels 12845056, 14 px
    patches merged 2x2): a raw 1500x2250 SA-1B image costs 4,320 visual tokens, thumbnailed to 1024
    (683x1024) 888; the default max_pixels bounds any image to 1024."""
    import transformers as tf

    from data_pipelines.relabel.vlm import _pixel_bounds, bound_pixels, thumbnail

    ip = tf.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)
    raw = Image.new("RGB", (1500, 2250), (90, 120, 60))
    small = thumbnail(raw, 1024)
    assert small.size == (683, 1024)
    assert (_qwen_tokens(ip, raw), _qwen_tokens(ip, small)) == (4320, 888)
    bound_pixels(ip, _pixel_bounds(CaptionerConfig("qwen2-vl")))
    assert _qwen_tokens(ip, raw) == 1014 and _qwen_tokens(ip, small) == 888
    bound_pixels(ip, _pixel_bounds(CaptionerConfig("qwen2-vl", min_pixels=28 * 28, max_pixels=256 * 28 * 28)))
    assert _qwen_tokens(ip, raw) <= 256


def test_pixel_and_size_settings(tiny_dir, captioners):
    from data_pipelines.relabel.captioner import QWEN_MAX_PIXELS

    assert {n: c.image_size for n, c in captioners.items()} == {  # each checkpoint's working resolution
        "llava": 32, "llava-next": 64, "qwen2-vl": 1024, "qwen2.5-vl": 1024, "blip2": 32}
    assert captioners["qwen2-vl"].processor.image_processor.size.get("longest_edge") == QWEN_MAX_PIXELS
    cap = build_captioner(CaptionerConfig("qwen2-vl", model=tiny_dir["qwen2-vl"], dtype="fp32", image_size=48,
                                          min_pixels=300, max_pixels=2000))
    assert cap.image_size == 48
    assert dict(cap.processor.image_processor.size) == {"shortest_edge": 300, "longest_edge": 2000}
    for kw, msg in (({"max_pixels": 100}, "--max-pixels applies to qwen2-vl and qwen2.5-vl only, not llava"),
                    ({"image_size": -1}, "--image-size -1: use a positive number of pixels, or 0 for full size"),):
        with pytest.raises(PixArtError, match=msg):
            CaptionerConfig("llava", **kw)
    with pytest.raises(PixArtError, match="--min-pixels 5000 is above --max-pixels 4000"):
        CaptionerConfig("qwen2-vl", min_pixels=5000, max_pixels=4000)


def test_the_job_thumbnails_before_the_processor(captioners):
    import io

    from data_pipelines.relabel.job import _decode

    buf = io.BytesIO()
    Image.new("RGB", (1500, 2250), (10, 20, 30)).save(buf, format="PNG")
    sample = {"__key__": "big", "png": buf.getvalue()}
    assert _decode(sample, captioners["qwen2-vl"].image_size)["image"].size == (683, 1024)
    assert _decode(sample, captioners["llava"].image_size)["image"].size == (21, 32)


def test_summary_reports_visual_tokens_and_speed(tmp_path, tiny_dir):
    import json
    from collections import Counter

    from data_pipelines.relabel.job import RelabelConfig, relabel
    from data_pipelines.shapes import write_shapes
    from pixart.data.tars import decode_image, iter_samples

    write_shapes(tmp_path / "s", count=6, seed=0, resolution=32, shard_size=3)
    logs = []
    cfg = RelabelConfig(CaptionerConfig("qwen2-vl", model=tiny_dir["qwen2-vl"], dtype="fp32", max_new_tokens=6),
                        batch_size=4, decode_workers=0, progress=False)
    res = relabel(tmp_path / "s", tmp_path / "out", cfg, log=logs.append)
    vlm = json.loads(res.summary_path.read_text())["vlm"]
    assert vlm["family"] == "qwen2-vl" and vlm["captions_per_s"] > 0
    cap, want = build_captioner(cfg.captioner), Counter()  # each image's tokens, counted apart
    for tar in sorted((tmp_path / "s").glob("*.tar")):
        for sample in iter_samples(str(tar)):
            want.update(cap.count_visual_tokens(cap.inputs([decode_image(sample)])))
    t = vlm["visual_tokens_per_image"]
    assert (t["images"], t["min"], t["max"]) == (6, min(want), max(want)) and 4 <= t["min"] < t["max"]
    assert t["mean"] == round(sum(k * v for k, v in want.items()) / 6, 2)
    assert f"qwen2-vl: {t['mean']:g} visual tokens per image (min {t['min']}, max {t['max']})" in logs[-1]


def test_a_model_of_another_family_binds_no_folder(tmp_path, tiny_dir, monkeypatch):
    """The reviewer's repro: llava given a Qwen2-VL checkpoint fails to load and leaves nothing of llava in a folder
    of other captions, so the right checkpoint then captions there; its lines name it as the job record does (a
    local path absolute), though given relative."""
    import json
    from pathlib import Path

    from data_pipelines.relabel.job import RelabelConfig, relabel
    from data_pipelines.shapes import write_shapes

    write_shapes(tmp_path / "s", count=4, seed=0, resolution=32, shard_size=2)
    out = tmp_path / "captions"
    relabel(tmp_path / "s", out, RelabelConfig(CaptionerConfig("metadata"), decode_workers=0, progress=False),
            log=lambda m: None)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.chdir(Path(tiny_dir["llava"]).parent)

    def cfg(model):
        return RelabelConfig(CaptionerConfig("llava", model=model, dtype="fp32", max_new_tokens=4), batch_size=4,
                             decode_workers=0, progress=False)

    with pytest.raises(PixArtError, match=r"'qwen2-vl' is a 'qwen2_vl' checkpoint, not 'llava'"):
        relabel(tmp_path / "s", out, cfg("qwen2-vl"), log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == before
    res = relabel(tmp_path / "s", out, cfg("llava"), log=lambda m: None)
    assert sum(r.done + r.failed for r in res.runs) == 4
    want = str(Path(tiny_dir["llava"]).resolve())
    assert json.loads((out / "llava-job.json").read_text())["model"] == want
    assert {json.loads(line)["model"] for f in out.glob("*.llava.jsonl") for line in f.read_text().splitlines()} \
        == {want}
