"""The embedded tiny bases, built from configs: a small LLaVA (tiny CLIP vision tower + tiny
Llama) with a byte-level BPE tokenizer trained locally and a PIL-backed processor. Untrained;
``python -m leaml pretrain-tiny`` (leaml/tiny/pretrain.py) trains and saves them.

Also a tiny random model of a second family (Idefics3, SmolVLM's architecture), built the same
way and never trained: ``python -m leaml build-tiny --arch idefics3 --out DIR`` saves it as a
folder that ``--base-model DIR`` takes, to check that every stage runs on more than LLaVA."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from leaml.engine.processors import without_video
from leaml.tiny.corpus import tokenizer_texts

# A simple user/assistant template; the image placeholder goes in the user turn. The
# generation prompt ends with a newline so the answer's first token never merges with it.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\\n' }}{% else %}{{ 'ASSISTANT:\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:\\n' }}{% endif %}"
)



@dataclass
class TinyConfig:
    """Shape of the tiny LLaVA. Defaults are the committed base (~3M parameters)."""
    image_size: int = 96          # input resolution (pixels, square)
    patch_size: int = 32          # 96/32 -> 3x3 = 9 image tokens, one per 3x3-grid cell
    vision_hidden: int = 128      # CLIP width
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 384
    text_hidden: int = 128        # Llama width
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 384
    vocab_size: int = 2048        # byte-level BPE target size
    max_positions: int = 256


def build_tokenizer(vocab_size: int = 2048, texts: list[str] | None = None, *,
                    eos: str = "</s>", extra: tuple[str, ...] = ()):
    """Train a byte-level BPE tokenizer locally; any unicode text encodes (bytes fallback).
    ``eos`` names the end-of-turn token, ``extra`` adds special tokens a processor needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", eos, "<unk>", "<image>", *extra]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts if texts is not None else tokenizer_texts(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                  eos_token=eos, unk_token="<unk>",
                                  extra_special_tokens={"image_token": "<image>"})
    tok.padding_side = "left"
    return tok


