#!/usr/bin/env python
"""Step one of the two-step SD3 DreamBooth LoRA flow: embed every prompt once, into one Parquet file.

SD3's three text encoders (CLIP-L, CLIP-G and T5-XXL, about 11 GB in bf16) are needed only to turn prompts into
embeddings. Computing those here, once, means `train_sd3_dreambooth_lora.py` never loads a text encoder, so the
GPU holds only the transformer (and the VAE) while the LoRA trains.

The file holds one row per prompt: the instance prompt, each per-image caption, the class prompt, the validation
prompts and the empty prompt (the negative for classifier-free guidance at validation). Each row lists the keys
(`relative/path:sha256`) of the images it describes, so training finds every image's prompt and notices images
that were added or edited after the embeddings were computed.

    python compute_embeddings.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --class_prompt "a photo of a dog" \
        --validation_prompt "a photo of sks dog in a bucket" --t5_mode 8bit
"""

import argparse
import gc
import hashlib
import io
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from accelerate_offload.quiet import quiet_third_party_noise  # isort: skip

# Before the libraries below load: some log notes as they import that say nothing about this run.
quiet_third_party_noise()

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers import AutoConfig

from accelerate_offload.script_errors import ScriptError, UsageError

FORMAT_NAME = "sd3-prompt-embeddings"
FORMAT_VERSION = 1
METADATA_KEY = b"sd3_prompt_embeddings"
# Settings that must match for rows of an existing file to be reused.
IDENTITY_KEYS = ("model", "revision", "variant", "max_sequence_length", "joint_attention_dim", "pooled_projection_dim")
SCHEMA = pa.schema(
    [
        ("role", pa.string()),
        ("prompt", pa.string()),
        ("image_keys", pa.list_(pa.string())),
        # large lists: a few thousand T5-XXL rows pass the 2**31 values that a plain list column can address
        ("prompt_embeds", pa.large_list(pa.float32())),
        ("prompt_embeds_shape", pa.list_(pa.int64())),
        ("pooled_prompt_embeds", pa.large_list(pa.float32())),
        ("pooled_prompt_embeds_shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
    ]
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# SD3 embeds at most this many T5 tokens a prompt (StableDiffusion3Pipeline refuses more).
MAX_T5_TOKENS = 512


class ArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line and a pointer to --help, not the whole usage text before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class ShortTruncationWarnings(logging.Filter):
    """diffusers' warning for a prompt longer than the text encoders take quotes all that was cut; the first words
    and a count are enough to find the prompt."""

    def filter(self, record: logging.LogRecord) -> bool:
        head, found, dropped = record.getMessage().partition(" tokens: ")
        if found and "was truncated" in head:
            words = dropped.strip("[]'\"").split()  # the dropped text arrives as a list's repr, one per prompt
            shown = " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
            record.msg, record.args = f"{head} tokens; dropped {len(words)} words: {shown}", ()
        return True


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description="Precompute SD3 prompt embeddings for DreamBooth LoRA training.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Path to pretrained model or model identifier from huggingface.co/models.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are stored.")
    parser.add_argument(
        "--instance_data_dir",
        type=str,
        default=None,
        help=(
            "A folder of instance images. Captions are read from a `metadata.jsonl` (`file_name` and"
            " `--caption_column`) or from a `.txt` file beside each image; images without one use --instance_prompt."
        ),
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A `datasets` dataset (hub id or local folder) of instance images, instead of --instance_data_dir.",
    )
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The config of the dataset.")
    parser.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    parser.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="The column holding per-image captions (datasets: no captions if unset; metadata.jsonl: `text`).",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="Stop at the first image that cannot be read or decoded, instead of skipping (and counting) it.",
    )
    parser.add_argument(
        "--instance_prompt",
        type=str,
        required=True,
        help="The prompt with identifier specifying the instance, e.g. 'photo of a TOK dog'.",
    )
    parser.add_argument(
        "--class_prompt", type=str, default=None, help="The prompt of the class images, for prior preservation."
    )
    parser.add_argument(
        "--class_data_dir",
        type=str,
        default=None,
        help="A folder of class images; their keys are recorded under the class prompt.",
    )
    parser.add_argument(
        "--validation_prompt", type=str, nargs="+", default=[], help="Prompts used to validate during training."
    )
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=77,
        help="Maximum sequence length of the T5 text encoder; the embeddings have 77 + this many tokens.",
    )
    parser.add_argument(
        "--t5_mode",
        type=str,
        default="plain",
        choices=["8bit", "stream", "plain"],
        help=(
            "How T5-XXL runs: `8bit` quantised with bitsandbytes (CUDA only, ~5 GB), `stream` in --dtype with its"
            " blocks streamed one at a time from CPU memory (under 1 GB of VRAM), `plain` whole on --device."
        ),
    )
    parser.add_argument(
        "--max_ram",
        type=str,
        default=None,
        help=(
            "With --t5_mode stream: a host memory budget for T5's blocks, e.g. '4GB'; the blocks past it are read"
            " from --offload_dir (or in place from the model's safetensors files) each time they run."
        ),
    )
    parser.add_argument(
        "--offload_dir", type=str, default=None, help="Folder for the T5 block file that --max_ram spills to."
    )
    parser.add_argument(
        "--dtype",
        type=str,
        default=None,
        choices=list(DTYPES),
        help="Precision of the text encoders. Defaults to bf16 on CUDA, fp32 otherwise.",
    )
    parser.add_argument(
        "--device", type=str, default=None, help="Where the text encoders run. Defaults to cuda when available."
    )
    parser.add_argument(
        "--output_path",
        type=str,
        default="sd3_embeddings.parquet",
        help="The Parquet file to write; an existing file for the same model is extended, its prompts reused.",
    )
    args = parser.parse_args(input_args)

    if args.instance_data_dir is None and args.dataset_name is None:
        parser.error("specify either --instance_data_dir or --dataset_name")
    if args.instance_data_dir is not None and args.dataset_name is not None:
        parser.error("specify only one of --instance_data_dir or --dataset_name")
    if args.class_data_dir is not None and args.class_prompt is None:
        parser.error("--class_data_dir needs --class_prompt")
    message = check_args(args)
    if message:  # a value that parses but cannot work: one line naming the fix
        parser.exit(2, f"error: {message}\n")
    return args


