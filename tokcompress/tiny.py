"""Tiny random-weight video LLMs with the *real* transformers model and processor classes.

Why: adapters that compress visual tokens hook into the internals of each
family's ``...ForConditionalGeneration`` (where the video placeholder span
sits in ``input_ids``, how its frame/grid geometry is laid out, which extra
kwargs the language model receives). Testing those adapters needs the real
classes and the real processors that expand the placeholders, but not the real
weights. Everything here is built in code, offline: the tokenizers are tiny
byte-level vocabularies constructed with the ``tokenizers`` library and
wrapped in each family's own tokenizer class, the image/video processors are
the family's classes configured for small frames, and the models are the
family's model classes built from their config classes with tiny sizes.

Usage::

    model, processor = build("qwen2_5_vl")
    inputs = make_inputs(processor, synthetic_video(8, 64, 64), "What moves?")
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)

See ``docs/families.md`` for the per-family geometry facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import BatchFeature, PreTrainedModel, ProcessorMixin

__all__ = [
    "FAMILIES", "BENCHMARK_SHAPE", "DEFAULT_FPS", "build", "build_clip", "build_config", "family_of", "make_inputs"
]

FAMILIES: tuple[str, ...] = (
    "llava_onevision",
    "llava_next_video",
    "video_llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "smolvlm",
)

#: Overrides for the "benchmark-shaped" LLaVA-OneVision-like model:
#: ``build("llava_onevision", **BENCHMARK_SHAPE)`` -> LM 256 wide, 8 layers, 4 heads / 1 KV head,
#: MLP 704; SigLIP tower on 112px frames, patch 4 -> 28x28 -> 14x14 = 196 tokens per frame; 32 frames.
BENCHMARK_SHAPE: dict[str, int] = {
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "frames": 32,
    "image_size": 112,
    "patch_size": 4,
}

#: Frame rate assumed for videos handed to :func:`make_inputs` as bare arrays.
#: Qwen3-VL and SmolVLM print frame timestamps into the prompt and Qwen2.5-VL
#: scales temporal M-RoPE ids by it, so it must be *some* value; 1 fps keeps the
#: printed timestamps short.
DEFAULT_FPS: float = 1.0


# --------------------------------------------------------------------------- #
# Tokenizers                                                                  #
# --------------------------------------------------------------------------- #


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table.

    Byte-level BPE tokenizers (GPT-2, Qwen2) operate on these characters, so a
    vocabulary holding all 256 of them can encode any UTF-8 text.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _bytelevel_vocab(specials: list[str]) -> dict[str, int]:
    """Ids 0..255 are the raw bytes (so ``id == byte value``), specials follow in order."""
    table = _byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for tok in specials:
        vocab.setdefault(tok, len(vocab))
    return vocab


def _qwen2_tokenizer(specials: list[str], **kwargs: Any) -> Any:
    """A real ``Qwen2Tokenizer`` over a 256-byte vocabulary plus ``specials``."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(vocab=_bytelevel_vocab(specials), merges=[], **kwargs)


def _gpt2_tokenizer(specials: list[str], **kwargs: Any) -> Any:
    """A real ``GPT2Tokenizer`` (SmolVLM's tokenizer class) over bytes plus ``specials``."""
    from transformers import GPT2Tokenizer

    return GPT2Tokenizer(vocab=_bytelevel_vocab(specials), merges=[], **kwargs)


def _llama_tokenizer(specials: list[str], **kwargs: Any) -> Any:
    """A real ``LlamaTokenizer`` (SentencePiece-style BPE with byte fallback).

    Vocabulary: ``<unk> <s> </s>``, the 256 ``<0xNN>`` byte-fallback pieces,
    the word-boundary marker ``▁`` and printable ASCII; anything else falls
    back to bytes, so every string tokenizes.
    """
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for c in range(33, 127):
        vocab.setdefault(chr(c), len(vocab))
    for tok in specials:
        vocab.setdefault(tok, len(vocab))
    kwargs.setdefault("add_bos_token", True)
    return LlamaTokenizer(vocab=vocab, merges=[], **kwargs)


def _lm_vocab_size(tokenizer: Any) -> int:
    """LM vocabulary: the tokenizer's size rounded up to a multiple of 64."""
    return int(math.ceil(len(tokenizer) / 64) * 64)


