"""VLM captioners: LLaVA-1.5/NeXT, Qwen2-VL/2.5-VL and BLIP-2 through transformers' own classes.

Prompts are written the way each checkpoint was tuned: by its own chat template (the processor's,
else the tokenizer's); a checkpoint that ships none gets its variant's documented format (FORMATS:
every LLaVA-NeXT LLM has its own). Images are thumbnailed to the checkpoint's working resolution
before the processor; LLaVA-1.5 pads them to square as the original code did (a center crop drops
a third of a 2:3 photo), and Qwen2-VL/2.5-VL bound their pixels, which is their visual-token count.

One batch = one padded `generate` call: the processor expands each image into its image tokens,
pads the prompts on the left (decoder-only LMs continue from the right edge), greedy decoding
makes captions repeatable, and only the new tokens are decoded. vLLM is an optional backend.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image

from data_pipelines.relabel.captioner import PIXART_PROMPT, QWEN_MAX_PIXELS, QWEN_NAMES, Captioner, CaptionerConfig
from pixart.encoders.loading import check_source, load_error, resolve_dtype
from pixart.errors import PixArtError

__all__ = ["FAMILIES", "FORMATS", "VLMCaptioner", "VLLMCaptioner", "load_vlm_captioner", "prompt_variant"]

VLLM_HINT = "pip install vllm (Linux + CUDA); or use --backend transformers"
QWEN_IMAGE_SIZE = 1024  # Qwen-VL has no fixed input size: a 2:3 photo at 683x1024 costs 888 visual tokens


@dataclass(frozen=True)
class PromptFormat:
    """One user turn, image first, rendered without a chat template: `head` + prompt + `tail`.
    `before`/`after` wrap a non-empty prompt only, as the real templates do (LLaVA-1.5's writes
    `text + ' '`, so an image-only turn ends "<image>\\nASSISTANT:")."""
    head: str
    tail: str
    before: str = ""
    after: str = ""

    def render(self, prompt: str) -> str:
        return self.head + (self.before + prompt + self.after if prompt else "") + self.tail


_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions. ")
_LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

FORMATS = {
    # transformers docs, model_doc/llava.md ("llava-1.5 models requires the following format")
    "llava-1.5": PromptFormat("USER: <image>\n", "ASSISTANT:", after=" "),
    # llava-hf/llava-interleave-qwen-*'s own chat template (Qwen ChatML; llava.md's one-line
    # "<|im_start|>user <image>\n..." drops its newlines)
    "llava-interleave": PromptFormat("<|im_start|>user\n<image>", "<|im_end|>\n<|im_start|>assistant\n", before="\n"),
    # transformers docs, model_doc/llava_next.md (v4.4x "Usage tips": one format per checkpoint's LLM)
    "llava-next-mistral": PromptFormat("[INST] <image>\n", " [/INST]"),
    "llava-next-vicuna": PromptFormat(_VICUNA_SYSTEM + "USER: <image>\n", "ASSISTANT:", after=" "),
    "llava-next-34b": PromptFormat("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n",
                                   "<|im_end|><|im_start|>assistant\n"),
    # the docs' llama3 line repeats "<|start_header_id|>" before "user": a typo, not kept
    "llava-next-llama3": PromptFormat(
        "<|start_header_id|>system<|end_header_id|>\n\n" + _LLAMA3_SYSTEM
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\n",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llava-next-qwen": PromptFormat(  # llava-next-72b/110b
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n",
        "<|im_end|>\n<|im_start|>assistant\n"),
    # transformers docs, model_doc/qwen2_vl.md (the default system turn opens every conversation)
    "qwen-vl": PromptFormat("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                            + _QWEN_IMAGE, "<|im_end|>\n<|im_start|>assistant\n"),
    # transformers docs, model_doc/blip-2.md: "Question: ... Answer:" is VQA; captioning takes no text
    "blip2": PromptFormat("Question: ", " Answer:"),
}


@dataclass(frozen=True)
class Family:
    cls: str  # transformers model class
    model_type: str  # config.json's model_type, to catch a checkpoint of another family early
    hub_id: str  # default checkpoint when no --model is given
    image_text: str  # the image placeholder, for a tokenizer chat template that takes a plain-text turn
    variants: tuple[tuple[str, tuple[str, ...]], ...]  # (FORMATS key, words of name/config that pick it), in order
    default: str  # FORMATS key when no word matches


FAMILIES = {
    "llava": Family("LlavaForConditionalGeneration", "llava", "llava-hf/llava-1.5-7b-hf", "<image>\n",
                    (("llava-interleave", ("interleave", "qwen")),), "llava-1.5"),
    "llava-next": Family("LlavaNextForConditionalGeneration", "llava_next", "llava-hf/llava-v1.6-mistral-7b-hf",
                         "<image>\n", (("llava-next-mistral", ("mistral",)), ("llava-next-34b", ("34b",)),
                                       ("llava-next-llama3", ("llama3", "llama-3")), ("llava-next-qwen", ("qwen",)),
                                       ("llava-next-vicuna", ("vicuna",))), "llava-next-vicuna"),
    "qwen2-vl": Family("Qwen2VLForConditionalGeneration", "qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", _QWEN_IMAGE,
                       (), "qwen-vl"),
    "qwen2.5-vl": Family("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct",
                         _QWEN_IMAGE, (), "qwen-vl"),
    "blip2": Family("Blip2ForConditionalGeneration", "blip-2", "Salesforce/blip2-opt-2.7b", "", (), "blip2"),
}


def prompt_variant(family: Family, model_id: str, config) -> str:
    """The checkpoint's variant (a FORMATS key), from words in its folder/hub name and its LM's
    config (model_type, base model name): llava-interleave is a LLaVA over Qwen, and each
    LLaVA-NeXT was tuned on its LM's own chat format."""
    text = config.get_text_config()
    hint = " ".join([Path(model_id).name, str(getattr(text, "_name_or_path", "")), text.model_type]).lower()
    return next((key for key, words in family.variants if any(w in hint for w in words)), family.default)


