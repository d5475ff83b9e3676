"""Records in, model inputs out: reading + validating JSONL, images, chat rendering, collation.

Two on-disk layouts, both JSONL with images as files next to them (or under --image_dir):
  RL / eval records:  {"id", "question", "image" (path or list of paths, optional), "answer", "choices" (optional)}
  SFT chat records:   {"messages": [{"role", "content": str | [{"type": "image", "image": path} | {"type": "text",
                      "text": str}]}]}  or LLaMA-Factory's sharegpt layout: {"messages" | "conversations": [...],
                      "images": [paths]} with one "<image>" placeholder in the text per image.
Every error names the file, the line and the field, because a bad record found mid-run costs a run.
"""

import functools
import json
import random
from pathlib import Path

import torch
from PIL import Image

IGNORE = -100  # label of tokens that carry no loss (prompt, system, user, image tokens, padding)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """A bad record: the message starts with 'file:line:' and names the field."""


def _read_jsonl(path: Path):
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: a record must be a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _image_path(value, where: str, field: str, image_dir: Path) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field '{field}' must be an image path string, got {value!r}")
    p = Path(value) if Path(value).is_absolute() else image_dir / value
    if not p.is_file():
        raise DataError(f"{where}: field '{field}': image file not found: {p}")
    image_size(p, where, field)  # readable: its header parses (no pixels are decoded)
    return str(p)


