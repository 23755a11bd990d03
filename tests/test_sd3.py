"""The two-step SD3 flow on the tiny pipeline: compute_embeddings.py, then train_sd3_dreambooth_lora.py (CPU).

Training runs through a real `accelerate launch` subprocess, as a user would run it; the embedding script's logic
is driven in-process where that is enough, which keeps the file within a few minutes on two cores.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: prove nothing is fetched

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from launching import REPO, environment, launch_command, run  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from accelerate_offload.script_errors import UsageError  # noqa: E402

INSTANCE_PROMPT = "a photo of sks shape"
CLASS_PROMPT = "a photo of a shape"
VALIDATION_PROMPT = "sks shape in a bucket"
MAX_SEQUENCE_LENGTH = 32  # not the default 77, so the 77 + max_sequence_length layout is really read
CAPTIONS = {"00_circle.png": "a sks circle, from metadata", "01_square.png": "a sks square, from metadata"}
TXT_CAPTION = ("02_triangle.png", "a sks triangle, from a text file")

pytestmark = pytest.mark.timeout(300)

# Appends the image count of every VAE encode to the file $SD3_TEST_ENCODES, then runs the script given as its first
# argument, unchanged, as __main__.
ENCODE_COUNTER = """
import os, runpy, sys
from diffusers import AutoencoderKL

encode = AutoencoderKL.encode

def counted(self, x, *args, **kwargs):
    with open(os.environ["SD3_TEST_ENCODES"], "a") as log:
        log.write(f"{len(x)}\\n")
    return encode(self, x, *args, **kwargs)

AutoencoderKL.encode = counted
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compute_embeddings = load_script("compute_embeddings")
train_script = load_script("train_sd3_dreambooth_lora")