def is_local_path(name: str) -> bool:
    """Whether a --dataset_name can only mean a folder (a Hub id is `name` or `owner/name`): then it must exist."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_args(args: argparse.Namespace) -> str | None:
    """Every number, path and device checked before anything is loaded; the message, or None."""
    if not 1 <= args.max_sequence_length <= MAX_T5_TOKENS:
        return f"--max_sequence_length must be in 1..{MAX_T5_TOKENS} (SD3's T5 limit), got {args.max_sequence_length}"
    if args.instance_data_dir is not None and not Path(args.instance_data_dir).is_dir():
        return f"image folder {args.instance_data_dir} does not exist: give --instance_data_dir a folder of images"
    if args.dataset_name is not None and is_local_path(args.dataset_name) and not Path(args.dataset_name).is_dir():
        return f"--dataset_name {args.dataset_name} does not exist: give a local dataset folder or a Hub dataset id"
    if (
        args.class_data_dir is not None
        and Path(args.class_data_dir).exists()
        and not Path(args.class_data_dir).is_dir()
    ):
        return f"--class_data_dir {args.class_data_dir} is a file: give a folder"
    output_path = Path(args.output_path)
    if output_path.is_dir():
        return (
            f"--output_path {output_path} is a folder: pass a file path, e.g. {output_path / 'sd3_embeddings.parquet'}"
        )
    existing = next(folder for folder in output_path.parents if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"--output_path {output_path} cannot be written: {existing} is not a writable folder"
    if args.max_ram is not None:
        from accelerate_offload.planner import parse_memory

        if args.t5_mode != "stream":
            return "--max_ram budgets T5's streamed blocks: add --t5_mode stream"
        try:
            parse_memory(args.max_ram, "--max_ram")
        except ValueError as error:
            return str(error)
        if args.offload_dir is None:
            return "--max_ram spills T5's blocks past it to disk: set --offload_dir to a folder for them"
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            return f"--device {args.device} is not a device: use cpu or cuda (cuda:1, ...)"
        if device.type == "cuda" and not torch.cuda.is_available():
            return f"--device {args.device} needs a CUDA GPU, and none is available: use --device cpu"
    return None


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively, hidden ones skipped), in a stable order."""
    extensions = {ext for ext, name in Image.registered_extensions().items() if name in Image.OPEN}
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix.lower() in extensions
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def image_key(name: str, data: bytes) -> str:
    """Links an image to its prompt: a renamed, added or edited image gets a new key and is noticed at training."""
    return f"{name}:{hashlib.sha256(data).hexdigest()}"