def prompt_text(processor, family: Family, variant: str, prompt: str) -> tuple[str | None, str]:
    """The text sent with each image, and where its format came from. Precedence: the processor's
    chat template, the tokenizer's, then FORMATS[variant]. An empty prompt makes a user turn of the
    image alone; BLIP-2 then gets no text at all (its plain captioning)."""
    if family.model_type == "blip-2":  # no chat format; its processor puts the query tokens in front
        return (FORMATS["blip2"].render(prompt) if prompt else None), "blip2"
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt else [])
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        return text, "processor chat template"
    tok = processor.tokenizer
    if getattr(tok, "chat_template", None):  # an LM template: the turn is one string, image placeholder first
        text = tok.apply_chat_template([{"role": "user", "content": family.image_text + prompt}],
                                       add_generation_prompt=True, tokenize=False)
        return _without_bos(text, tok), "tokenizer chat template"
    return FORMATS[variant].render(prompt), f"{variant} format"


def _without_bos(text: str, tok) -> str:
    """LM templates often write the BOS token themselves; the processor's tokenizer adds it again."""
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("").input_ids[:1] == [tok.bos_token_id]:
        return text[len(bos):]
    return text


def working_resolution(name: str, image_processor) -> int:
    """The longest image side the checkpoint looks at: its crop/resize size, LLaVA-NeXT's largest
    anyres grid, or QWEN_IMAGE_SIZE for Qwen-VL (any size; max_pixels bounds the cost)."""
    if name in QWEN_NAMES:
        return QWEN_IMAGE_SIZE
    grids = getattr(image_processor, "image_grid_pinpoints", None)
    if grids:
        return max(max(g) for g in grids)
    sizes = (getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None))
    return max((s.get(k) or 0 for s in sizes if s for k in ("height", "width", "shortest_edge")), default=0)


def thumbnail(image: Image.Image, size: int | None) -> Image.Image:
    """`image` with its longest side at most `size` (aspect kept; 0/None: as is), so the processor
    never resizes full-size photos."""
    if size and max(image.size) > size:
        image = image.copy()
        image.thumbnail((size, size), Image.BICUBIC)
    return image