def launch_training(
    tiny_sd3_path: Path, cwd: Path, *extra: str, wrapper: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch --cpu` of the training script with tiny settings; `extra` flags are appended. With
    `wrapper`, the launcher runs it, and it runs the script."""
    args = ["--pretrained_model_name_or_path", str(tiny_sd3_path), "--instance_prompt", INSTANCE_PROMPT]
    args += ["--resolution", "32", "--report_to", "none", "--seed", "0", "--lr_warmup_steps", "0"]
    args += ["--learning_rate", "1e-3", *extra]
    scripts = [wrapper] if wrapper is not None else []
    command = launch_command(*scripts, REPO / "train_sd3_dreambooth_lora.py", *args, threads=2)
    return run(command, cwd, env, timeout=280)


def embedding_args(tiny_sd3_path: Path, instance_dir: Path, output_path: Path, *extra: str):
    return compute_embeddings.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(tiny_sd3_path),
            "--instance_data_dir",
            str(instance_dir),
            "--instance_prompt",
            INSTANCE_PROMPT,
            "--max_sequence_length",
            str(MAX_SEQUENCE_LENGTH),
            "--output_path",
            str(output_path),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            *extra,
        ]
    )


def image_key(path: Path, root: Path) -> str:
    return f"{path.relative_to(root).as_posix()}:{hashlib.sha256(path.read_bytes()).hexdigest()}"


def read_rows(path: Path) -> dict[tuple[str, str], dict]:
    return {(row["role"], row["prompt"]): row for row in pq.read_table(path).to_pylist()}


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def instance_dir(sample_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample images with captions from metadata.jsonl (two), a .txt file (one) and none (the rest)."""
    root = tmp_path_factory.mktemp("instance")
    for path in sample_images.glob("*.png"):
        shutil.copy(path, root / path.name)
    records = [{"file_name": name, "text": caption} for name, caption in CAPTIONS.items()]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    (root / TXT_CAPTION[0]).with_suffix(".txt").write_text(TXT_CAPTION[1] + "\n")
    return root


@pytest.fixture(scope="module")
def embeddings_path(tiny_sd3_path: Path, instance_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("embeddings") / "embeddings.parquet"
    extra = ["--class_prompt", CLASS_PROMPT, "--validation_prompt", VALIDATION_PROMPT]
    compute_embeddings.main(embedding_args(tiny_sd3_path, instance_dir, path, *extra))
    return path


@pytest.fixture(scope="module")
def trained(tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path_factory) -> tuple[Path, str]:
    """Three steps at batch size 2 with a checkpoint at step 2 and validation; returns the output dir and log."""
    work = tmp_path_factory.mktemp("train")
    result = launch_training(
        tiny_sd3_path,
        work,
        "--embeddings_path",
        str(embeddings_path),
        "--instance_data_dir",
        str(instance_dir),
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--validation_prompt",
        VALIDATION_PROMPT,
        "--num_validation_images",
        "1",
        "--validation_epochs",
        "1",
        "--output_dir",
        "out",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "out", result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained_cached(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path_factory
) -> tuple[Path, str, list[int]]:
    """`trained` with --cache_latents and a fourth step, into the second epoch: 8 images trained on, 6 distinct.

    Returns the output dir, the log, and the image count of each VAE encode the run made.
    """
    work = tmp_path_factory.mktemp("train-cached")
    wrapper, encodes = work / "count_encodes.py", work / "encodes.txt"
    wrapper.write_text(ENCODE_COUNTER)
    result = launch_training(
        tiny_sd3_path,
        work,
        "--embeddings_path",
        str(embeddings_path),
        "--instance_data_dir",
        str(instance_dir),
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--validation_prompt",
        VALIDATION_PROMPT,
        "--num_validation_images",
        "1",
        "--validation_epochs",
        "1",
        "--cache_latents",
        "--output_dir",
        "out",
        wrapper=wrapper,
        env=environment(SD3_TEST_ENCODES=str(encodes)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "out", result.stdout + result.stderr, [int(line) for line in encodes.read_text().split()]


def left_half_masks(instance_dir: Path, folder: Path) -> Path:
    """A loss mask per instance image: its left half trains, so a flip moves it."""
    folder.mkdir()
    for path in sorted(instance_dir.glob("*.png")):
        with Image.open(path) as image:
            mask = Image.new("L", image.size, 0)
            mask.paste(255, (0, 0, image.width // 2, image.height))
            mask.save(folder / path.name)
    return folder


BUCKETS = {(32, 32), (32, 48), (48, 32)}  # `auto` at --resolution 32: the sample images' nearest, two images each


@pytest.fixture(scope="module")
def trained_buckets(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path_factory
) -> tuple[Path, str]:
    """4 steps in aspect-ratio buckets at batch size 2 (3 batches an epoch), with random crops and flips, masks
    and cached latents, a checkpoint at step 2; returns the output dir and log."""
    work = tmp_path_factory.mktemp("train-buckets")
    masks = left_half_masks(instance_dir, work / "masks")
    result = launch_training(tiny_sd3_path, work, *bucket_args(instance_dir, embeddings_path, masks, work / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "out", result.stdout + result.stderr


def bucket_args(instance_dir: Path, embeddings_path: Path, masks: Path, output_dir: Path) -> list[str]:
    return ["--embeddings_path", str(embeddings_path), "--instance_data_dir", str(instance_dir),
            "--aspect_ratio_buckets", "auto", "--train_batch_size", "2", "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--random_flip", "--mask_data_dir", str(masks), "--cache_latents",
            "--output_dir", str(output_dir)]  # fmt: skip


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in metrics(output_dir)]


def test_embeddings_equal_the_pipelines_encode_prompt(tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path):
    from diffusers import StableDiffusion3Pipeline

    table = pq.read_table(embeddings_path)
    metadata = json.loads(table.schema.metadata[compute_embeddings.METADATA_KEY])
    assert metadata["model"] == str(tiny_sd3_path)
    assert (metadata["joint_attention_dim"], metadata["pooled_projection_dim"]) == (64, 64)
    assert metadata["max_sequence_length"] == MAX_SEQUENCE_LENGTH

    rows = read_rows(embeddings_path)
    captions = {**CAPTIONS, TXT_CAPTION[0]: TXT_CAPTION[1]}
    expected_roles = {("caption", caption) for caption in captions.values()}
    expected_roles |= {("instance", INSTANCE_PROMPT), ("class", CLASS_PROMPT), ("validation", VALIDATION_PROMPT)}
    assert set(rows) == expected_roles | {("negative", "")}
    for image in sorted(instance_dir.glob("*.png")):
        owner = ("caption", captions[image.name]) if image.name in captions else ("instance", INSTANCE_PROMPT)
        assert image_key(image, instance_dir) in rows[owner]["image_keys"], image.name

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, transformer=None, vae=None)
    for (role, prompt), row in rows.items():
        assert row["prompt_embeds_shape"] == [77 + MAX_SEQUENCE_LENGTH, 64]
        assert row["pooled_prompt_embeds_shape"] == [64]
        assert row["dtype"] == "float32"
        with torch.no_grad():
            prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
                prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
            )
        stored = torch.tensor(row["prompt_embeds"]).reshape(row["prompt_embeds_shape"])
        stored_pooled = torch.tensor(row["pooled_prompt_embeds"]).reshape(row["pooled_prompt_embeds_shape"])
        assert torch.equal(stored, prompt_embeds[0]), (role, prompt)
        assert torch.equal(stored_pooled, pooled[0]), (role, prompt)


def test_rerun_embeds_only_new_prompts(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path, monkeypatch, capsys
):
    path = tmp_path / "embeddings.parquet"
    shutil.copy(embeddings_path, path)
    before = read_rows(path)
    extra = ["--class_prompt", CLASS_PROMPT, "--validation_prompt", VALIDATION_PROMPT, "a second validation prompt"]
    compute_embeddings.main(embedding_args(tiny_sd3_path, instance_dir, path, *extra))
    assert f"Embedded 1 prompt(s), reused {len(before)} row(s)" in capsys.readouterr().out
    after = read_rows(path)
    assert set(after) == set(before) | {("validation", "a second validation prompt")}
    for key, row in before.items():
        assert after[key]["prompt_embeds"] == row["prompt_embeds"]
        assert sorted(after[key]["image_keys"]) == sorted(row["image_keys"])

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoders were loaded although every prompt was embedded")

    monkeypatch.setattr(compute_embeddings, "load_text_encoders", refuse)
    compute_embeddings.main(embedding_args(tiny_sd3_path, instance_dir, path, *extra))
    assert "Embedded 0 prompt(s)" in capsys.readouterr().out


def test_streamed_t5_gives_the_plain_embeddings(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    path = tmp_path / "streamed.parquet"
    compute_embeddings.main(embedding_args(tiny_sd3_path, instance_dir, path, "--t5_mode", "stream"))
    streamed, plain = read_rows(path), read_rows(embeddings_path)
    assert ("instance", INSTANCE_PROMPT) in streamed
    for key, row in streamed.items():
        np.testing.assert_allclose(row["prompt_embeds"], plain[key]["prompt_embeds"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_8bit_t5_without_cuda_is_a_clear_error(tiny_sd3_path: Path, instance_dir: Path, tmp_path: Path):
    args = embedding_args(tiny_sd3_path, instance_dir, tmp_path / "e.parquet", "--t5_mode", "8bit")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        compute_embeddings.main(args)
    assert not (tmp_path / "e.parquet").exists()


def test_truncated_file_is_refused_in_one_line(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    path = tmp_path / "embeddings.parquet"
    data = embeddings_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    command = [sys.executable, str(REPO / "compute_embeddings.py")]
    command += ["--pretrained_model_name_or_path", str(tiny_sd3_path), "--instance_data_dir", str(instance_dir)]
    command += ["--instance_prompt", INSTANCE_PROMPT, "--output_path", str(path), "--max_sequence_length", "32"]
    result = run(command, tmp_path, timeout=280)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert last_line(result).startswith("error: ") and "truncated" in last_line(result)
    assert path.read_bytes() == data[: len(data) // 2]  # left as it was


def test_file_of_another_model_is_refused(tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path):
    path = tmp_path / "embeddings.parquet"
    shutil.copy(embeddings_path, path)
    with pytest.raises(
        UsageError, match="max_sequence_length 32.*not of .*max_sequence_length 77"
    ):
        compute_embeddings.main(embedding_args(tiny_sd3_path, instance_dir, path, "--max_sequence_length", "77"))
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(path).replace_schema_metadata({}), other)
    with pytest.raises(UsageError, match="not an SD3 embeddings file"):
        compute_embeddings.main(embedding_args(tiny_sd3_path, instance_dir, other))
    assert pq.read_table(path).equals(pq.read_table(embeddings_path))


def test_dataset_images_get_the_same_keys_in_both_scripts(tiny_sd3_path: Path, instance_dir: Path, tmp_path: Path):
    """A `datasets` imagefolder: captions from its metadata, keys that training recomputes identically."""
    args = embedding_args(tiny_sd3_path, instance_dir, tmp_path / "e.parquet")
    args.instance_data_dir, args.dataset_name, args.caption_column = None, str(instance_dir), "text"
    images = compute_embeddings.dataset_images(args)
    train_args = train_script.parse_args(
        ["--pretrained_model_name_or_path", "x", "--instance_prompt", "p", "--dataset_name", str(instance_dir)]
    )
    files, _ = train_script.instance_image_files(train_args)
    assert [key for key, _ in images] == [train_script.image_key(name, data) for name, data in files]
    assert sorted(caption for _, caption in images if caption) == sorted(CAPTIONS.values())


def test_latents_are_shifted_then_scaled(tiny_sd3_path: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd3_path, subfolder="vae")
    assert vae.config.shift_factor != 0
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    latents = train_script.encode_latents(vae, pixels)
    torch.manual_seed(0)
    sample = vae.encode(pixels).latent_dist.sample()
    # what StableDiffusion3Pipeline does before decoding must give back the VAE's own latents
    torch.testing.assert_close(latents / vae.config.scaling_factor + vae.config.shift_factor, sample)


def test_prior_loss_splits_batch_and_weighting_at_batch_size_2():
    target = torch.zeros(4, 2, 2, 2)
    model_pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1, 1).expand(4, 2, 2, 2)
    weighting = torch.tensor([1.0, 0.5, 2.0, 1.0]).reshape(4, 1, 1, 1)
    loss = train_script.flow_matching_loss(model_pred, target, weighting, prior_loss_weight=0.5)
    instance = (1 * 1 + 0.5 * 4) / 2
    prior = (2 * 9 + 1 * 16) / 2
    assert loss.item() == pytest.approx(instance + 0.5 * prior)
    assert train_script.flow_matching_loss(model_pred, target, weighting).item() == pytest.approx((1 + 2 + 18 + 16) / 4)


def test_training_end_to_end(trained: tuple[Path, str], tiny_sd3_path: Path):
    output_dir, log = trained
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (output_dir / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert Image.open(output_dir / "image_0.png").size == (32, 32)  # final validation from the embeddings
    card = (output_dir / "README.md").read_text()
    assert "template:sd-lora" in card and f"base_model: {tiny_sd3_path}" in card
    assert f"instance_prompt: {INSTANCE_PROMPT}" in card and "| rank | 4 |" in card
    assert "s/step=" in log and "loss=" in log and "lr=" in log


@pytest.mark.parametrize("run_name", ["trained", "trained_cached", "trained_buckets"])
def test_lora_loads_into_the_pipeline_and_changes_its_output(
    run_name: str, tiny_sd3_path: Path, request: pytest.FixtureRequest
):
    from diffusers import StableDiffusion3Pipeline

    output_dir = request.getfixturevalue(run_name)[0]
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") for key in weights)
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in weights.items())

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)

    def generate() -> np.ndarray:
        return pipeline(
            INSTANCE_PROMPT,
            height=32,
            width=32,
            num_inference_steps=2,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    base = generate()
    pipeline.load_lora_weights(output_dir)
    assert pipeline.get_list_adapters()["transformer"]
    assert np.abs(generate() - base).max() > 1e-4


def test_cached_latents_train_and_draw_images(trained_cached: tuple[Path, str, list[int]]):
    output_dir, log, _ = trained_cached
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert len(losses(output_dir)) == 4 and all(np.isfinite(losses(output_dir)))
    # the VAE, off the GPU while training, decoded the validation and final images
    assert Image.open(output_dir / "image_0.png").size == (32, 32)
    assert "Cached the latents of 6 examples" in log


def test_cached_latents_encode_each_image_once(trained_cached: tuple[Path, str, list[int]], instance_dir: Path):
    """Each of the 6 images once, before the first step; encoding every batch would make [2, 2, 2, 2]."""
    assert trained_cached[2] == [1] * len(list(instance_dir.glob("*.png")))


def test_cached_latents_give_the_uncached_losses(
    trained: tuple[Path, str], trained_cached: tuple[Path, str, list[int]]
):
    """The first epoch's steps (the crops the cache was made with): a cached posterior sampled with the step's
    generator gives the latents the VAE's own sampling gives, to the float error of encoding images one by one."""
    uncached, cached = losses(trained[0]), losses(trained_cached[0])[:3]
    assert len(uncached) == 3
    np.testing.assert_allclose(cached, uncached, rtol=1e-4)


def test_cached_batches_hold_what_collate_encodes_class_images_and_masks_included(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    """Prior preservation, masks, random crops and flips: a batch from the cache is the posterior of the pixels
    `collate_fn` gives (instance rows, then class rows) with their masks, and keeps them in a later epoch."""
    from diffusers import AutoencoderKL

    from accelerate_offload.training_utils import cache_latents, encode_latent_distribution

    masks, class_dir = tmp_path / "masks", tmp_path / "class"
    masks.mkdir()
    class_dir.mkdir()
    for path in sorted(instance_dir.glob("*.png")):
        with Image.open(path) as image:
            mask = Image.new("L", image.size, 0)
            mask.paste(255, (0, 0, image.width // 2, image.height))
            mask.save(masks / path.name)
    for path in sorted(instance_dir.glob("*.png"))[:2]:
        shutil.copy(path, class_dir / path.name)
    args = train_script.parse_args(
        ["--pretrained_model_name_or_path", str(tiny_sd3_path), "--instance_prompt", INSTANCE_PROMPT,
         "--instance_data_dir", str(instance_dir), "--mask_data_dir", str(masks), "--with_prior_preservation",
         "--class_data_dir", str(class_dir), "--class_prompt", CLASS_PROMPT, "--random_flip", "--resolution", "32",
         "--seed", "0", "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    embeddings = train_script.load_embeddings(embeddings_path, args)
    files, source = train_script.instance_image_files(args)
    class_files = [(path.name, path.read_bytes()) for path in sorted(class_dir.iterdir())]
    dataset = train_script.DreamBoothDataset(
        files, train_script.instance_rows(files, source, embeddings, args), embeddings, args,
        class_files=class_files, class_row=embeddings.row("class", CLASS_PROMPT),
        masks=train_script.load_masks(files, args),
    )  # fmt: skip
    vae = AutoencoderKL.from_pretrained(tiny_sd3_path, subfolder="vae")

    def collate(indices: list[int]) -> dict:
        return train_script.collate_fn([dataset[index] for index in indices], with_prior_preservation=True)

    cache = cache_latents(vae, dataset, lambda example: train_script.collate_fn([example], True)["pixel_values"])
    batch = collate([4, 1])
    encoded = encode_latent_distribution(vae, batch["pixel_values"])
    for cached_part, encoded_part in zip(cache.distribution(batch["indices"]), encoded, strict=True):
        torch.testing.assert_close(cached_part, encoded_part, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.batch_masks(batch), batch["masks"], rtol=0, atol=0)

    dataset.set_epoch(1)
    later = collate([4, 1])
    assert not torch.equal(later["masks"], batch["masks"])  # cropped and flipped anew
    torch.testing.assert_close(cache.batch_masks(later), batch["masks"], rtol=0, atol=0)


def test_each_image_trains_at_its_own_bucket(trained_buckets: tuple[Path, str], instance_dir: Path):
    """Every batch is one bucket (a mixed one would not stack), and the first epoch visits each bucket once."""
    output_dir, log = trained_buckets
    buckets = train_script.training_buckets("auto", 32)
    expected = {train_script.nearest_bucket(Image.open(path).size, buckets) for path in instance_dir.glob("*.png")}
    assert expected == BUCKETS and f"6 examples in buckets {sorted(BUCKETS)}" in log
    records = metrics(output_dir)
    assert [record["epoch"] for record in records] == [0, 0, 0, 1]
    assert sorted(tuple(record["size"]) for record in records[:3]) == sorted(BUCKETS)
    assert all(np.isfinite(record["loss"]) for record in records)
    assert "| aspect_ratio_buckets | auto |" in (output_dir / "README.md").read_text()


def test_resume_in_buckets_is_exact(
    trained_buckets: tuple[Path, str], tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    """Stopped after the step-2 checkpoint and resumed: the same batches, losses and LoRA, bit for bit."""
    straight, output_dir = trained_buckets[0], tmp_path / "out"
    shutil.copytree(straight, output_dir)
    shutil.rmtree(output_dir / "checkpoint-4")
    (output_dir / "pytorch_lora_weights.safetensors").unlink()
    args = bucket_args(instance_dir, embeddings_path, straight.parent / "masks", output_dir)
    result = launch_training(tiny_sd3_path, tmp_path, *args, "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from checkpoint checkpoint-2" in result.stdout + result.stderr
    for key in ("step", "loss", "size"):
        assert [record[key] for record in metrics(output_dir)] == [record[key] for record in metrics(straight)]
    expected, got = (load_file(folder / "pytorch_lora_weights.safetensors") for folder in (straight, output_dir))
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_bucket_examples_pair_class_images_and_masks_in_one_bucket(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    """Each example's image, its class image and its mask have its bucket's size, the mask cropped and flipped as
    its image; batches hold one bucket in an order set by the seed and the epoch; held-out images stay squares."""
    from diffusers import AutoencoderKL

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    shutil.copy(sorted(instance_dir.glob("*.png"))[0], class_dir / "class_0.png")
    args = train_script.parse_args(
        ["--pretrained_model_name_or_path", str(tiny_sd3_path), "--instance_prompt", INSTANCE_PROMPT,
         "--instance_data_dir", str(instance_dir), "--aspect_ratio_buckets", "auto", "--with_prior_preservation",
         "--class_data_dir", str(class_dir), "--class_prompt", CLASS_PROMPT, "--random_flip", "--resolution", "32",
         "--seed", "0", "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    embeddings = train_script.load_embeddings(embeddings_path, args)
    files, source = train_script.instance_image_files(args)
    # each mask is its image's red channel: cropped and flipped as the image, it equals the image's red channel
    masks = [Image.open(instance_dir / name).convert("RGB").getchannel("R") for name, _ in files]
    dataset = train_script.DreamBoothDataset(
        files, train_script.instance_rows(files, source, embeddings, args), embeddings, args,
        class_files=[("class_0.png", (class_dir / "class_0.png").read_bytes())],
        class_row=embeddings.row("class", CLASS_PROMPT), masks=masks,
    )  # fmt: skip
    assert set(dataset.buckets) == BUCKETS
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            example = dataset[index]
            pixels, class_pixels = example["instance"][0], example["class"][0]
            assert pixels.shape[1:] == class_pixels.shape[1:] == example["mask"].shape[1:] == dataset.bucket_of(index)
            torch.testing.assert_close(example["mask"], (pixels[:1] + 1) / 2, rtol=0, atol=1e-6)

    def order(epoch: int) -> list[list[int]]:
        sampler = train_script.BucketBatchSampler(dataset, batch_size=2, seed=0)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1) == order(1) != order(0)  # a new sampler (a resumed run) batches an epoch as the first did
    assert all(len({dataset.bucket_of(index) for index in batch}) == 1 for batch in order(0) + order(1))
    assert sorted(index for batch in order(0) for index in batch) == list(range(len(dataset)))

    vae = AutoencoderKL.from_pretrained(tiny_sd3_path, subfolder="vae")
    held_out = train_script.encode_validation_latents(vae, files[1:3], [0, 0], args)  # 96x64 and 64x96 images
    side = 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    assert all(latents.shape[-2:] == (side, side) for latents, _ in held_out)  # --resolution squares, not buckets


def test_bad_bucket_spec_is_one_line(capsys):
    common = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p", "--instance_data_dir", "."]
    for spec, fragment in (("32,40", "bucket 32x40: sides must be positive multiples of 16"), ("wide", "'wide'")):
        with pytest.raises(SystemExit) as exit_info:
            train_script.parse_args([*common, "--aspect_ratio_buckets", spec])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith("error: --aspect_ratio_buckets: ") and fragment in err, err


def test_resume_from_checkpoint(
    trained: tuple[Path, str], tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    output_dir = tmp_path / "out"
    shutil.copytree(trained[0], output_dir)
    checkpoint_lora = load_file(output_dir / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    result = launch_training(
        tiny_sd3_path,
        tmp_path,
        "--embeddings_path",
        str(embeddings_path),
        "--instance_data_dir",
        str(instance_dir),
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "1",
        "--resume_from_checkpoint",
        "latest",
        "--output_dir",
        str(output_dir),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from checkpoint checkpoint-2" in result.stdout + result.stderr
    assert "2/4" in result.stderr and "0/4" not in result.stderr  # the step count went on from the checkpoint
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    final = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert final.keys() == checkpoint_lora.keys()
    assert any(not torch.equal(final[key], checkpoint_lora[key]) for key in final)


def test_prior_preservation_at_batch_size_2(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, sample_images: Path, tmp_path: Path
):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    shutil.copy(sorted(sample_images.glob("*.png"))[0], class_dir / "class_0.png")
    result = launch_training(
        tiny_sd3_path,
        tmp_path,
        "--embeddings_path",
        str(embeddings_path),
        "--instance_data_dir",
        str(instance_dir),
        "--with_prior_preservation",
        "--class_prompt",
        CLASS_PROMPT,
        "--class_data_dir",
        str(class_dir),
        "--num_class_images",
        "2",
        "--sample_batch_size",
        "1",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--output_dir",
        "out",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    generated = [path for path in class_dir.iterdir() if path.name != "class_0.png"]
    assert len(generated) == 1 and Image.open(generated[0]).size == (32, 32)  # from the class prompt's embeddings
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in line


def test_image_without_embeddings_is_named(tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(instance_dir, images)
    Image.open(images / "00_circle.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / "new_image.png")
    output_dir = tmp_path / "out"
    result = launch_training(
        tiny_sd3_path,
        tmp_path,
        "--embeddings_path",
        str(embeddings_path),
        "--instance_data_dir",
        str(images),
        "--output_dir",
        str(output_dir),
    )
    assert_one_line_error(result, "'new_image.png'", "rerun compute_embeddings.py")
    assert not output_dir.exists(), "nothing is written before the input is checked"


def test_embeddings_of_another_model_are_refused(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    """A file from a model whose T5 is narrower: the shapes cannot feed this transformer."""
    metadata, rows = compute_embeddings.read_embeddings(embeddings_path)
    for row in rows:
        row["prompt_embeds"] = row["prompt_embeds"].reshape(row["prompt_embeds_shape"])[:, :32]
        row["prompt_embeds_shape"] = [77 + MAX_SEQUENCE_LENGTH, 32]
    foreign = tmp_path / "foreign.parquet"
    compute_embeddings.write_embeddings(
        foreign, rows, {**metadata, "model": "another/model", "joint_attention_dim": 32}
    )
    result = launch_training(
        tiny_sd3_path,
        tmp_path,
        "--embeddings_path",
        str(foreign),
        "--instance_data_dir",
        str(instance_dir),
        "--output_dir",
        "out",
    )
    assert_one_line_error(result, "another/model", "32/64", "expects 64/64")
    assert not (tmp_path / "out").exists()


def test_missing_embeddings_file(tiny_sd3_path: Path, instance_dir: Path, tmp_path: Path):
    result = launch_training(
        tiny_sd3_path,
        tmp_path,
        "--embeddings_path",
        str(tmp_path / "nowhere.parquet"),
        "--instance_data_dir",
        str(instance_dir),
        "--output_dir",
        "out",
    )
    assert_one_line_error(result, "nowhere.parquet", "not found", "compute_embeddings.py")
    assert not (tmp_path / "out").exists()