def build_processor(cfg: TinyConfig, tokenizer):
    """CLIPImageProcessorPil + tokenizer + chat template in a LlavaProcessor."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    ip = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                               crop_size={"height": cfg.image_size, "width": cfg.image_size})
    # "default" strategy drops CLS: exactly (image/patch)^2 image tokens, matching the model.
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=TINY_CHAT_TEMPLATE)


def _text_shape(cfg, tok) -> dict:
    """The tiny language model's shape and special tokens, shared by every tiny family."""
    return dict(vocab_size=len(tok), hidden_size=cfg.text_hidden,
                intermediate_size=cfg.text_mlp, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
                max_position_embeddings=cfg.max_positions, tie_word_embeddings=True,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llama_text(cfg, tok):
    """The tiny Llama language model's config (LLaVA's and Idefics3's text model)."""
    from transformers import LlamaConfig  # transformers: loaded when a base is built
    return LlamaConfig(**_text_shape(cfg, tok))


def build_tiny(seed: int = 0, **overrides):
    """An untrained tiny LLaVA ``(model, processor)`` from configs; overrides go to TinyConfig."""
    from transformers import (CLIPVisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    cfg = TinyConfig(**overrides)
    tok = build_tokenizer(cfg.vocab_size)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_mlp,
                              num_hidden_layers=cfg.vision_layers,
                              num_attention_heads=cfg.vision_heads, image_size=cfg.image_size,
                              patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    text = _llama_text(cfg, tok)
    n_img = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=n_img, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    return model.eval(), build_processor(cfg, tok)


# --- a second architecture family, for checking that nothing assumes LLaVA -----------------

# SmolVLM's turn format: "User:<image> question<end_of_utterance>\nAssistant: answer...". The
# generation prompt ends with a newline, as the tiny LLaVA's does.
IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}{{ ':' }}"
    "{% if message['role'] == 'assistant' %}{{ '\\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
    "{% elif c['type'] == 'text' %}{% if message['role'] == 'user' %}{{ ' ' }}{% endif %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)


@dataclass
class TinyIdefics3Config:
    """Shape of a tiny random Idefics3 (SmolVLM's architecture: SigLIP-style vision tower,
    pixel-shuffle connector, Llama). 96 px in 16 px patches, 6x6 patches shuffled by 2 ->
    9 image tokens; ~0.3M parameters."""
    image_size: int = 96
    patch_size: int = 16
    scale_factor: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 128
    vocab_size: int = 1024
    max_positions: int = 256


def build_tiny_idefics3(seed: int = 0, **overrides):
    """An untrained tiny Idefics3 ``(model, processor)`` from configs: the PIL image processor
    (no image splitting: one fixed-size view per image), a locally trained tokenizer holding
    Idefics3's image tokens, and a chat template; overrides go to TinyIdefics3Config."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor,
                              Idefics3VisionConfig)
    cfg = TinyIdefics3Config(**overrides)
    grid = cfg.image_size // cfg.patch_size
    if grid % cfg.scale_factor:
        raise ValueError(f"image_size/patch_size = {grid} patches a side must divide by "
                         f"scale_factor {cfg.scale_factor}")
    tok = build_tokenizer(cfg.vocab_size, eos="<end_of_utterance>",
                          extra=("<fake_token_around_image>", "<global-img>",
                                 *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))))
    vision = Idefics3VisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_mlp,
                                  num_hidden_layers=cfg.vision_layers,
                                  num_attention_heads=cfg.vision_heads,
                                  image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = _llama_text(cfg, tok)
    config = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                            scale_factor=cfg.scale_factor, tie_word_embeddings=True,
                            image_token_id=tok.convert_tokens_to_ids("<image>"),
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    ip = Idefics3ImageProcessorPil(size={"longest_edge": cfg.image_size},
                                   max_image_size={"longest_edge": cfg.image_size},
                                   do_image_splitting=False)
    processor = Idefics3Processor(image_processor=ip, tokenizer=tok,
                                  image_seq_len=grid ** 2 // cfg.scale_factor ** 2,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    return model.eval(), processor


# Qwen2-VL's turn format ("<|im_start|>user\n<|vision_start|><image><|vision_end|>question
# <|im_end|>\n<|im_start|>assistant\n"); the tokenizer's image token is "<image>".
QWEN2_VL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<|vision_start|><image><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class TinyQwen2VLConfig(TinyIdefics3Config):
    """Shape of a tiny random Qwen2-VL (3-D rotary positions, flattened patches with a patch
    grid). Every image is one 96 px square view (min_pixels = max_pixels = 96*96) in 16 px
    patches, 6x6 patches merged by 2 -> 9 image tokens; ~0.4M parameters."""
    scale_factor: int = 2  # spatial_merge_size


def build_tiny_qwen2_vl(seed: int = 0, **overrides):
    """An untrained tiny Qwen2-VL ``(model, processor)`` from configs: the PIL image processor
    at one fixed resolution (min_pixels = max_pixels), a locally trained tokenizer holding
    Qwen2-VL's special tokens, a chat template, and no video processor (Qwen2-VL's needs
    torchvision; :mod:`leaml.engine.processors` loads the folder without one)."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil, Qwen2VLProcessor)
    cfg = TinyQwen2VLConfig(**overrides)
    factor = cfg.patch_size * cfg.scale_factor
    if cfg.image_size % factor:
        raise ValueError(f"image_size {cfg.image_size} must divide by patch_size * "
                         f"scale_factor = {factor}")
    tok = build_tokenizer(cfg.vocab_size, eos="<|im_end|>",
                          extra=("<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                                 "<|video_pad|>"))
    head = cfg.text_hidden // cfg.text_heads // 2  # rotary frequencies, split (t, h, w)
    text = dict(_text_shape(cfg, tok),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [head - 2 * (head // 3), head // 3, head // 3]})
    vision = dict(depth=cfg.vision_layers, embed_dim=cfg.vision_hidden,
                  hidden_size=cfg.text_hidden, num_heads=cfg.vision_heads,
                  mlp_ratio=cfg.vision_mlp // cfg.vision_hidden, patch_size=cfg.patch_size,
                  spatial_merge_size=cfg.scale_factor, temporal_patch_size=2)
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           image_token_id=ids("<image>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    pixels = cfg.image_size ** 2
    ip = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels,
                                  patch_size=cfg.patch_size, merge_size=cfg.scale_factor,
                                  temporal_patch_size=2)
    processor = without_video(Qwen2VLProcessor)(image_processor=ip, tokenizer=tok,
                                                chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return model.eval(), processor


# family -> builder of an untrained tiny (model, processor); ``python -m leaml build-tiny``
TINY_ARCHS = {"llava": build_tiny, "idefics3": build_tiny_idefics3,
              "qwen2_vl": build_tiny_qwen2_vl}


def build_tiny_arch(arch: str, seed: int = 0, **overrides):
    """An untrained tiny ``(model, processor)`` of family ``arch`` (a key of TINY_ARCHS)."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {', '.join(TINY_ARCHS)}")
    return TINY_ARCHS[arch](seed, **overrides)
