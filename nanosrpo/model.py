"""Policy + processor: load by path or hub id, build the tiny offline world's model, freeze, save.

One loading path for everything: the tiny model this module builds is saved with `save_pretrained` and read back by
`load_policy`, exactly as Qwen/Qwen2.5-VL-7B-Instruct is. The tiny model is a real `Qwen2_5_VLForConditionalGeneration`
(vision tower, merger, M-RoPE language model), only small, with a byte-level BPE tokenizer trained on the synthetic
task's own text and Qwen's special tokens and chat template.

Processors without torchvision: the stock Qwen2.5-VL processor also builds a *video* processor, which needs torchvision;
there is no CPU torchvision on the registry and the CUDA one breaks transformers' model imports on a CPU torch. So when
torchvision is missing we assemble the same processor class with video_processor=None (images go through the PIL
backend of the Qwen2-VL image processor, which gives the same patches); when it is present we use AutoProcessor.
"""

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = [  # Qwen2's special tokens, in Qwen's order; ids follow the base vocabulary as in the real tokenizer
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template (same rendering as the released one for text and image turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: letters, single digits, punctuation runs, whitespace.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Image size bounds for the tiny world: grids are 3-6 cells of 28 px, so every image keeps its native size.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 28 * 28 * 36


@dataclass
class TinySize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_intermediate: int


# Named by parameter count (build_tiny returns the exact number). "1m" is the default tiny policy.
TINY_SIZES = {
    "0.2m": TinySize(64, 2, 4, 2, 256, 32, 2, 2, 64),
    "1m": TinySize(128, 4, 4, 2, 512, 64, 2, 4, 128),
    "10m": TinySize(256, 8, 8, 4, 1024, 128, 2, 4, 256),
}


def use_cpu_cores(accelerator, n_threads: int = 0) -> int:
    """A single CPU process computes on `n_threads` threads (0: every physical core); returns the count in use.

    Why: `accelerate launch` without a config file exports OMP_NUM_THREADS=1 to the script, which halves the speed of
    the default tiny run on a 2-core machine. Several processes on one CPU (DDP over gloo) keep the launcher's share.
    """
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1:
        import psutil  # an accelerate dependency

        torch.set_num_threads(n_threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    return torch.get_num_threads()


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


# ----------------------------------------------------------------------------------------------------- loading
def resolve(name_or_path: str) -> str:
    """A local directory for a model path or hub id; a clear error instead of retries when the hub is unreachable."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.startswith((os.sep, ".", "~")) or name_or_path.count("/") > 1:  # a path, not a hub id
        raise OSError(f"model '{name_or_path}': no such directory")
    from huggingface_hub import snapshot_download

    try:  # already in the local HF cache? (no network needed)
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise OSError(f"model '{name_or_path}': not a local directory and not in the HF cache (HF_HUB_OFFLINE=1).")
    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as e:
        raise OSError(
            f"model '{name_or_path}': not a local directory, not in the HF cache, and downloading it failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Download it where there is network "
            f"(`hf download {name_or_path} --local-dir DIR`) and pass DIR instead."
        ) from None


def load_processor(path: str):
    """The processor for a local model dir: a multimodal processor for VL models, the tokenizer for text-only ones."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if "vision_config" not in config.to_dict():
        tok = AutoTokenizer.from_pretrained(path)
        return tok
    if has_torchvision():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    from transformers import AutoImageProcessor

    tok = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
    template = tok.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):  # where processors keep it in real checkpoints
        p = Path(path) / name
        if p.exists():
            template = p.read_text() if name.endswith(".jinja") else json.loads(p.read_text())["chat_template"]
            break
    return image_only_processor(image_processor, tok, template)


def image_only_processor(image_processor, tokenizer, chat_template):
    """The stock Qwen2.5-VL processor class minus its video part (which needs torchvision).

    ProcessorMixin takes its sub-processors from the names in __init__'s signature, so a subclass whose __init__ has no
    `video_processor` gets exactly the stock text+image behaviour without ever building a video processor.
    """
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def save_pretrained(self, save_directory, **kwargs):
            # Save the parts the way a real checkpoint stores them, so AutoProcessor (with torchvision) loads the dir.
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)
            (Path(save_directory) / "chat_template.jinja").write_text(self.chat_template)

    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def load_policy(name_or_path: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """(model, processor) for a local path or hub id. Qwen2.5-VL / Qwen2-VL or a text-only causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForImageTextToText if "vision_config" in config.to_dict() else AutoModelForCausalLM
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = cls.from_pretrained(path, dtype=dtype, **kw)
    return model, load_processor(path)


def is_multimodal(model) -> bool:
    return hasattr(model.config, "vision_config")


def freeze_vision(model) -> int:
    """Freeze the vision tower and merger (`visual.*`), as the reference runs do. Returns the number of frozen tensors."""
    n = 0
    for name, p in model.named_parameters():
        if ".visual." in f".{name}":
            p.requires_grad_(False)
            n += 1
    return n


def save_policy(model, processor, out_dir: str | Path) -> None:
    """save_pretrained of model (safetensors) and processor, loadable by transformers and vLLM."""
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------------- tiny world
def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A Qwen-style byte-level BPE trained on `texts`, with Qwen's special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, special_tokens=[]
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",  # generation pads on the left; collators set what they need explicitly
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def tiny_configs(tok, size: TinySize, max_positions: int = 2048):
    """The Qwen2.5-VL config and its text-only Qwen2 twin's config, both small, sharing the tokenizer's ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = size.hidden // size.heads
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); Qwen uses [16, 24, 24] for head_dim 128.
    h = head_dim // 2
    mrope = [h // 4, (h - h // 4) // 2, h - h // 4 - (h - h // 4) // 2]
    text = dict(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vl = Qwen2_5_VLConfig(
        text_config={**text, "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0}},
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_intermediate,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[size.vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    twin = Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return vl, twin


def tiny_processor(tok):
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    return image_only_processor(image_processor, tok, CHAT_TEMPLATE)


def build_tiny(out_dir: str | Path, size: str = "1m", seed: int = 0, text_only: bool = False, vocab_size: int = 512) -> dict:
    """Build the tiny world's randomly initialised policy + tokenizer + processor and save them to out_dir.

    text_only=True builds the Qwen2ForCausalLM twin (same tokenizer and text dims) used for vLLM on CPU.
    Returns {"params": int, "seconds": float}. Deterministic given (size, seed).
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    from nanosrpo import prompts, synthetic

    t0 = time.time()
    out_dir = Path(out_dir)
    # The prompts are repeated so BPE learns their words: the system prompt is in every sequence, short is cheap.
    tok = build_tokenizer(synthetic.corpus() + [prompts.SRPO_SYSTEM, prompts.GRPO_SYSTEM] * 200, vocab_size)
    vl_cfg, twin_cfg = tiny_configs(tok, TINY_SIZES[size])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(twin_cfg) if text_only else Qwen2_5_VLForConditionalGeneration(vl_cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    save_policy(model, tok if text_only else tiny_processor(tok), out_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "seconds": time.time() - t0}
