"""Tiny random VLMs of the real transformers classes, saved with `save_pretrained`.

Each has a processor that matches it (a byte-level BPE tokenizer carrying the family's image
tokens, an image processor at 32-64 px), so `load_vlm_captioner` loads it through exactly the
code path of a real checkpoint: the text is nonsense, the pipeline is real. Built offline.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["TINY_VLM_NAMES", "make_tiny_vlm"]

TINY_VLM_NAMES = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "blip2")

_CORPUS = [
    "USER: Describe this image and its style in a very detailed manner ASSISTANT:",
    "a red circle on the left of a small blue square, flat vector art on a white background",
    "a photo of a cat sitting on a red chair in a sunny room, soft light",
    "two large green triangles near the top, a yellow star at the bottom right",
    "the city skyline at sunset, digital art, vivid colors and long shadows",
    "Question: what is in the picture? Answer: a dog playing in the snow",
]
# LLaVA-NeXT-Mistral's and Qwen2-VL's prompt formats, as Jinja chat templates (written here, not copied).
_MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %} [/INST]{% endif %}{% endfor %}")
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_QWEN_SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _tokenizer(specials: list[str], bos: str | None = None, **named) -> tf.PreTrainedTokenizerFast:
    """BPE over printable ASCII (so random models babble word pieces, not stray bytes), with
    `specials` at ids 0.. (<unk> first) and an optional bos prefix."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, show_progress=False,
        initial_alphabet=["\n"] + [chr(c) for c in range(33, 127)]))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    extra = [s for s in specials if s not in named.values() and s not in (bos, "<unk>")]
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, unk_token="<unk>",
                                      extra_special_tokens=extra, model_max_length=4096, **named)


def _llama(tok, hidden=32):
    return tf.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _clip(image_size=32, patch=8, hidden=32):
    return tf.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                               num_attention_heads=4, image_size=image_size, patch_size=patch,
                               projection_dim=hidden)


def _llava(tok):
    ip = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = tf.LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                             num_additional_image_tokens=1)  # CLIP's CLS, dropped by "default"
    cfg = tf.LlavaConfig(vision_config=_clip(), text_config=_llama(tok), image_token_id=proc.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return tf.LlavaForConditionalGeneration(cfg), proc


def _llava_next(tok):
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]  # anyres: up to 2x2 tiles of 32 px
    ip = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=grid)
    proc = tf.LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=_MISTRAL_TEMPLATE)
    cfg = tf.LlavaNextConfig(vision_config=_clip(), text_config=_llama(tok), image_grid_pinpoints=grid,
                             image_token_id=proc.image_token_id, vision_feature_select_strategy="default",
                             vision_feature_layer=-2)
    return tf.LlavaNextForConditionalGeneration(cfg), proc


def _qwen(tok, v25: bool):
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # 8 px patches, 2x2 merge: a 32x48 image -> 4x6 patches -> 6 image tokens; 16..64 px a side.
    ip = tf.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    vp = tf.Qwen2VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    if v25:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                      patch_size=8, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                      fullatt_block_indexes=[1])
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        model, proc_cls = tf.Qwen2_5_VLForConditionalGeneration(cfg), tf.Qwen2_5_VLProcessor
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        model, proc_cls = tf.Qwen2VLForConditionalGeneration(cfg), tf.Qwen2VLProcessor
    return model, proc_cls(ip, tok, vp, chat_template=_QWEN_TEMPLATE)


def _blip2(tok):
    ip = tf.BlipImageProcessor(size={"height": 32, "width": 32})
    proc = tf.Blip2Processor(ip, tok, num_query_tokens=4)  # adds the <image> token to the tokenizer
    opt = tf.OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg = tf.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            encoder_hidden_size=32, cross_attention_frequency=1),
        text_config=opt.to_dict(), num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    return tf.Blip2ForConditionalGeneration(cfg), proc


def _build(name: str):
    if name in ("llava", "llava-next"):  # Llama-style: <s> prefix, </s> ends, <unk> pads
        tok = _tokenizer(["<unk>", "<s>", "</s>", "<image>"], bos="<s>", eos_token="</s>", pad_token="<unk>")
        return (_llava if name == "llava" else _llava_next)(tok)
    if name in ("qwen2-vl", "qwen2.5-vl"):  # Qwen2: no bos, <|im_end|> ends a turn, <|endoftext|> pads
        tok = _tokenizer(_QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        return _qwen(tok, v25=name == "qwen2.5-vl")
    if name == "blip2":  # OPT: </s> starts and ends, <pad> pads
        tok = _tokenizer(["<unk>", "<pad>", "</s>"], bos="</s>", eos_token="</s>", pad_token="<pad>")
        return _blip2(tok)
    raise ValueError(f"no tiny VLM for {name!r}; choose from {', '.join(TINY_VLM_NAMES)}")


def make_tiny_vlm(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random `name` VLM (model + processor) into `out_dir`; returns the path."""
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _build(name)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