# --------------------------------------------------------------------------- #
# Chat templates (shortened versions of each family's published template)     #
# --------------------------------------------------------------------------- #
# transformers renders these with trim_blocks/lstrip_blocks: a newline right
# after a "%}" tag is eaten, so newlines that must survive are written
# after literal text or as {{ '\n' }}.

_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL: same layout, no default system prompt.
_QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-onevision-qwen2-*-hf: media first, then "\n" + text.
_LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}<video>{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Vicuna style used by LLaVA-NeXT-Video and Video-LLaVA: "USER: <video>\n{q} ASSISTANT:".
_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}<video>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# OpenGVLab/InternVL3-*-hf (system prompt dropped): media tokens, "\n", text.
_INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SmolVLM2 video template (SmolVLMProcessor forces this one for videos anyway).
_SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% elif line['type'] == 'video' %}<video>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# --------------------------------------------------------------------------- #
# Size settings                                                               #
# --------------------------------------------------------------------------- #


@dataclass
class _Sizes:
    """Resolved size knobs shared by all families (see :func:`build` for meaning)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vision_hidden_size: int
    vision_num_hidden_layers: int
    vision_num_attention_heads: int
    vision_intermediate_size: int
    image_size: int
    patch_size: int
    frames: int


_OVERRIDE_NAMES = frozenset(_Sizes.__dataclass_fields__)

# Per-family tiny defaults for the frame side fed to the vision tower and the patch size.
# Chosen so that every family yields a 4x4 token grid per frame (video_llava: 4x4 + CLS).
_GEOMETRY: dict[str, tuple[int, int]] = {
    "llava_onevision": (32, 4),  # 8x8 patches -> bilinear /2 -> 4x4
    "llava_next_video": (32, 4),  # 8x8 patches (CLS dropped) -> avg-pool 2 -> 4x4
    "video_llava": (32, 8),  # 4x4 patches + CLS
    "qwen2_vl": (64, 8),  # 8x8 patches -> 2x2 merge -> 4x4, temporal patch 2
    "qwen2_5_vl": (64, 8),
    "qwen3_vl": (64, 8),
    "internvl": (32, 4),  # 8x8 patches -> pixel shuffle 0.5 -> 4x4
    "smolvlm": (32, 4),  # 8x8 patches -> pixel shuffle 2 -> 4x4
}


def _resolve_sizes(family: str, overrides: dict[str, Any]) -> _Sizes:
    unknown = set(overrides) - _OVERRIDE_NAMES
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; valid: {sorted(_OVERRIDE_NAMES)}")
    image_size, patch_size = _GEOMETRY[family]
    hidden = int(overrides.get("hidden_size", 64))
    if "hidden_size" in overrides:
        # "Benchmark-shaped" defaults: head_dim 64, GQA ratio 4, SwiGLU width 2.75H.
        heads = max(1, hidden // 64)
        kv_heads = max(1, hidden // 256)
        inter = int(round(2.75 * hidden))
    else:
        heads, kv_heads, inter = 4, 2, 128
    vision_hidden = int(overrides.get("vision_hidden_size", 32))
    sizes = _Sizes(
        hidden_size=hidden,
        num_hidden_layers=int(overrides.get("num_hidden_layers", 2)),
        num_attention_heads=int(overrides.get("num_attention_heads", heads)),
        num_key_value_heads=int(overrides.get("num_key_value_heads", kv_heads)),
        intermediate_size=int(overrides.get("intermediate_size", inter)),
        vision_hidden_size=vision_hidden,
        vision_num_hidden_layers=int(overrides.get("vision_num_hidden_layers", 2)),
        vision_num_attention_heads=int(overrides.get("vision_num_attention_heads", 2)),
        vision_intermediate_size=int(overrides.get("vision_intermediate_size", 2 * vision_hidden)),
        image_size=int(overrides.get("image_size", image_size)),
        patch_size=int(overrides.get("patch_size", patch_size)),
        frames=int(overrides.get("frames", 8)),
    )
    if sizes.hidden_size % sizes.num_attention_heads:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    if sizes.num_attention_heads % sizes.num_key_value_heads:
        raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
    if sizes.vision_hidden_size % sizes.vision_num_attention_heads:
        raise ValueError("vision_hidden_size must be divisible by vision_num_attention_heads")
    if sizes.image_size % sizes.patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    return sizes


def _text_kwargs(s: _Sizes, tok: Any, *, bos: bool = True, **extra: Any) -> dict[str, Any]:
    """Decoder kwargs common to the Llama/Qwen2-style language models, with ``tok``'s vocabulary and
    special token ids (``bos=False``: no BOS token, as the Qwen-style models)."""
    return dict(
        vocab_size=_lm_vocab_size(tok),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id if bos else None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def _clip_like_vision(s: _Sizes) -> dict[str, Any]:
    """Kwargs shared by CLIP / SigLIP / SmolVLM vision configs."""
    return dict(
        hidden_size=s.vision_hidden_size,
        intermediate_size=s.vision_intermediate_size,
        num_hidden_layers=s.vision_num_hidden_layers,
        num_attention_heads=s.vision_num_attention_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
    )


# --------------------------------------------------------------------------- #
# Family builders: each returns (config, processor)                            #
# --------------------------------------------------------------------------- #


def _llava_onevision(s: _Sizes) -> tuple[Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = _qwen2_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<image>", "<video>"],
    )
    side = s.image_size
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    image_processor = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": side, "width": side}, num_frames=s.frames)
    num_patches = (s.image_size // s.patch_size) ** 2
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        num_image_tokens=num_patches,
        vision_feature_select_strategy="full",
        chat_template=_LLAVA_OV_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_clip_like_vision(s), vision_use_head=False),
        text_config=Qwen2Config(**_text_kwargs(s, tok, bos=False)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    return config, processor


def _llava_next_video(s: _Sizes) -> tuple[Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    tok = _llama_tokenizer(["<video>", "<image>", "<pad>"], pad_token="<pad>", extra_special_tokens=["<video>", "<image>"])
    side = s.image_size
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    crop = {"height": side, "width": side}
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size=crop, image_grid_pinpoints=pinpoints
    )
    video_processor = LlavaNextVideoVideoProcessor(size={"shortest_edge": side}, crop_size=crop, num_frames=s.frames)
    processor = LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=_VICUNA_TEMPLATE,
        patch_size=s.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**_clip_like_vision(s), projection_dim=s.vision_hidden_size),
        text_config=LlamaConfig(**_text_kwargs(s, tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        image_seq_length=(side // s.patch_size) ** 2,
        video_seq_length=(side // s.patch_size) ** 2 // 4 * s.frames,
    )
    return config, processor


def _video_llava(s: _Sizes) -> tuple[Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        VideoLlavaConfig,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    tok = _llama_tokenizer(["<image>", "<video>", "<pad>"], pad_token="<pad>", extra_special_tokens=["<image>", "<video>"])
    side = s.image_size
    crop = {"height": side, "width": side}
    image_processor = VideoLlavaImageProcessor(size={"shortest_edge": side}, crop_size=crop)
    video_processor = VideoLlavaVideoProcessor(size={"shortest_edge": side}, crop_size=crop, num_frames=s.frames)
    processor = VideoLlavaProcessor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tok,
        patch_size=s.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_VICUNA_TEMPLATE,
    )
    per_frame = (side // s.patch_size) ** 2 + 1
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**_clip_like_vision(s), projection_dim=s.vision_hidden_size),
        text_config=LlamaConfig(**_text_kwargs(s, tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=per_frame - 1,
        video_seq_length=per_frame * s.frames,
    )
    return config, processor


_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen_tokenizer() -> Any:
    return _qwen2_tokenizer(
        _QWEN_SPECIALS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=_QWEN_SPECIALS[1:2] + _QWEN_SPECIALS[3:],
    )


def _qwen_processors(s: _Sizes, video_cls: type, **video_kwargs: Any) -> tuple[Any, Any]:
    """Qwen image + video processors that keep frames between image_size/2 and image_size square."""
    from transformers import Qwen2VLImageProcessor

    factor = s.patch_size * 2  # patch * spatial merge
    lo, hi = max(factor, s.image_size // 2) ** 2, s.image_size**2
    common = dict(patch_size=s.patch_size, merge_size=2, temporal_patch_size=2)
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": lo, "longest_edge": hi}, **common)
    video_processor = video_cls(
        size={"shortest_edge": lo, "longest_edge": hi}, num_frames=s.frames, **common, **video_kwargs
    )
    return image_processor, video_processor


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (t, h, w) like Qwen's [16, 24, 24] for 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _mrope_parameters(s: _Sizes, *, interleaved: bool = False) -> dict[str, Any]:
    """``rope_parameters`` of the Qwen-VL language models (Qwen3-VL interleaves the sections)."""
    out: dict[str, Any] = {"rope_type": "default", "mrope_section": _mrope_section(s.hidden_size // s.num_attention_heads)}
    if interleaved:
        out["mrope_interleaved"] = True
    out["rope_theta"] = 10000.0
    return out


def _qwen2_vl(s: _Sizes) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = _qwen_tokenizer()
    image_processor, video_processor = _qwen_processors(s, Qwen2VLVideoProcessor, cap_pixels_per_frame=False)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=_QWEN2_VL_TEMPLATE
    )
    text = _text_kwargs(s, tok, bos=False, rope_parameters=_mrope_parameters(s))
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=s.vision_num_hidden_layers,
            embed_dim=s.vision_hidden_size,
            hidden_size=s.hidden_size,
            mlp_ratio=2,
            num_heads=s.vision_num_attention_heads,
            patch_size=s.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **_qwen_token_ids(tok),
    )
    return config, processor


def _qwen_token_ids(tok: Any) -> dict[str, int]:
    return dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def _qwen2_5_vl(s: _Sizes) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    tok = _qwen_tokenizer()
    image_processor, video_processor = _qwen_processors(s, Qwen2VLVideoProcessor, cap_pixels_per_frame=False)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=_QWEN2_VL_TEMPLATE
    )
    text = _text_kwargs(s, tok, bos=False, rope_parameters=_mrope_parameters(s))
    depth = s.vision_num_hidden_layers
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=depth,
            hidden_size=s.vision_hidden_size,
            intermediate_size=s.vision_intermediate_size,
            num_heads=s.vision_num_attention_heads,
            out_hidden_size=s.hidden_size,
            patch_size=s.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # window = 2x2 merged tokens, so a 4x4 grid really exercises windowed attention
            window_size=s.patch_size * 2 * 2,
            fullatt_block_indexes=[depth - 1],
            tokens_per_second=2,
        ),
        **_qwen_token_ids(tok),
    )
    return config, processor


def _qwen3_vl(s: _Sizes) -> tuple[Any, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = _qwen_tokenizer()
    # Qwen3-VL's video smart_resize bounds the pixels of the *whole clip* (t*h*w), not one frame;
    # num_frames replaces the default fps=2 sampling rule (the two are mutually exclusive).
    image_processor, _ = _qwen_processors(s, Qwen3VLVideoProcessor)
    factor = s.patch_size * 2
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 2 * factor * factor, "longest_edge": s.frames * s.image_size**2},
        patch_size=s.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        num_frames=s.frames,
        fps=None,
        cap_pixels_per_frame=False,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=_QWEN3_VL_TEMPLATE
    )
    head_dim = s.hidden_size // s.num_attention_heads
    text = _text_kwargs(s, tok, bos=False, head_dim=head_dim, rope_parameters=_mrope_parameters(s, interleaved=True))
    depth = s.vision_num_hidden_layers
    grid = s.image_size // s.patch_size
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=depth,
            hidden_size=s.vision_hidden_size,
            intermediate_size=s.vision_intermediate_size,
            num_heads=s.vision_num_attention_heads,
            out_hidden_size=s.hidden_size,
            patch_size=s.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=grid * grid,
            # one deepstack feature per LM layer it can feed (the real 8B uses 3)
            deepstack_visual_indexes=list(range(min(depth, s.num_hidden_layers))),
        ),
        **_qwen_token_ids(tok),
    )
    return config, processor


def _internvl(s: _Sizes) -> tuple[Any, Any]:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2Config,
    )

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tok = _qwen2_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named,
    )
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>"]}, replace_extra_special_tokens=False)
    side = s.image_size
    image_processor = GotOcr2ImageProcessor(
        size={"height": side, "width": side}, crop_to_patches=False, min_patches=1, max_patches=4
    )
    video_processor = InternVLVideoProcessor(size={"height": side, "width": side}, num_frames=s.frames)
    seq = (side // s.patch_size) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_length=seq,
        chat_template=_INTERNVL_TEMPLATE,
    )
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=s.vision_hidden_size,
            intermediate_size=s.vision_intermediate_size,
            num_hidden_layers=s.vision_num_hidden_layers,
            num_attention_heads=s.vision_num_attention_heads,
            image_size=[side, side],
            patch_size=[s.patch_size, s.patch_size],
        ),
        text_config=Qwen2Config(**_text_kwargs(s, tok, bos=False)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=seq,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return config, processor


def _smolvlm(s: _Sizes) -> tuple[Any, Any]:
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    named = {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "end_of_utterance_token": "<end_of_utterance>",
        "global_image_token": "<global-img>",
    }
    rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    tok = _gpt2_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", *named.values(), "<video>", *rows_cols],
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=named,
    )
    tok.add_special_tokens({"extra_special_tokens": ["<video>", *rows_cols]}, replace_extra_special_tokens=False)
    side = s.image_size
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": side}, max_image_size={"longest_edge": side}, do_image_splitting=False
    )
    video_processor = SmolVLMVideoProcessor(
        size={"longest_edge": side},
        max_image_size={"longest_edge": side},
        num_frames=s.frames,
        fps=DEFAULT_FPS,
    )
    seq = (side // s.patch_size) ** 2 // 4  # pixel shuffle with scale_factor 2
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        image_seq_len=seq,
        chat_template=_SMOLVLM_TEMPLATE,
    )
    config = SmolVLMConfig(
        vision_config=dict(**_clip_like_vision(s)),
        text_config=LlamaConfig(**_text_kwargs(s, tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    return config, processor


_BUILDERS: dict[str, Callable[[_Sizes], tuple[Any, Any]]] = {
    "llava_onevision": _llava_onevision,
    "llava_next_video": _llava_next_video,
    "video_llava": _video_llava,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "internvl": _internvl,
    "smolvlm": _smolvlm,
}

_MODEL_CLASSES: dict[str, str] = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    "video_llava": "VideoLlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}

_PROCESSOR_FAMILY: dict[str, str] = {
    "LlavaOnevisionProcessor": "llava_onevision",
    "LlavaNextVideoProcessor": "llava_next_video",
    "VideoLlavaProcessor": "video_llava",
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen2_5_VLProcessor": "qwen2_5_vl",
    "Qwen3VLProcessor": "qwen3_vl",
    "InternVLProcessor": "internvl",
    "SmolVLMProcessor": "smolvlm",
}


def family_of(obj: Any) -> str:
    """Family name of a processor or model (by class / ``config.model_type``)."""
    name = type(obj).__name__
    if name in _PROCESSOR_FAMILY:
        return _PROCESSOR_FAMILY[name]
    model_type = getattr(getattr(obj, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return model_type
    raise ValueError(f"not a known video-LLM family: {name}")


def build_config(family: str, **overrides: Any) -> tuple[Any, ProcessorMixin]:
    """``(config, processor)`` that :func:`build` uses, without building the model (same overrides)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    return _BUILDERS[family](_resolve_sizes(family, overrides))


