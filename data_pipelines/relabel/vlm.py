"""VLM captioners: LLaVA-1.5/NeXT, Qwen2-VL/2.5-VL and BLIP-2 through transformers' own classes.

One batch = one padded `generate` call: the processor expands each image into its image tokens,
pads the prompts on the left (decoder-only LMs continue from the right edge), greedy decoding
makes captions repeatable, and only the new tokens are decoded. vLLM is an optional backend.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import transformers

from data_pipelines.relabel.captioner import Captioner, CaptionerConfig
from pixart.encoders.loading import check_source, load_error, resolve_dtype
from pixart.errors import PixArtError

__all__ = ["FAMILIES", "VLMCaptioner", "VLLMCaptioner", "load_vlm_captioner"]

VLLM_HINT = "pip install vllm (Linux + CUDA); or use --backend transformers"
_QWEN_FORMAT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")


@dataclass(frozen=True)
class Family:
    cls: str  # transformers model class
    model_type: str  # config.json's model_type, to catch a checkpoint of another family early
    fallback: str  # prompt format when the processor carries no chat template
    hub_id: str  # default checkpoint when no --model is given


FAMILIES = {
    "llava": Family("LlavaForConditionalGeneration", "llava",
                    "USER: <image>\n{prompt} ASSISTANT:", "llava-hf/llava-1.5-7b-hf"),
    "llava-next": Family("LlavaNextForConditionalGeneration", "llava_next",
                         "[INST] <image>\n{prompt} [/INST]", "llava-hf/llava-v1.6-mistral-7b-hf"),
    "qwen2-vl": Family("Qwen2VLForConditionalGeneration", "qwen2_vl",
                       _QWEN_FORMAT, "Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2.5-vl": Family("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl", _QWEN_FORMAT,
                         "Qwen/Qwen2.5-VL-7B-Instruct"),
    "blip2": Family("Blip2ForConditionalGeneration", "blip-2", "Question: {prompt} Answer:",
                    "Salesforce/blip2-opt-2.7b"),  # a VQA-style prefix; an empty prompt = plain captioning
}


def prompt_text(processor, family: Family, prompt: str) -> str:
    """The text for one image + `prompt` in the format the checkpoint was tuned on: its own chat
    template when it ships one, else the family's documented format ("" for BLIP-2 = plain caption)."""
    if family.model_type == "blip-2":  # its processor puts the query-token placeholders in front
        return family.fallback.format(prompt=prompt) if prompt else ""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return family.fallback.format(prompt=prompt)


class VLMCaptioner:
    """Captions a batch of samples (`image`: PIL) with one batched, padded, greedy `generate`."""

    def __init__(self, config: CaptionerConfig, family: Family, model_id: str, model, processor):
        self.name, self.model_id, self.prompt = config.name, model_id, config.prompt
        self.model, self.processor = model, processor
        self.device, self.dtype = torch.device(config.device), model.dtype
        lm_cfg = model.config.get_text_config()
        self.decoder_only = not lm_cfg.is_encoder_decoder  # only BLIP-2 with Flan-T5 is not
        tok = processor.tokenizer
        if self.decoder_only:
            tok.padding_side = "left"  # every row's last prompt token sits at the right edge
        if tok.pad_token is None:  # some LLaVA tokenizers ship without one
            tok.pad_token = tok.eos_token
        self.text = prompt_text(processor, family, config.prompt)
        # Greedy over the checkpoint's own generation config (keeps its eos/decoder-start ids) so
        # that a sampling default shipped with an Instruct checkpoint cannot make captions random.
        gen = copy.deepcopy(model.generation_config)
        gen.do_sample, gen.num_beams, gen.max_new_tokens = False, 1, config.max_new_tokens
        gen.temperature = gen.top_p = gen.top_k = None
        gen.pad_token_id = tok.pad_token_id
        self.generation_config = gen

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
        images = [s["image"].convert("RGB") for s in samples]
        inputs = self.processor(images=images, text=[self.text] * len(images), padding=True,
                                return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, generation_config=gen)
        if self.decoder_only:  # generate returns prompt + continuation
            out = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class VLLMCaptioner:
    """vLLM backend (untested here: needs Linux + CUDA). Same prompts, greedy, one request per image."""

    def __init__(self, config: CaptionerConfig, family: Family, model_id: str, processor):
        from vllm import LLM, SamplingParams

        self.name, self.model_id, self.prompt = config.name, model_id, config.prompt
        self.text = prompt_text(processor, family, config.prompt)
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[config.dtype]
        self.llm = LLM(model=model_id, dtype=dtype, seed=config.seed, limit_mm_per_prompt={"image": 1})
        self.params = SamplingParams(temperature=0.0, max_tokens=config.max_new_tokens)

    def caption(self, samples: list[dict]) -> list[str]:
        requests = [{"prompt": self.text, "multi_modal_data": {"image": s["image"].convert("RGB")}}
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
        model_type = transformers.AutoConfig.from_pretrained(path).model_type
    except Exception as err:  # missing config.json, hub offline, ...
        raise load_error(what, path, None, err) from None
    if model_type != family.model_type:
        raise PixArtError(f"{what}: '{path}' is a {model_type!r} checkpoint, not {family.model_type!r}")
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
        if config.backend == "vllm":
            return VLLMCaptioner(config, family, path, processor)
        model = cls.from_pretrained(path, dtype=dtype, device_map=config.device).eval()  # no CPU detour
    except Exception as err:
        raise load_error(what, path, None, err) from None
    return VLMCaptioner(config, family, path, model, processor)