def pad_to_square(image_processor):
    """LLaVA-1.5's own preprocessing pads to square with the mean color (transformers docs: the
    original logits need LlavaImageProcessor(do_pad=True)); its checkpoints ship a center-cropping one."""
    return transformers.LlavaImageProcessor.from_dict(image_processor.to_dict(), do_pad=True)


def _pixel_bounds(config: CaptionerConfig) -> dict:
    """Qwen-VL resizes each image to between min_pixels and max_pixels (visual tokens x 28x28 px);
    {} for other families. No min_pixels: the checkpoint's own."""
    if config.name not in QWEN_NAMES:
        return {}
    bounds = {"max_pixels": config.max_pixels or QWEN_MAX_PIXELS}
    if config.min_pixels is not None:
        bounds["min_pixels"] = config.min_pixels
    return bounds


def bound_pixels(image_processor, bounds: dict) -> None:
    """Set `_pixel_bounds` on a loaded Qwen2VLImageProcessor (its `size` holds them)."""
    low = bounds.get("min_pixels") or image_processor.size.get("shortest_edge")
    image_processor.size = {"shortest_edge": low, "longest_edge": bounds["max_pixels"]}


def _resolved_prompt(config: CaptionerConfig) -> str:
    return PIXART_PROMPT if config.prompt is None else config.prompt


def _image_size(config: CaptionerConfig, processor) -> int:
    return working_resolution(config.name, processor.image_processor) if config.image_size is None \
        else config.image_size


class VLMCaptioner:
    """Captions a batch of samples (`image`: PIL) with one batched, padded, greedy `generate`.
    `visual_tokens` counts images per visual-token count (first greedy call per image); the job
    takes it into its summary."""

    def __init__(self, config: CaptionerConfig, family: Family, variant: str, model_id: str, model, processor):
        self.name, self.model_id, self.prompt = config.name, model_id, _resolved_prompt(config)
        self.model, self.processor, self.variant = model, processor, variant
        self.device, self.dtype = torch.device(config.device), model.dtype
        lm_cfg = model.config.get_text_config()
        self.decoder_only = not lm_cfg.is_encoder_decoder  # only BLIP-2 with Flan-T5 is not
        tok = processor.tokenizer
        if self.decoder_only:
            tok.padding_side = "left"  # every row's last prompt token sits at the right edge
        if tok.pad_token is None:  # some LLaVA tokenizers ship without one
            tok.pad_token = tok.eos_token
        self.text, self.prompt_source = prompt_text(processor, family, variant, self.prompt)
        self.image_size = _image_size(config, processor)  # the job's decode workers thumbnail to it
        self.visual_tokens: Counter = Counter()
        # Greedy over the checkpoint's own generation config (keeps its eos/decoder-start ids) so
        # that a sampling default shipped with an Instruct checkpoint cannot make captions random.
        gen = copy.deepcopy(model.generation_config)
        gen.do_sample, gen.num_beams, gen.max_new_tokens = False, 1, config.max_new_tokens
        gen.temperature = gen.top_p = gen.top_k = None
        gen.pad_token_id = tok.pad_token_id
        self.generation_config = gen

    def inputs(self, images: list[Image.Image]):
        """The processor's tensors for `images` with this captioner's text (none: BLIP-2 captioning)."""
        images = [thumbnail(im.convert("RGB"), self.image_size) for im in images]
        text = None if self.text is None else [self.text] * len(images)
        return self.processor(images=images, text=text, padding=True, return_tensors="pt")

    def count_visual_tokens(self, inputs) -> list[int]:
        """Image tokens the LM reads per image: the processor's expanded placeholders, or BLIP-2's
        query tokens when it gets no text."""
        if "input_ids" not in inputs:
            return [self.model.config.num_query_tokens] * len(inputs["pixel_values"])
        return (inputs["input_ids"] == self.model.config.image_token_id).sum(1).tolist()

    @torch.inference_mode()
    def caption(self, samples: list[dict], seed: int | None = None) -> list[str]:
        """Greedy captions; with a `seed` (the job's one retry of a rejected caption) seeded sampling
        instead, since greedy decoding would only repeat the rejected text."""
        if not samples:
            return []
        gen = self.generation_config
        if seed is not None:
            gen = copy.deepcopy(gen)
            gen.do_sample, gen.temperature, gen.top_p = True, 0.7, 0.9
            torch.manual_seed(seed)
        inputs = self.inputs([s["image"] for s in samples]).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, generation_config=gen)
        if seed is None:
            self.visual_tokens.update(self.count_visual_tokens(inputs))
        if self.decoder_only:  # generate returns prompt + continuation
            out = out[:, self._prompt_length(inputs):]
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def _prompt_length(self, inputs) -> int:
        if "input_ids" in inputs:
            return inputs["input_ids"].shape[1]
        return self.model.config.num_query_tokens + 1  # BLIP-2 without text starts from query tokens + BOS