def build(
    family: str, *, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build ``(model, processor)`` for ``family`` with random weights, fully offline.

    The model is the family's real ``...ForConditionalGeneration`` class in
    ``eval()`` mode, float32, weights drawn from ``torch`` seeded with ``seed``
    (same seed -> bit-identical weights). The processor is the family's real
    processor class with its real tokenizer class over a tiny byte-level vocab,
    a chat template, and image/video processors configured for small frames.

    Tiny defaults: LM hidden 64, 2 layers, 4 heads / 2 KV heads, MLP 128;
    vision hidden 32, 2 layers, 2 heads; 4x4 video tokens per frame (per
    temporal patch of 2 frames for the Qwen families).

    Overrides (all optional keyword arguments):

    * ``hidden_size``: LM width. When given, the head counts and MLP width
      default to the LLaVA-OV-like "benchmark shape": ``num_attention_heads =
      H/64``, ``num_key_value_heads = max(1, H/256)``, ``intermediate_size =
      2.75*H``.
    * ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
      ``intermediate_size``: LM shape.
    * ``vision_hidden_size`` (32), ``vision_num_hidden_layers`` (2),
      ``vision_num_attention_heads`` (2), ``vision_intermediate_size`` (2x):
      vision tower shape.
    * ``image_size``, ``patch_size``: frame side fed to the tower and its patch
      size (Qwen families: frames are resized to between ``image_size/2`` and
      ``image_size`` per side). E.g. LLaVA-OV ``image_size=112, patch_size=4``
      -> 28x28 patches -> 14x14 = 196 tokens per frame after pooling.
    * ``frames`` (8): default number of frames; stored as the video processor's
      ``num_frames`` and used by :func:`make_inputs` to subsample longer clips.

    Unknown override names raise ``TypeError``.

    Example benchmark-shaped model (same as ``build("llava_onevision", **BENCHMARK_SHAPE)``)::

        build("llava_onevision", hidden_size=256, num_hidden_layers=8, frames=32,
              image_size=112, patch_size=4)
    """
    import transformers

    config, processor = build_config(family, **overrides)
    model_cls = getattr(transformers, _MODEL_CLASSES[family])
    # Weight init draws from torch's CPU generator only; fork it so callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    processor.tokenizer.padding_side = "left"
    return model, processor


def build_clip(
    *, seed: int = 0, image_size: int = 32, patch_size: int = 4, hidden_size: int = 32, projection_dim: int = 24
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random ``CLIPModel`` with a real ``CLIPProcessor`` (``CLIPTokenizer`` over bytes), fully offline.

    For tests and benchmarks of :class:`tokcompress.scorers.CLIPScorer`. The tokenizer's vocabulary is
    the 256 byte characters, each also with CLIP's word-end marker ``</w>``, and the two specials; the
    vision tower sees ``image_size`` pixels in ``patch_size`` patches (8x8 patches by default).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    table = _byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for b in range(256):
        vocab[table[b] + "</w>"] = 256 + b
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = 512, 513
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    width = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
            **width,
        ),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **width),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), processor


# --------------------------------------------------------------------------- #
# Inputs                                                                       #
# --------------------------------------------------------------------------- #


def _uniform_subsample(video: np.ndarray, n: int) -> np.ndarray:
    if n <= 0 or len(video) <= n:
        return video
    idx = np.linspace(0, len(video) - 1, n).round().astype(np.int64)
    return video[idx]


def make_inputs(
    processor: ProcessorMixin,
    videos: list[np.ndarray] | np.ndarray,
    questions: list[str] | str,
    *,
    padding_side: str = "left",
    fps: float = DEFAULT_FPS,
    num_frames: int | None = None,
) -> BatchFeature:
    """Tokenize one chat turn ``<video> + question`` per batch row and process the videos.

    ``videos`` is one (F, H, W, 3) uint8 array or a list of them (one per row);
    ``questions`` one string or one per row (a single string/video is
    broadcast). Clips longer than ``num_frames`` (default: the processor's
    ``video_processor.num_frames``) are uniformly subsampled first. ``fps`` is
    the frame rate the given frames were sampled at; it becomes the video
    metadata that Qwen3-VL/SmolVLM print as timestamps and that Qwen2.5-VL
    uses for ``second_per_grid_ts``.

    Returns the processor's :class:`~transformers.BatchFeature` (torch
    tensors), padded on ``padding_side``.
    """
    family_of(processor)  # fail early on processors of other families
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        videos = [videos]
    videos = list(videos)
    if isinstance(questions, str):
        questions = [questions]
    questions = list(questions)
    if len(videos) == 1 and len(questions) > 1:
        videos = videos * len(questions)
    if len(questions) == 1 and len(videos) > 1:
        questions = questions * len(videos)
    if len(videos) != len(questions):
        raise ValueError(f"{len(videos)} videos but {len(questions)} questions")

    limit = num_frames if num_frames is not None else getattr(processor.video_processor, "num_frames", None)
    videos = [_uniform_subsample(np.asarray(v), int(limit)) if limit else np.asarray(v) for v in videos]

    texts = []
    for q in questions:
        conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}]
        texts.append(processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))

    kwargs: dict[str, Any] = dict(padding=True, padding_side=padding_side, return_tensors="pt")
    metadata = [
        {
            "total_num_frames": len(v),
            "fps": float(fps),
            "duration": len(v) / float(fps),
            "frames_indices": list(range(len(v))),
            "height": int(v.shape[1]),
            "width": int(v.shape[2]),
        }
        for v in videos
    ]
    # Frames are already sampled: stop processors (Qwen3-VL samples by default) from resampling.
    return processor(text=texts, videos=videos, video_metadata=metadata, do_sample_frames=False, **kwargs)
