"""Tiny random VLMs of the real transformers classes, saved with `save_pretrained`.

Each has a processor that matches it (a byte-level BPE tokenizer carrying the family's image
tokens, an image processor at 32-64 px, and the chat template the real checkpoint ships), so
`load_vlm_captioner` loads it through exactly the code path of a real checkpoint: the text is
nonsense, the pipeline is real. Built offline.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["CHAT_TEMPLATES", "TINY_VLM_NAMES", "make_tiny_vlm"]

TINY_VLM_NAMES = ("llava", "llava-next", "qwen2-vl", "qwen2.5-vl", "blip2")

_CORPUS = [
    "USER: Describe this image and its style in a very detailed manner ASSISTANT:",
    "a red circle on the left of a small blue square, flat vector art on a white background",
    "a photo of a cat sitting on a red chair in a sunny room, soft light",
    "two large green triangles near the top, a yellow star at the bottom right",
    "the city skyline at sunset, digital art, vivid colors and long shadows",
    "Question: what is in the picture? Answer: a dog playing in the snow",
]
# The chat templates the real checkpoints ship, copied verbatim from public sources:
CHAT_TEMPLATES = {
    # llava-hf/llava-1.5-7b-hf (chat_template.json), as in huggingface/transformers
    # tests/models/llava/test_processing_llava.py; openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp
    # lists it as the template of "llava-1.5, llava-v1.6-vicuna (chat_template.json)".
    "llava-1.5": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
        "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    # llava-hf/llava-interleave-qwen-7b-hf (chat_template.json), vendored in t-bank-sirius/tbank_imagegen
    # InstantCharacter/safety/chat_template.json (its config.json: LLaVA over Qwen1.5-7B-Chat).
    "llava-interleave": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content "
        "in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\n' + content['text'] "
        "}}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
        "%}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # llava-hf/llava-v1.6-mistral-7b-hf (chat_template.json), as quoted in openvinotoolkit/openvino.genai
    # src/cpp/src/tokenizer.cpp ("tiny-random-llava-next, llava-v1.6-mistral (chat_template.json)").
    "llava-next-mistral": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
        "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') "
        "%}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif "
        "message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\s> '}}{% else %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    # Qwen/Qwen2-VL-2B-Instruct (tokenizer_config.json), as quoted in openvinotoolkit/openvino.genai
    # src/cpp/src/tokenizer.cpp. Qwen2.5-VL-Instruct ships the same: huggingface/transformers
    # tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py decodes its prompts to the same system + user turns.
    "qwen2-vl": (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
        "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
        "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
        "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
        "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
        "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
        "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
        "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
        "<|im_start|>assistant\n{% endif %}"),
}
_QWEN_SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>"]


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


def _mistral(tok, hidden=32):
    return tf.MistralConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _clip(image_size=32, patch=8, hidden=32):
    return tf.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                               num_attention_heads=4, image_size=image_size, patch_size=patch,
                               projection_dim=hidden)


def _llava(tok, template: str | None):
    ip = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = tf.LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                             num_additional_image_tokens=1, chat_template=template)  # CLIP's CLS, dropped by "default"
    cfg = tf.LlavaConfig(vision_config=_clip(), text_config=_llama(tok), image_token_id=proc.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return tf.LlavaForConditionalGeneration(cfg), proc


def _llava_interleave(tok, template: str | None):
    """LLaVA over a Qwen LM with a SigLIP-style square resize, as llava-hf/llava-interleave-qwen-*."""
    ip = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    proc = tf.LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                             num_additional_image_tokens=1, chat_template=template)
    text = tf.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = tf.LlavaConfig(vision_config=_clip(), text_config=text, image_token_id=proc.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return tf.LlavaForConditionalGeneration(cfg), proc


def _llava_next(tok, template: str | None):
    """LLaVA-NeXT over a Mistral LM, as llava-hf/llava-v1.6-mistral-7b-hf (the family's default)."""
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]  # anyres: up to 2x2 tiles of 32 px
    ip = tf.LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=grid)
    proc = tf.LlavaNextProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=template)
    cfg = tf.LlavaNextConfig(vision_config=_clip(), text_config=_mistral(tok), image_grid_pinpoints=grid,
                             image_token_id=proc.image_token_id, vision_feature_select_strategy="default",
                             vision_feature_layer=-2)
    return tf.LlavaNextForConditionalGeneration(cfg), proc


def _qwen(tok, v25: bool, template: str | None):
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
    return model, proc_cls(ip, tok, vp, chat_template=template)


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


def _llama_tokenizer():  # Llama-style: <s> prefix, </s> ends, <unk> pads
    return _tokenizer(["<unk>", "<s>", "</s>", "<image>"], bos="<s>", eos_token="</s>", pad_token="<unk>")


def _qwen_tokenizer():  # Qwen2: no bos, <|im_end|> ends a turn, <|endoftext|> pads
    return _tokenizer(_QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _build(name: str, chat_template: bool):
    def template(key):
        return CHAT_TEMPLATES[key] if chat_template else None

    if name == "llava":
        return _llava(_llama_tokenizer(), template("llava-1.5"))
    if name == "llava-interleave":
        return _llava_interleave(_qwen_tokenizer(), template("llava-interleave"))
    if name == "llava-next":
        return _llava_next(_llama_tokenizer(), template("llava-next-mistral"))
    if name in ("qwen2-vl", "qwen2.5-vl"):
        return _qwen(_qwen_tokenizer(), v25=name == "qwen2.5-vl", template=template("qwen2-vl"))
    if name == "blip2":  # OPT: </s> starts and ends, <pad> pads
        tok = _tokenizer(["<unk>", "<pad>", "</s>"], bos="</s>", eos_token="</s>", pad_token="<pad>")
        return _blip2(tok)
    raise ValueError(f"no tiny VLM for {name!r}; choose from {', '.join(TINY_VLM_NAMES)}, llava-interleave")


def make_tiny_vlm(name: str, out_dir: str | os.PathLike, seed: int = 0, chat_template: bool = True) -> Path:
    """Save a tiny random `name` VLM (model + processor) into `out_dir`; returns the path. `name` is a
    captioner name or "llava-interleave" (captioner llava over a Qwen LM); `chat_template=False`
    saves it without any chat template, as some converted checkpoints are."""
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = _build(name, chat_template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