def image_size(path, where: str = "", field: str = "image") -> tuple[int, int]:
    """(height, width) of an image file, read from its header: PIL decodes no pixels until they are asked for."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(
            f"{where or path}: field '{field}': cannot read image {path} ({type(e).__name__}: {e})"
        ) from None
    return height, width


def load_rl_records(
    path: str | Path,
    image_dir: str | Path | None = None,
    processor=None,
    system: str = "",
    max_prompt_length: int = 0,
    max_images: int = 0,
) -> list[dict]:
    """Read and validate RL/eval records. Images resolve against image_dir (default: the file's folder).

    Gold answers are checked once here (rewards.validate_gold), never per rollout. So are the limits a record would
    otherwise break hours into a run, on one process, while the others wait for it in a collective: max_images
    (vLLM's images per prompt; 0: no cap) and, given the processor (its pixel bounds set) and the system prompt,
    max_prompt_length (the rendered prompt's tokens, image tokens included; 0: no cap), counted as render_prompt counts
    them but from the images' headers (prompt_lengths), so a large dataset is checked in seconds.
    """
    from nanosrpo.rewards import validate_gold

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    image_dir = Path(image_dir) if image_dir else path.parent
    records, wheres, seen = [], [], set()
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        for field in ("question", "answer"):
            if not isinstance(rec.get(field), (str, int, float)) or str(rec.get(field)).strip() == "":
                raise DataError(f"{where}: field '{field}' is missing or empty")
        rid = str(rec.get("id", f"{path.stem}-{lineno}"))
        if rid in seen:
            raise DataError(f"{where}: field 'id': duplicate id {rid!r}")
        seen.add(rid)
        images = rec.get("image") or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list):
            raise DataError(f"{where}: field 'image' must be a path or a list of paths")
        images = [_image_path(v, where, "image", image_dir) for v in images]
        if max_images and len(images) > max_images:
            raise DataError(f"{where}: field 'image': {len(images)} images, over --vllm_max_images {max_images}")
        choices = rec.get("choices")
        if choices is not None and (not isinstance(choices, list) or not choices or len(choices) > len(LETTERS)):
            raise DataError(f"{where}: field 'choices' must be a non-empty list of at most {len(LETTERS)} options")
        answer = str(rec["answer"]).strip()
        try:
            validate_gold(answer, choices)
        except ValueError as e:
            raise DataError(f"{where}: field 'answer': {e}") from None
        records.append(
            {"id": rid, "question": str(rec["question"]), "images": images, "answer": answer, "choices": choices}
        )
        wheres.append(where)
    if not records:
        raise DataError(f"{path}: no records")
    if processor is not None and max_prompt_length:
        for where, n in zip(wheres, prompt_lengths(processor, system, records)):
            if n > max_prompt_length:
                raise DataError(
                    f"{where}: fields 'question'/'image': the prompt is {n} tokens (images included), "
                    f"over --max_prompt_length {max_prompt_length}; raise it, lower --max_pixels, or drop "
                    f"the record"
                )
    return records


def prompt_lengths(processor, system: str, records: list[dict], chunk: int = 256) -> list[int]:
    """len(render_prompt(rec, system, processor)["ids"]) of each record, without loading an image: the chat text's
    tokens (the tokenizer, a chunk of records at a time), each <|image_pad|> counted as its image's vision tokens
    (image_tokens, from the image's size)."""
    tok = tokenizer_of(processor)
    lengths = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        texts = [prompt_text(rec, system, processor) for rec in part]
        for rec, ids in zip(part, tok(texts, add_special_tokens=False)["input_ids"]):
            sizes = [image_size(p) for p in rec["images"]]
            lengths.append(len(ids) + sum(image_tokens(processor, *hw) - 1 for hw in sizes))
    return lengths


def question_text(rec: dict) -> str:
    """The question as the policy reads it; multiple-choice options are listed as 'A. option' lines."""
    if not rec.get("choices"):
        return rec["question"]
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(rec["choices"]))
    return f"{rec['question']}\nChoices:\n{options}"


def prompt_messages(rec: dict, system: str) -> list[dict]:
    """Chat messages of an RL/eval prompt: the system instruction, then the images and the question."""
    content = [{"type": "image", "image": p} for p in rec["images"]] + [{"type": "text", "text": question_text(rec)}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def render_prompt(rec: dict, system: str, processor) -> dict:
    """An RL record as an engine prompt: the rendered chat text (one <|image_pad|> per image), its images, and the
    expanded token ids the trainer will see (each <|image_pad|> repeated once per vision token)."""
    text = prompt_text(rec, system, processor)
    images = [load_image(p) for p in rec["images"]]
    return {"text": text, "images": images, "ids": encode(processor, text, images)}


def prompt_text(rec: dict, system: str, processor) -> str:
    """The rendered chat text of an RL prompt, ending with the assistant header the policy continues from."""
    return processor.apply_chat_template(prompt_messages(rec, system), tokenize=False, add_generation_prompt=True)


def load_image(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------- SFT records
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt_to_messages(turns: list, images: list[str], where: str) -> list[dict]:
    """LLaMA-Factory sharegpt: '<image>' placeholders in the text take the record's images in order."""
    messages, used = [], 0
    for i, t in enumerate(turns):
        role = _ROLES.get(t.get("role", t.get("from")))
        text = t.get("content", t.get("value"))
        if role is None or not isinstance(text, str):
            raise DataError(f"{where}: field 'messages[{i}]' needs a role/from in {sorted(_ROLES)} and string content")
        parts = text.split("<image>")
        content = []
        for j, part in enumerate(parts):
            if j > 0:
                if used >= len(images):
                    raise DataError(f"{where}: field 'images': more <image> placeholders than images ({len(images)})")
                content.append({"type": "image", "image": images[used]})
                used += 1
            if part:
                content.append({"type": "text", "text": part})
        messages.append({"role": role, "content": text if len(parts) == 1 else content})
    if used != len(images):
        raise DataError(f"{where}: field 'images': {len(images)} images but {used} <image> placeholders")
    return messages


def load_sft_records(path: str | Path, image_dir: str | Path | None = None) -> list[dict]:
    """Read chat records (messages layout or sharegpt) into {"id", "messages"} with absolute image paths."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    image_dir = Path(image_dir) if image_dir else path.parent
    records = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        turns = rec.get("messages", rec.get("conversations"))
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field 'messages' is missing or not a non-empty list")
        if "images" in rec:
            images = [_image_path(v, where, "images", image_dir) for v in rec["images"] or []]
            messages = _sharegpt_to_messages(turns, images, where)
        else:
            messages = []
            for i, m in enumerate(turns):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise DataError(f"{where}: field 'messages[{i}].role' must be system, user or assistant")
                content = m.get("content")
                if isinstance(content, list):
                    content = [dict(c) for c in content]
                    for c in content:
                        if c.get("type") == "image":
                            c["image"] = _image_path(c.get("image"), where, f"messages[{i}].content.image", image_dir)
                        elif c.get("type") != "text" or not isinstance(c.get("text"), str):
                            raise DataError(f"{where}: field 'messages[{i}].content' items are image or text parts")
                elif not isinstance(content, str):
                    raise DataError(f"{where}: field 'messages[{i}].content' must be a string or a list of parts")
                messages.append({"role": m["role"], "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
        records.append({"id": str(rec.get("id", f"{path.stem}-{lineno}")), "messages": messages})
    if not records:
        raise DataError(f"{path}: no records")
    return records


def message_images(messages: list[dict]) -> list[str]:
    return [
        c["image"] for m in messages if isinstance(m["content"], list) for c in m["content"] if c.get("type") == "image"
    ]


# ----------------------------------------------------------------------------------------------------- tokenizing
def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def banned_ids(tokenizer) -> list[int]:
    """Vision placeholder tokens a completion must never contain: a sampled <|image_pad|> would break the
    image-token/feature count of the training forward. Every engine suppresses them while sampling."""
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def encode(processor, text: str, images: list[Image.Image]) -> list[int]:
    """Token ids of rendered chat text, each <|image_pad|> expanded to the image's number of vision tokens: the ids
    processor(text, images) gives, without running the image processor (expand_image_tokens)."""
    ids = tokenizer_of(processor)(text, add_special_tokens=False)["input_ids"]
    return expand_image_tokens(processor, ids, [(im.height, im.width) for im in images])


def image_tokens(processor, height: int, width: int) -> int:
    """Vision tokens of an image of height x width: the image processor's own resize / patch / merge arithmetic
    (smart_resize within its pixel bounds, patch_size patches, merge_size x merge_size merged; the method vLLM uses to
    count placeholders), with no pixel read."""
    ip = processor.image_processor
    try:
        return ip.get_number_of_image_patches(height, width) // ip.merge_size**2
    except ValueError as e:  # smart_resize refuses aspect ratios over 200
        raise DataError(f"an image of {width}x{height} pixels: {e}") from None


def expand_image_tokens(processor, ids: list[int], sizes: list[tuple[int, int]]) -> list[int]:
    """ids with the k-th <|image_pad|> repeated image_tokens(sizes[k]) times, as the processor expands its text.

    The same ids as processor(text, images)["input_ids"] (tests/test_robust.py): <|image_pad|> is a special token, so
    the text around it tokenizes alike whether it stands once or n times."""
    if not sizes:
        return list(ids)
    pad = tokenizer_of(processor).convert_tokens_to_ids("<|image_pad|>")
    at = [i for i, t in enumerate(ids) if t == pad]
    if len(at) != len(sizes):
        raise DataError(f"{len(sizes)} images but {len(at)} <|image_pad|> tokens in the rendered chat")
    out, prev = [], 0
    for i, hw in zip(at, sizes):
        out += ids[prev:i] + [pad] * image_tokens(processor, *hw)
        prev = i + 1
    return out + ids[prev:]


def assistant_mask(ids: list[int], tokenizer) -> list[int]:
    """1 on assistant tokens (content and its closing <|im_end|>), 0 elsewhere.

    Found on the token ids, not on text offsets: an assistant turn is `<|im_start|>assistant\\n ... <|im_end|>` in every
    Qwen chat template, so the span after that header up to and including <|im_end|> is what the model must learn.
    """
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    mask, i, n = [0] * len(ids), 0, len(header)
    while i < len(ids):
        if ids[i : i + n] == header:
            j = i + n
            while j < len(ids) and ids[j] != end:
                mask[j] = 1
                j += 1
            if j < len(ids):
                mask[j] = 1  # the model must learn to stop
            i = j + 1
        else:
            i += 1
    return mask


def tokenize_chat(processor, messages: list[dict]) -> dict:
    """{"input_ids", "loss_mask", "images"} of a full chat (SFT): loss only on assistant tokens."""
    return {**tokenize_chats(processor, [messages])[0], "images": [load_image(p) for p in message_images(messages)]}


def tokenize_chats(processor, chats: list[list[dict]]) -> list[dict]:
    """{"input_ids", "loss_mask"} of each full chat (SFT), tokenized together: the ids encode() gives each one alone.

    Why together: one tokenizer call per chunk of chats uses its batch encoding (train_sft.py tokenizes its whole
    dataset on every process before the first step). No image is decoded or processed: each image's token count
    comes from its size in the file's header (expand_image_tokens); the pixels are read per micro-batch (collate).
    """
    tok = tokenizer_of(processor)
    texts = [processor.apply_chat_template(m, tokenize=False) for m in chats]
    rows = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    sizes = [[image_size(p) for p in message_images(m)] for m in chats]
    ids = [expand_image_tokens(processor, row, hw) for row, hw in zip(rows, sizes)]
    return [{"input_ids": x, "loss_mask": assistant_mask(x, tok)} for x in ids]


def collate(processor, samples: list[dict], pad_side: str = "right", share_images: bool = False) -> dict:
    """Pad samples {"input_ids", "loss_mask", "images"} into model inputs.

    Returns input_ids, attention_mask, loss_mask (1 = a token to learn), labels (IGNORE where loss_mask is 0), and for
    images pixel_values, image_grid_thw and mm_token_type_ids (Qwen2.5-VL needs the last to build M-RoPE positions).
    share_images: images repeated across samples are processed once (see _add_images; for forward.sequence_logprobs).
    """
    tok = tokenizer_of(processor)
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        sl = slice(0, n) if pad_side == "right" else slice(width - n, width)
        ids[b, sl] = torch.tensor(s["input_ids"])
        attn[b, sl] = 1
        loss_mask[b, sl] = torch.tensor(s["loss_mask"])
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
    batch["labels"] = ids.masked_fill(loss_mask == 0, IGNORE)
    return _add_images(batch, processor, samples, share_images)


def _add_images(batch: dict, processor, samples: list[dict], share_images: bool = False) -> dict:
    """pixel_values and image_grid_thw of the samples' images in order, and mm_token_type_ids (1 on image tokens).

    share_images: the n completions of a GRPO group carry the same image objects (their prompt's). Each distinct
    image (by identity) is then processed once and, if some repeat, batch["image_index"] [n_images] says which
    distinct image each occurrence is: pixel_values hold the distinct images only, image_grid_thw stays one row per
    occurrence (the M-RoPE positions and the image-token count read it), and forward.sequence_logprobs runs the vision
    tower once per distinct image (forward.logits_sharing_images). Without repeats the batch is as without sharing.
    """
    images = [im for s in samples for im in s.get("images", [])]
    if images:
        keys = [id(im) if share_images else j for j, im in enumerate(images)]  # ids: all are alive here, so unique
        slot = {}  # key -> its position among the distinct images
        index = [slot.setdefault(k, len(slot)) for k in keys]
        distinct = list(dict(zip(keys, images)).values())  # in order of first appearance, as `slot` numbers them
        vision = processor.image_processor(images=distinct, return_tensors="pt")
        batch["pixel_values"], batch["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"][index]
        if len(distinct) < len(images):
            batch["image_index"] = torch.tensor(index)
        batch["mm_token_type_ids"] = (
            batch["input_ids"] == tokenizer_of(processor).convert_tokens_to_ids("<|image_pad|>")
        ).long()
    return batch


def packed_batch(processor, samples: list[dict], share_images: bool = False) -> dict:
    """A micro-batch without padding: the samples' tokens end to end in one row, for flash-attention's varlen kernel.

    input_ids [1, N] (N = the sum of the samples' lengths) and position_ids [1, N] that restart at 0 at each sample.
    transformers reads every restart as a sequence boundary when no attention_mask is given: flash_attention_2 turns
    them into cu_seqlens (each sample attends only to itself, no pad token is ever computed), sdpa and eager into a
    block-diagonal causal mask (same numbers, no saving). The images of all samples go in order, as in collate, so
    the i-th image's features land on the i-th run of <|image_pad|> tokens. labels [1, N] as in collate, and IGNORE
    on each sample's first token (in the row it would be "predicted" from the previous sample's last token).
    seq_lens [B] says where the samples are; loss_mask stays [B, T] right-padded, because forward.sequence_logprobs
    unpacks the log-probs into that layout, so the loss code does not change. Qwen2.5-VL also needs 3-D M-RoPE
    positions per sample; they depend on the model's config, so forward.packed_position_ids adds them at the forward.
    """
    lens = [len(s["input_ids"]) for s in samples]
    ids = torch.tensor([t for s in samples for t in s["input_ids"]], dtype=torch.long).unsqueeze(0)
    loss_mask = torch.zeros((len(samples), max(lens)), dtype=torch.long)
    for b, s in enumerate(samples):
        loss_mask[b, : lens[b]] = torch.tensor(s["loss_mask"])
    flat_mask = torch.tensor([m for s in samples for m in s["loss_mask"]], dtype=torch.long).unsqueeze(0)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    flat_mask[0, starts] = 0
    batch = {
        "input_ids": ids,
        "position_ids": torch.cat([torch.arange(n) for n in lens]).unsqueeze(0),
        "seq_lens": torch.tensor(lens),
        "loss_mask": loss_mask,
        "labels": ids.masked_fill(flat_mask == 0, IGNORE),
    }
    return _add_images(batch, processor, samples, share_images)


def shared_batch(processor, samples: list[dict]) -> dict:
    """A micro-batch with one copy of each group's prompt: the layout of nanosrpo.attention's shared_prompt.

    Samples are GRPO samples (rollout.training_samples) with "group" and "prompt_len"; consecutive samples of the same
    group form one row [prompt, right-padded to P | slot 1 | ... | slot n], each slot one completion right-padded to L
    (P, L: the longest prompt and completion of the micro-batch; n: the most completions in a row). Positions are the
    ones each sample has alone: the prompt counts 0, 1, ...; every slot continues from its row's prompt length.
    Returns the model inputs (input_ids [rows, T], position_ids [rows, T], attention_mask: the completions' 4-D mask,
    images once per row), the layout shared_prompt=(P, n), the log-prob bookkeeping for forward.sequence_logprobs
    (logits_to_keep: the positions whose logits predict a completion token; src_row / src_col / targets: each
    completion token's predicting position among them and its id; dst_b / dst_t: where its log-prob goes), and
    loss_mask / sample_lens in the right-padded per-sample layout of collate, so the loss code does not change.
    """
    from nanosrpo.attention import shared_prompt_mask

    rows: list[list[int]] = []  # sample numbers of each row
    for b, s in enumerate(samples):
        if rows and samples[rows[-1][0]]["group"] == s["group"]:
            rows[-1].append(b)
        else:
            rows.append([b])
    plen = [samples[r[0]]["prompt_len"] for r in rows]
    clen = [len(s["input_ids"]) - s["prompt_len"] for s in samples]
    P, L, n = max(plen), max(clen), max(len(r) for r in rows)
    pad = tokenizer_of(processor).pad_token_id
    ids = torch.full((len(rows), P + n * L), pad, dtype=torch.long)
    pos = torch.zeros((len(rows), P + n * L), dtype=torch.long)
    keep, src, dst, targets = {}, [], [], []
    for g, (row, p) in enumerate(zip(rows, plen)):
        ids[g, :p] = torch.tensor(samples[row[0]]["input_ids"][:p])
        pos[g, :P] = torch.arange(P)
        for j, b in enumerate(row):
            start = P + j * L
            completion = samples[b]["input_ids"][p:]
            ids[g, start : start + len(completion)] = torch.tensor(completion)
            pos[g, start : start + L] = torch.arange(p, p + L)
            # completion token t is predicted at the prompt's last position (t = 0) or at its slot's position t - 1
            for t, token in enumerate(completion):
                col = keep.setdefault(p - 1 if t == 0 else start + t - 1, len(keep))
                src.append((g, col))
                dst.append((b, p + t))
                targets.append(token)
    lens = [len(s["input_ids"]) for s in samples]
    loss_mask = torch.zeros((len(samples), max(lens)), dtype=torch.long)
    for b, s in enumerate(samples):
        loss_mask[b, : lens[b]] = torch.tensor(s["loss_mask"])
    order = sorted(keep, key=keep.get)  # logits_to_keep, in the column order src refers to
    batch = {
        "input_ids": ids,
        "position_ids": pos,
        "attention_mask": shared_prompt_mask(torch.tensor(plen), P, n, L),
        "shared_prompt": (P, n),
        "prompt_lens": torch.tensor(plen),
        "logits_to_keep": torch.tensor(order),
        "src_row": torch.tensor([g for g, _ in src]),
        "src_col": torch.tensor([c for _, c in src]),
        "targets": torch.tensor(targets),
        "dst_b": torch.tensor([b for b, _ in dst]),
        "dst_t": torch.tensor([t for _, t in dst]),
        "loss_mask": loss_mask,
        "sample_lens": torch.tensor(lens),
    }
    return _add_images(batch, processor, [{"images": samples[r[0]].get("images", [])} for r in rows])


def micro_batches(
    samples: list[dict], size: int, processor, device, indices: list[int] | None = None, layout: str = "padded"
):
    """(indices, batch on `device`) for consecutive chunks of `size` of samples[indices] (default: all of them, in
    order), laid out as `layout`: "padded" (collate, right-padded), "packed" (packed_batch: one row without padding,
    flash-attention only) or "shared" (shared_batch: one copy of each group's prompt; the samples of a group must be
    consecutive in `indices`). The batches are for forward.sequence_logprobs, so a group's shared prompt image is
    processed (and encoded) once in every layout. What the samples carry for the loss comes along (carried)."""
    indices = list(range(len(samples))) if indices is None else indices
    for s in range(0, len(indices), size):
        idx = indices[s : s + size]
        chunk = [samples[i] for i in idx]
        batch = (
            shared_batch(processor, chunk)
            if layout == "shared"
            else (packed_batch if layout == "packed" else collate)(processor, chunk, share_images=True)
        )
        batch.update(carried(chunk))
        yield idx, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def carried(samples: list[dict]) -> dict:
    """The numbers GRPO samples carry for the loss (rollout.training_samples, train_grpo.py), batched in every layout
    as collate's loss_mask is: "advantage" -> advantages [B]; the per-token rows "old_logprobs", "ref_logprobs" and
    "engine_logprobs" -> right-padded [B, T] (T: the longest sample, the width of forward.sequence_logprobs' output)."""
    out = {"advantages": torch.tensor([s["advantage"] for s in samples])} if "advantage" in samples[0] else {}
    width = max(len(s["input_ids"]) for s in samples)
    for key in ("old_logprobs", "ref_logprobs", "engine_logprobs"):
        if key in samples[0]:
            out[key] = stack_rows([s[key] for s in samples], width)
    return out


def stack_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-sample rows back into one right-padded [B, width] tensor (zeros past each row's end)."""
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def prompt_index(position: int, n_records: int, seed: int) -> int:
    """The record at `position` of an endless stream of shuffled epochs (one fresh permutation per epoch).

    Ranks read interleaved positions (rank r: r, r + world, ...), so every rank sees different prompts, groups never
    straddle ranks, and a run resumes exactly from one integer (the number of positions consumed).
    """
    epoch, i = divmod(position, n_records)
    return _permutation(n_records, seed, epoch)[i]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def length_bucketed_batches(lengths: list[int], batch_size: int, bucket: int, seed: int) -> list[list[int]]:
    """One epoch of batches (lists of record indices) whose records have similar lengths, so padding stays small.

    Shuffle all records, cut them into chunks of `bucket` batches, sort each chunk by length and cut it into batches,
    then shuffle the batches: the order stays random (a chunk is a random sample), only neighbours in length share a
    batch. A last incomplete batch is dropped, so every process always gets a full share.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * bucket):
        chunk = sorted(order[start : start + batch_size * bucket], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches
