"""Load, prompt, encode and generate with any image-text-to-text model, tiny or real.

One code path for every model: ``AutoModelForImageTextToText`` + ``AutoProcessor``, prompts
from the processor's chat template, loss on the answer tokens (+ eos) only, answers from
``generate()``. Where architectures differ (where the language model lives, which Linear
layers LoRA targets and which count as "neurons", how pixel values are laid out), the small
``ARCH_SPECS`` registry keyed by ``config.model_type`` says how; nothing here branches on
model names.

The embedded bases are small LLaVAs (tiny CLIP vision tower + tiny Llama, byte-level BPE
tokenizer) built by :func:`leaml.tiny.build.build_tiny` and pretrained by ``python -m leaml pretrain-tiny``
(leaml/tiny/pretrain.py): ``tiny`` (``leaml/tiny/assets/tiny``, 32 px patches, 9 image tokens) and the
default ``tiny16`` (the same model re-cut into 16 px patches, 36 image tokens, and pretrained
further; its PRETRAIN.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from leaml.config import DEFAULT_BASE
from leaml.engine import processors
from leaml.engine.processors import PatchLayout

TINY_DIR = Path(__file__).resolve().parents[1] / "tiny" / "assets" / "tiny"
# embedded bases by name: "tiny16" is "tiny" re-cut into 16 px patches (36 image tokens) and
# pretrained further (assets/tiny16/PRETRAIN.md). It is the default: its four times finer grid
# lifts the demo oracle past 90% (bench/RESULTS.md). The names never change what they load:
# a stored run names its base, and LoRA adapters only fit the base they were trained on.
EMBEDDED = {"tiny": TINY_DIR, "tiny16": TINY_DIR.parent / "tiny16"}
IGNORE_INDEX = -100

# --- architecture registry ------------------------------------------------------------------

@dataclass(frozen=True)
class ArchEntry:
    """How one architecture family (keyed by config.model_type) is laid out."""
    language_model: tuple[str, ...]  # candidate attribute paths from the top-level model
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                     "gate_proj", "up_proj", "down_proj")
    neuron_modules: tuple[str, ...] = ("o_proj", "down_proj")  # attention-out + MLP-out
    # Several questions about one image may share one sequence (image prefix computed once,
    # each QA block masked off from the others, 1-D positions restarting after the prefix).
    # Only where positions are plain 1-D and pixel_values one tensor per image.
    packable: bool = False
    # None: the processor gives pixel_values one tensor per image (N, C, H, W) or (N, V, C,
    # H, W). Else how it flattens the patches of all images into one tensor (PatchLayout).
    patches: PatchLayout | None = None


_LLAMA_LIKE = ArchEntry(("model.language_model", "language_model", "model.text_model"))
_QWEN_VL = ArchEntry(_LLAMA_LIKE.language_model, patches=PatchLayout())
ARCH_SPECS: dict[str, ArchEntry] = {
    "llava": ArchEntry(_LLAMA_LIKE.language_model, packable=True),
    "llava_next": _LLAMA_LIKE, "llava_onevision": _LLAMA_LIKE,
    "qwen2_vl": _QWEN_VL, "qwen2_5_vl": _QWEN_VL, "qwen3_vl": _QWEN_VL,
    "paligemma": _LLAMA_LIKE, "gemma3": _LLAMA_LIKE, "mistral3": _LLAMA_LIKE,
    "idefics3": ArchEntry(("model.text_model",)), "smolvlm": ArchEntry(("model.text_model",)),
}
_DEFAULT_ENTRY = ArchEntry(("model.language_model", "language_model", "model.text_model",
                            "text_model"))


@dataclass
class ArchSpec:
    """Resolved layout of one loaded model.

    ``lora_targets`` and ``neuron_modules`` are full module names (as in
    ``model.named_modules()``) inside the language model only, so a peft ``LoraConfig(
    target_modules=spec.lora_targets)`` never touches the vision tower or projector.
    """
    model_type: str
    language_model: torch.nn.Module
    language_model_prefix: str
    lora_targets: list[str] = field(default_factory=list)
    neuron_modules: list[str] = field(default_factory=list)


def arch_entry(model) -> ArchEntry:
    """The registry entry of ``model`` (peft-wrapped too), by its config.model_type."""
    base = getattr(model, "get_base_model", lambda: model)()
    return ARCH_SPECS.get(getattr(base.config, "model_type", ""), _DEFAULT_ENTRY)


def packable(model) -> bool:
    """True when several QA pairs of one image may train in one packed sequence."""
    return arch_entry(model).packable


def patch_layout(processor) -> PatchLayout | None:
    """The registry's :class:`PatchLayout` whose grid this processor's image processor outputs
    (None: one pixel tensor per image, the layout of LLaVA and Idefics3)."""
    names = getattr(getattr(processor, "image_processor", None), "model_input_names", None) or ()
    return next((e.patches for e in ARCH_SPECS.values()
                 if e.patches is not None and e.patches.grid in names), None)


def _get_path(model: torch.nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def arch_spec(model) -> ArchSpec:
    """The registry entry for ``model`` (by config.model_type) resolved to real modules."""
    mtype = getattr(model.config, "model_type", "")
    entry = ARCH_SPECS.get(mtype, _DEFAULT_ENTRY)
    base = getattr(model, "get_base_model", lambda: model)()  # peft-wrapped models too
    for path in entry.language_model:
        lm = _get_path(base, path)
        if isinstance(lm, torch.nn.Module):
            break
    else:
        raise ValueError(f"model_type {mtype!r}: no language model at any of "
                         f"{entry.language_model}; add an entry to leaml.engine.models.ARCH_SPECS")
    prefix = next(n for n, m in base.named_modules() if m is lm)
    linears = [n for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")]
    leaf = lambda n: n.rsplit(".", 1)[-1]  # noqa: E731
    return ArchSpec(mtype, lm, prefix,
                    [n for n in linears if leaf(n) in entry.lora_targets],
                    [n for n in linears if leaf(n) in entry.neuron_modules])


# --- loading and saving ---------------------------------------------------------------------

def resolve_ref(ref: str) -> str:
    """``"tiny"``/``"tiny16"`` -> the embedded base's folder; a Hugging Face id or local path
    unchanged."""
    return str(EMBEDDED.get(ref, ref))


# --- where models run: one rule for every stage ------------------------------------------------

DEVICE_ENV = "LEAML_DEVICE"  # set by --device of the CLI commands and the job kinds' 'device'
DTYPE_ENV = "LEAML_DTYPE"    # set by --dtype: the inference stages' dtype ('auto' or unset: below)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """Where models load and run, training and inference alike: ``requested`` ('cpu',
    'cuda', 'cuda:1' ...), else $LEAML_DEVICE, else accelerate's choice: the CPU under
    ACCELERATE_USE_CPU, else this process's GPU when there is one (cuda:LOCAL_RANK under
    ``accelerate launch``), else Apple's mps, else the CPU. 'auto' means no request."""
    name = str(requested or os.environ.get(DEVICE_ENV) or "auto")
    if name != "auto":
        return torch.device(name)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def training_device() -> torch.device:
    """The rule's device, for training's Accelerator. In a plain process told a GPU index
    ('cuda:1') that GPU becomes the current one: accelerate's device there is plain 'cuda', the
    current GPU. Under ``accelerate launch`` accelerate sets each process's GPU itself."""
    where = resolve_device()
    plain = os.environ.get("WORLD_SIZE", "1") == "1"
    if where.type == "cuda" and where.index is not None and plain:
        torch.cuda.set_device(where)
    return where