def folder_captions(root: Path, caption_column: str) -> dict[str, str]:
    """Captions by relative path, from `metadata.jsonl` first, then from `.txt` files beside the images."""
    captions = {}
    metadata = root / "metadata.jsonl"
    if metadata.exists():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{metadata} line {number} is not JSON: {error}") from None
            if "file_name" not in record or caption_column not in record:
                raise UsageError(f"{metadata} line {number} needs the keys 'file_name' and '{caption_column}'")
            if record[caption_column] is not None:  # null: no caption, the image uses --instance_prompt
                captions[Path(record["file_name"]).as_posix()] = str(record[caption_column])
    for path in list_images(root):
        name = path.relative_to(root).as_posix()
        text_file = path.with_suffix(".txt")
        if name not in captions and text_file.exists():
            captions[name] = text_file.read_text(encoding="utf-8")
    return {name: caption.strip() for name, caption in captions.items()}


def read_image(path: Path) -> bytes:
    """The file's bytes, once they are known to decode as an image."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return data


def folder_images(root: Path, caption_column: str | None, strict: bool) -> list[tuple[str, str | None]]:
    """(key, caption or None) for every image in a folder; unreadable ones are skipped and counted, or fatal."""
    if not root.is_dir():
        raise UsageError(f"image folder {root} does not exist")
    captions = folder_captions(root, caption_column or "text")
    paths = list_images(root)
    images, unreadable = [], []
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            images.append((image_key(name, read_image(path)), captions.get(name)))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            if strict:
                raise UsageError(
                    f"cannot read image {path} ({error}): fix or remove it, or drop --strict"
                ) from None
            unreadable.append(f"{name} ({error})")
    if not paths:
        raise UsageError(f"no images found in {root}")
    if not images:
        raise UsageError(f"none of the {len(paths)} images in {root} can be read: {'; '.join(unreadable)}")
    if unreadable:
        print(
            f"Skipped {len(unreadable)} of {len(paths)} images in {root} that cannot be read: "
            f"{'; '.join(unreadable)}. Pass --strict to stop instead.",
            file=sys.stderr,
        )
    return images


def dataset_images(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(key, caption or None) for every image of a `datasets` dataset, keyed as the training script keys them."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    dataset = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    for column in (args.image_column, args.caption_column):
        if column is not None and column not in dataset.column_names:
            raise UsageError(
                f"column '{column}' not in dataset {args.dataset_name}; its columns: {', '.join(dataset.column_names)}"
            )
    dataset = dataset.cast_column(args.image_column, ImageFeature(decode=False))
    images = []
    for index, record in enumerate(dataset):
        image = record[args.image_column]
        data = image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()
        name = f"{index:06d}/{Path(image['path']).name if image['path'] else 'image'}"
        caption = record[args.caption_column] if args.caption_column else None
        images.append((image_key(name, data), caption.strip() if caption else None))
    return images


def requested_rows(args: argparse.Namespace) -> dict[tuple[str, str], list[str]]:
    """The rows this run asks for, as (role, prompt) -> image keys."""
    if args.dataset_name is not None:
        images = dataset_images(args)
    else:
        images = folder_images(Path(args.instance_data_dir), args.caption_column, args.strict)
    rows: dict[tuple[str, str], list[str]] = {("instance", args.instance_prompt): []}
    for key, caption in images:
        role_prompt = ("caption", caption) if caption else ("instance", args.instance_prompt)
        rows.setdefault(role_prompt, []).append(key)
    if args.class_prompt is not None:
        class_keys = []
        if args.class_data_dir is not None and Path(args.class_data_dir).is_dir():
            class_keys = [key for key, _ in folder_images(Path(args.class_data_dir), None, args.strict)]
        rows[("class", args.class_prompt)] = class_keys
    for prompt in args.validation_prompt:
        rows.setdefault(("validation", prompt), [])
    rows.setdefault(("negative", ""), [])
    return rows


def check_pipeline_class(args: argparse.Namespace) -> None:
    """A pipeline of another family (FLUX.1, say) is named as such, not blamed on its text encoders' configs."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
    except (OSError, ValueError):
        return  # no model_index.json: model_identity says what is missing
    family = index.get("_class_name", "")
    if not family.startswith("StableDiffusion3"):
        raise UsageError(
            f"{args.pretrained_model_name_or_path} is a {family or 'pipeline of unknown class'}, not an SD3 diffusers"
            " pipeline" + (" (train FLUX.1 LoRAs with train_flux_lora.py)" if family.startswith("Flux") else "")
        )


