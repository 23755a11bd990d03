"""Aspect-ratio buckets, one implementation for both training scripts.

A non-square image trains at the bucket (a size of about the training resolution's pixel count) nearest its shape
instead of losing its sides to a square crop; a batch holds one bucket only, so its latents stack. Crops and batch
orders come from the seed and the epoch alone, so a resumed run sees what an uninterrupted one did.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from PIL import Image

SIZE_MULTIPLE = 16  # the VAE's 8x, then the transformer's 2x2 patches


class BucketedDataset(Protocol):
    def __len__(self) -> int: ...

    def bucket_of(self, index: int) -> tuple[int, int]: ...


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """'H,W;H,W' -> [(H, W), ...]; each side a positive multiple of 16."""
    buckets = []
    for pair in filter(None, (part.strip() for part in text.split(";"))):
        try:
            height, width = (int(side) for side in pair.split(","))
        except ValueError:
            raise ValueError(f"'{pair}' is not 'height,width'; write e.g. '512,512;384,640'") from None
        if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(f"bucket {height}x{width}: sides must be positive multiples of {SIZE_MULTIPLE}")
        buckets.append((height, width))
    if not buckets:
        raise ValueError("no buckets given; write e.g. '512,512;384,640' or 'auto'")
    return buckets


def bucket_spec_problem(spec: str | None) -> str | None:
    """The one-line message for an --aspect_ratio_buckets value that cannot be parsed, or None."""
    if spec in (None, "auto"):
        return None
    try:
        parse_buckets(spec)
    except ValueError as error:
        return f"--aspect_ratio_buckets: {error}"
    return None


def training_buckets(spec: str | None, resolution: int) -> list[tuple[int, int]]:
    """The (height, width) sizes images train at: the `resolution` square, or the buckets `spec` names."""
    from diffusers.training_utils import generate_aspect_ratio_buckets

    if spec is None:
        return [(resolution, resolution)]
    if spec == "auto":
        return generate_aspect_ratio_buckets(resolution, divisibility=SIZE_MULTIPLE)
    return parse_buckets(spec)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (width, height) `size`."""
    width, height = size
    return min(buckets, key=lambda bucket: abs(math.log((width / height) / (bucket[1] / bucket[0]))))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int], center_crop: bool, rng: random.Random) -> Image.Image:
    """Resizes so the image covers the bucket, then crops it to exactly the bucket's size."""
    height, width = bucket
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BILINEAR
    )
    spare_x, spare_y = resized.width - width, resized.height - height
    left, top = (spare_x // 2, spare_y // 2) if center_crop else (rng.randint(0, spare_x), rng.randint(0, spare_y))
    return resized.crop((left, top, left + width, top + height))


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices that share one bucket, shuffled by (seed, epoch) so a resumed run sees the same order."""

    def __init__(self, dataset: BucketedDataset, batch_size: int, seed: int) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in range(len(dataset)):
            groups[dataset.bucket_of(index)].append(index)
        self.groups = list(groups.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(group) / self.batch_size) for group in self.groups)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            batches += [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[position]