class VLLMCaptioner:
    """vLLM backend (untested here: needs Linux + CUDA). Same prompts, greedy, one request per image."""

    def __init__(self, config: CaptionerConfig, family: Family, variant: str, model_id: str, processor):
        from vllm import LLM, SamplingParams

        self.name, self.model_id, self.prompt = config.name, model_id, _resolved_prompt(config)
        self.text, self.prompt_source = prompt_text(processor, family, variant, self.prompt)
        self.image_size = _image_size(config, processor)
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[config.dtype]
        self.llm = LLM(model=model_id, dtype=dtype, seed=config.seed, limit_mm_per_prompt={"image": 1},
                       mm_processor_kwargs=_pixel_bounds(config) or None)
        self.params = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens)

    def caption(self, samples: list[dict]) -> list[str]:
        requests = [{"prompt": self.text, "multi_modal_data": {"image": thumbnail(s["image"].convert("RGB"),
                                                                                  self.image_size)}}
                    for s in samples]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


def _model_class(name: str, family: Family):
    cls = getattr(transformers, family.cls, None)
    if cls is None:
        raise PixArtError(f"captioner {name}: transformers {transformers.__version__} has no {family.cls}; "
                          f"upgrade it (pip install -U transformers)")
    return cls


def load_vlm_captioner(config: CaptionerConfig) -> Captioner:
    """Load the VLM named by `config` (path or hub id in `config.model`); every failure before the
    first caption is one PixArtError line: unknown backend, no vLLM, missing path, wrong family."""
    family = FAMILIES.get(config.name)
    if family is None:
        raise PixArtError(f"unknown VLM captioner {config.name!r}; choose from {', '.join(FAMILIES)}")
    what = f"captioner {config.name}"
    if config.backend not in ("transformers", "vllm"):
        raise PixArtError(f"{what}: unknown backend {config.backend!r}; use transformers or vllm")
    if config.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise PixArtError(f"{what}: the vllm backend is not installed: {VLLM_HINT}") from None
        if config.name == "blip2":
            raise PixArtError(f"{what}: the vllm backend here serves llava, llava-next, qwen2-vl, qwen2.5-vl")
    cls = _model_class(config.name, family)
    dtype = resolve_dtype(config.dtype, ("fp32", "bf16", "fp16"), what)
    path = check_source(config.model or family.hub_id, what)
    try:
        model_config = transformers.AutoConfig.from_pretrained(path)
    except Exception as err:  # missing config.json, hub offline, ...
        raise load_error(what, path, None, err) from None
    if model_config.model_type != family.model_type:
        raise PixArtError(f"{what}: '{path}' is a {model_config.model_type!r} checkpoint, not {family.model_type!r}")
    variant = prompt_variant(family, path, model_config)
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
        bounds = _pixel_bounds(config)
        if bounds:
            bound_pixels(processor.image_processor, bounds)
        if variant == "llava-1.5":
            processor.image_processor = pad_to_square(processor.image_processor)
        if config.backend == "vllm":
            return VLLMCaptioner(config, family, variant, path, processor)
        model = cls.from_pretrained(path, dtype=dtype, device_map=config.device).eval()  # no CPU detour
    except Exception as err:
        raise load_error(what, path, None, err) from None
    return VLMCaptioner(config, family, variant, path, model, processor)