def model_identity(args: argparse.Namespace) -> dict:
    """What an embeddings file must have been computed with to be reused, read from the configs alone."""
    config_args = {"revision": args.revision, "cache_dir": args.cache_dir}
    check_pipeline_class(args)
    try:
        clip_l, clip_g, t5 = (
            AutoConfig.from_pretrained(args.pretrained_model_name_or_path, subfolder=subfolder, **config_args)
            for subfolder in ("text_encoder", "text_encoder_2", "text_encoder_3")
        )
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot read the text encoder configs of {args.pretrained_model_name_or_path} "
            f"({str(error).splitlines()[0]}): pass --pretrained_model_name_or_path a folder or Hub id of an SD3"
            " diffusers pipeline"
        ) from None
    return {
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "max_sequence_length": args.max_sequence_length,
        "joint_attention_dim": t5.d_model,
        "pooled_projection_dim": clip_l.projection_dim + clip_g.projection_dim,
    }


def describe(identity: dict) -> str:
    return (
        f"{identity.get('model')} (revision {identity.get('revision')}, max_sequence_length "
        f"{identity.get('max_sequence_length')}, dims {identity.get('joint_attention_dim')}/"
        f"{identity.get('pooled_projection_dim')})"
    )


def read_embeddings(path: Path) -> tuple[dict, list[dict]]:
    """The file's metadata and rows (embeddings as flat float32 arrays); refuses truncated or foreign files."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise UsageError(
            f"{path} is not a readable Parquet file (truncated or corrupt: {str(error).splitlines()[0]});"
            " delete it and rerun compute_embeddings.py"
        ) from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    metadata = json.loads(raw) if raw else {}
    if metadata.get("format") != FORMAT_NAME or not set(SCHEMA.names) <= set(table.column_names):
        raise UsageError(f"{path} is not an SD3 embeddings file written by compute_embeddings.py")
    if metadata.get("version") != FORMAT_VERSION:
        raise UsageError(f"{path} has format version {metadata.get('version')}, not {FORMAT_VERSION}")
    if metadata.get("num_rows") != table.num_rows:
        raise UsageError(
            f"{path} has {table.num_rows} rows but was written with {metadata.get('num_rows')}; delete it and rerun"
        )
    rows = table.select(SCHEMA.names).to_pylist()
    for row in rows:
        for column in ("prompt_embeds", "pooled_prompt_embeds"):
            row[column] = np.asarray(row[column], dtype=np.float32)
            if row[column].size != math.prod(row[f"{column}_shape"]):
                raise UsageError(f"{path}: the {column} of prompt {row['prompt']!r} do not match their shape")
    return metadata, rows


def write_embeddings(path: Path, rows: list[dict], metadata: dict) -> None:
    """Writes next to `path` and renames, so that an interrupted run never leaves a half-written file behind."""
    columns = {name: [row[name] for row in rows] for name in SCHEMA.names}
    for column in ("prompt_embeds", "pooled_prompt_embeds"):
        columns[column] = [np.asarray(value, dtype=np.float32).reshape(-1) for value in columns[column]]
    table = pa.Table.from_pydict(columns, schema=SCHEMA).replace_schema_metadata(
        {METADATA_KEY: json.dumps({**metadata, "num_rows": len(rows)})}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        pq.write_table(table, partial)
        os.replace(partial, path)
    finally:  # interrupted or out of space: the earlier file stays as it was, and nothing half-written is left
        partial.unlink(missing_ok=True)


def load_text_encoders(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> StableDiffusion3Pipeline:
    """A transformer-less, VAE-less SD3 pipeline whose text encoders are placed as --t5_mode asks."""
    load_args = {"revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir, "dtype": dtype}
    text_encoder_3 = None
    if args.t5_mode == "8bit":
        from transformers import BitsAndBytesConfig, T5EncoderModel

        t5_args = dict(load_args)
        t5_args.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device})
        text_encoder_3 = T5EncoderModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="text_encoder_3", **t5_args
        )
        text_encoder_3.requires_grad_(False)
    extra = {} if text_encoder_3 is None else {"text_encoder_3": text_encoder_3}
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_model_name_or_path, transformer=None, vae=None, **extra, **load_args
    )
    if text_encoder_3 is not None:  # placed by bitsandbytes, which refuses to move it
        pipeline.text_encoder.requires_grad_(False).to(device)
        pipeline.text_encoder_2.requires_grad_(False).to(device)
        return pipeline
    from accelerate_offload.inference import place_pipeline

    # streamed: T5-XXL goes block by block from its file's memory map into one host buffer a block
    return place_pipeline(
        pipeline, device, stream=args.t5_mode == "stream", max_ram=args.max_ram, offload_dir=args.offload_dir
    )


@torch.no_grad()
def embed(pipeline: StableDiffusion3Pipeline, prompt: str, max_sequence_length: int, device: torch.device):
    """One prompt at a time: a row's values then do not depend on which other prompts shared its batch."""
    prompt_embeds, _, pooled_prompt_embeds, _ = pipeline.encode_prompt(
        prompt=prompt,
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds[0], pooled_prompt_embeds[0]


def merge_rows(
    existing: Iterable[dict], requested: dict[tuple[str, str], list[str]]
) -> tuple[dict[tuple[str, str], dict], list[str]]:
    """Existing rows with this run's image keys moved onto the requested rows, and the prompts still to embed."""
    moved = {key for keys in requested.values() for key in keys}
    rows = {}
    for row in existing:
        row["image_keys"] = [key for key in row["image_keys"] if key not in moved]
        rows[(row["role"], row["prompt"])] = row
    embedded = {row["prompt"]: row for row in rows.values()}
    missing = []
    for (role, prompt), keys in requested.items():
        if (role, prompt) in rows:
            rows[(role, prompt)]["image_keys"].extend(keys)
        elif prompt in embedded:
            rows[(role, prompt)] = {**embedded[prompt], "role": role, "image_keys": list(keys)}
        else:
            rows[(role, prompt)] = {"role": role, "prompt": prompt, "image_keys": list(keys)}
            if prompt not in missing:
                missing.append(prompt)
    return rows, missing


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.t5_mode == "8bit":
        if device.type != "cuda":
            raise UsageError("--t5_mode 8bit needs a CUDA GPU (bitsandbytes); use --t5_mode stream or plain")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--t5_mode 8bit needs bitsandbytes: pip install bitsandbytes") from None

    output_path = Path(args.output_path)
    identity = model_identity(args)
    requested = requested_rows(args)
    existing = []
    if output_path.exists():
        metadata, existing = read_embeddings(output_path)
        if any(metadata.get(key) != identity[key] for key in IDENTITY_KEYS):
            raise UsageError(
                f"{output_path} holds embeddings of {describe(metadata)}, not of {describe(identity)}:"
                " pass another --output_path or delete the file"
            )
    rows, missing = merge_rows(existing, requested)
    reused = sum("prompt_embeds" in row for row in rows.values())

    if missing:
        from accelerate_offload.phases import JobPhases

        diffusers_logging.get_logger(StableDiffusion3Pipeline.__module__).addFilter(ShortTruncationWarnings())
        phases = JobPhases(device, kept=lambda: str(output_path) if output_path.exists() else "")
        t5_fixes = ["use --t5_mode stream (T5 block by block) or 8bit", "lower --max_sequence_length"]
        with phases.phase("load", t5_fixes):
            pipeline = load_text_encoders(args, device, dtype)
        computed = {}
        with phases.phase("prompts", t5_fixes):
            for prompt in missing:
                prompt_embeds, pooled_prompt_embeds = embed(pipeline, prompt, args.max_sequence_length, device)
                computed[prompt] = {
                    "prompt_embeds": prompt_embeds.float().cpu().numpy(),
                    "prompt_embeds_shape": list(prompt_embeds.shape),
                    "pooled_prompt_embeds": pooled_prompt_embeds.float().cpu().numpy(),
                    "pooled_prompt_embeds_shape": list(pooled_prompt_embeds.shape),
                    "dtype": str(prompt_embeds.dtype).removeprefix("torch."),
                }
        for row in rows.values():
            if "prompt_embeds" not in row:
                row.update(computed[row["prompt"]])
        if device.type == "cuda":
            print(f"Peak VRAM while embedding: {torch.cuda.max_memory_allocated(device) / 1024**3:.2f} GB")
        del pipeline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ordered = sorted(rows.values(), key=lambda row: (row["role"], row["prompt"]))
    write_embeddings(output_path, ordered, {"format": FORMAT_NAME, "version": FORMAT_VERSION, **identity})
    print(
        f"Embedded {len(missing)} prompt(s), reused {reused} row(s) already in the file;"
        f" wrote {len(ordered)} rows to {output_path}"
    )


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except ScriptError as error:
        error.exit()
    except KeyboardInterrupt:
        print(f"error: interrupted; {arguments.output_path} was not changed", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