def inference_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype of evaluation, sampling, captioning and serving: $LEAML_DTYPE when set (not
    'auto'), else bfloat16 on a CUDA device that supports it, else float32. Training loads
    float32 weights (accelerate's ``mixed_precision`` decides its compute dtype)."""
    name = os.environ.get(DTYPE_ENV) or "auto"
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"{DTYPE_ENV}={name!r}: use auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    dev = resolve_device(device)
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def placement(model) -> str:
    """'cuda:0, torch.bfloat16': where a model's parameters are and in which dtype."""
    p = next(model.parameters())
    return f"{p.device}, {p.dtype}"


def load(ref: str = DEFAULT_BASE, *, device: str | torch.device | None = None,
         dtype: torch.dtype | None = torch.float32, inference: bool = False):
    """Load ``(model, processor)`` from a ref (tiny / HF id / local folder), in eval mode.

    On :func:`resolve_device`'s device unless told another; float32 (what training wants)
    unless told another dtype, or with ``inference`` the :func:`inference_dtype` of that
    device. Logs where it went. Only local files are used: a Hugging Face id must already be
    in the local cache.
    """
    from transformers import AutoModelForImageTextToText
    device = resolve_device(device)
    dtype = inference_dtype(device) if inference else (dtype or torch.float32)
    path = resolve_ref(ref)
    if ref in EMBEDDED and not (EMBEDDED[ref] / "config.json").exists():
        raise FileNotFoundError(f"{EMBEDDED[ref]} holds no model; run `python -m leaml "
                                "pretrain-tiny` (PRETRAIN.md says how it was made)")
    processor = processors.load(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    if str(device) == "cpu" and _short_image_sequence(model):
        # tiny16's 37 tokens: plain attention beats SDPA's kernels (vision warmup 1.06x)
        model.set_attn_implementation({"vision_config": "eager"})
    _configure_padding(processor)
    model = model.to(device).eval()
    log.info("model %s on %s", ref, placement(model))
    return model, processor


def _short_image_sequence(model, most: int = 64) -> bool:
    """True when the vision tower reads at most ``most`` patches (the embedded bases and every
    folder trained from them; real models read hundreds)."""
    vc = getattr(model.config, "vision_config", None)
    size, patch = getattr(vc, "image_size", None), getattr(vc, "patch_size", None)
    return isinstance(size, int) and isinstance(patch, int) and (size // patch) ** 2 <= most


def save(model, processor, out_dir) -> Path:
    """save_pretrained model and processor into ``out_dir`` (reloadable by :func:`load`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _configure_padding(processor) -> None:
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"


# --- prompts and batches ---------------------------------------------------------------------

def prompt_text(processor, instruction: str) -> str:
    """The chat-template prompt for one image + ``instruction``, ending where the answer starts."""
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": instruction}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _as_rgb(img) -> Image.Image:
    if isinstance(img, (str, Path)):
        with Image.open(img) as im:
            return im.convert("RGB")
    return img.convert("RGB")


def views(processor, images) -> list[Image.Image]:
    """RGB images as the processor takes them: for a :class:`PatchLayout` each resized to its
    fixed square view (so every image has the same number of image tokens), else as they are."""
    rgb = [_as_rgb(im) for im in images]
    layout = patch_layout(processor)
    if layout is None:
        return rgb
    side = layout.side(processor.image_processor)
    return [im if im.size == (side, side) else im.resize((side, side), Image.BICUBIC)
            for im in rgb]


def _dummy_images(processor, n: int) -> list[Image.Image]:
    """Images of the processor's input size: for fixed-resolution processors the prompt's
    image-token expansion depends on nothing else, so text can be encoded without images."""
    ip = processor.image_processor
    layout = patch_layout(processor)
    if layout is not None:
        side = layout.side(ip)
        return [Image.new("RGB", (side, side))] * n
    crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
    h = crop.get("height") or crop.get("shortest_edge") or 224
    w = crop.get("width") or h
    return [Image.new("RGB", (w, h))] * n


def _prompt_batch(processor, images, instructions) -> tuple[list[list[int]], dict]:
    """Expanded prompt ids per example (unpadded) and the processor's image tensors."""
    prompts = [prompt_text(processor, i) for i in instructions]
    out = processor(images=views(processor, images), text=prompts,
                    add_special_tokens=False, return_tensors="pt", padding=True)
    ids = [row[m.bool()].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
    extra = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    return ids, extra


def _collate(processor, prompt_ids, targets, side: str) -> dict:
    """Prompt (+ target + eos) ids padded on ``side``; labels only on target + eos."""
    tok = processor.tokenizer
    rows, labels = [], []
    for i, p in enumerate(prompt_ids):
        t = [] if targets is None else tok(targets[i], add_special_tokens=False)["input_ids"]
        t = t + [tok.eos_token_id] if targets is not None else t
        rows.append(p + t)
        labels.append([IGNORE_INDEX] * len(p) + t)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for r, lab in zip(rows, labels):
        n = width - len(r)
        fill = (lambda x, v: [v] * n + x) if side == "left" else (lambda x, v: x + [v] * n)
        batch["input_ids"].append(fill(r, pad))
        batch["attention_mask"].append(fill([1] * len(r), 0))
        batch["labels"].append(fill(lab, IGNORE_INDEX))
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if targets is None:
        del out["labels"]
    return out


def encode(processor, images, instructions, targets=None, *, padding_side: str = "right") -> dict:
    """A training/eval batch: input_ids, attention_mask, pixel_values (+ labels with targets).

    Labels are -100 on the prompt, the image tokens and padding: the loss sees the target
    tokens and the eos only. Right padding by default (positions then start at 0 for every
    row, as in generation with left padding, where positions come from the attention mask).
    """
    ids, extra = _prompt_batch(processor, images, instructions)
    out = {**_collate(processor, ids, targets, padding_side), **extra}
    layout = patch_layout(processor)
    if layout is not None:  # the token types follow the ids as padded here
        out[layout.token_types] = _token_types(processor, out["input_ids"])
    return out


def _token_types(processor, input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids == processor.image_token_id).long()


def pixel_values(processor, images) -> torch.Tensor:
    """Images preprocessed once, one row per image, shape (N, C, H, W) (or (N, V, C, H, W)
    where the processor cuts V views of each image, as Idefics3's does; or (N, P, F), P
    patches of F features, for a :class:`PatchLayout`): cache these, pair them with
    encode_text, and give a batch of rows to the model through :func:`image_inputs`. Each
    image goes in as its own sample (a nested list), so a processor that takes several images
    per sample never folds the batch into one sample."""
    out = processor.image_processor([[im] for im in views(processor, images)],
                                    return_tensors="pt")
    layout = patch_layout(processor)
    if layout is None:
        return out["pixel_values"]
    grids = out[layout.grid]
    if len(grids) != len(images) or not bool((grids == grids[0]).all()):
        raise ValueError(f"the processor gave patch grids {grids.tolist()} for {len(images)} "
                         "images of one size; the cache needs one fixed-size view per image")
    return out["pixel_values"].reshape(len(images), -1, out["pixel_values"].shape[-1])


def image_inputs(processor, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 model=None) -> dict:
    """The model's image inputs for a batch: ``pixel_values`` rows of :func:`pixel_values`,
    one per row of ``input_ids``. One tensor per image: ``{"pixel_values": rows}``; for a
    :class:`PatchLayout` the rows' patches flattened, each view's grid and the token types.
    With ``model``: on its device, pixel values in its dtype."""
    out = {"pixel_values": pixel_values}
    layout = patch_layout(processor)
    if layout is not None:
        grid = layout.grid_row(processor.image_processor)
        out = {"pixel_values": pixel_values.reshape(-1, pixel_values.shape[-1]),
               layout.grid: torch.tensor([grid] * len(pixel_values), dtype=torch.long),
               layout.token_types: _token_types(processor, input_ids)}
    if model is not None:
        out = {k: v.to(model.device) for k, v in out.items()}
        out["pixel_values"] = out["pixel_values"].to(model.dtype)
    return out


def encode_text(processor, instructions, targets=None, *, padding_side: str = "right") -> dict:
    """:func:`encode` without pixel_values, for pairing with cached :func:`pixel_values`.

    Valid for fixed-resolution image processors (the image-token count does not depend on
    the image), which covers LLaVA-style models such as the tiny base.
    """
    ids, _ = _prompt_batch(processor, _dummy_images(processor, len(instructions)), instructions)
    return _collate(processor, ids, targets, padding_side)


# --- generation ------------------------------------------------------------------------------

@dataclass
class Generation:
    """One generated answer: text, its token ids (eos excluded) and their log-probabilities."""
    text: str
    token_ids: list[int]
    token_logprobs: list[float]


def _stop_ids(model, tok) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    return ids | {tok.eos_token_id}


def _generate_batch(model, processor, images_or_pv, instructions, gen_kwargs):
    tok = processor.tokenizer
    if isinstance(images_or_pv, torch.Tensor):  # cached pixel values (fixed-resolution models)
        batch = encode_text(processor, instructions, padding_side="left")
        batch.update(image_inputs(processor, images_or_pv, batch["input_ids"]))
    else:  # the processor's own outputs, whatever extra keys the model needs
        batch = encode(processor, images_or_pv, instructions, padding_side="left")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**batch, output_logits=True, return_dict_in_generate=True,
                             **gen_kwargs)
    new = out.sequences[:, batch["input_ids"].shape[1]:]  # (B*R, T)
    # raw logits -> the model's own log-probabilities, whatever the sampling settings
    logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B*R, T, V)
    tok_logp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    stops, r = _stop_ids(model, tok), gen_kwargs["num_return_sequences"]
    gens = []
    for ids, lps in zip(new.tolist(), tok_logp.tolist()):
        end = next((j for j, t in enumerate(ids) if t in stops), len(ids))
        gens.append(Generation(tok.decode(ids[:end], skip_special_tokens=True).strip(),
                               ids[:end], lps[:end]))
    return [gens[i * r:(i + 1) * r] for i in range(len(instructions))]


def generate(model, processor, images_or_pixel_values, instructions, *, max_new_tokens=32,
             do_sample=False, temperature=1.0, top_p=1.0, num_return_sequences=1, seed=None,
             batch_size=32) -> list[list[Generation]]:
    """Answer ``instructions`` about images: per input, ``num_return_sequences`` generations.

    Inputs are left padded and run in chunks of ``batch_size``. ``token_logprobs`` are the
    model's log-probabilities of each generated token (log-softmax of generate()'s raw
    logits), e.g. for LEAML's pseudo-QA confidence. Images may be PIL images, paths, or a
    cached pixel_values tensor (N, C, H, W).
    """
    if isinstance(instructions, str):
        instructions = [instructions]
    items = images_or_pixel_values
    if not isinstance(items, torch.Tensor):
        items = list(items)
    if len(items) != len(instructions):
        raise ValueError(f"{len(items)} images but {len(instructions)} instructions; "
                         "pass one instruction per image")
    if seed is not None:
        torch.manual_seed(seed)
    tok = processor.tokenizer
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
              num_return_sequences=num_return_sequences,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p)
    model.eval()
    results = []
    for i in range(0, len(instructions), batch_size):
        results += _generate_batch(model, processor, items[i:i + batch_size],
                                   instructions[i:i + batch_size], kw)
    return results


def count_params(module: torch.nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())

