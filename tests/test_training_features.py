"""Masked loss, shifted timestep sampling, caption dropout and tag shuffling, validation loss: the formulas against
diffusers' scheduler, the mask's gradient, and both training scripts end to end through `accelerate-offload launch`."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from launching import environment, launch_command
from test_train_flux import SCRIPT, INSTANCE_PROMPT, base_args, load_script

from accelerate_offload.training_math import (
    VALIDATION_SIGMAS,
    caption_orderings,
    exponential_time_shift,
    fixed_noise_loss,
    held_out_indices,
    mask_to_latent_grid,
    masked_mean,
    resolution_shift_mu,
    sample_shifted_sigmas,
    shift_sigmas,
    shuffle_caption,
    validation_share,
)

pytestmark = pytest.mark.timeout(600)

TAGGED_PROMPT = "sks shape, red, blue, round, small"


# ----------------------------------------------------------------------------------------------------------------
# The formulas
# ----------------------------------------------------------------------------------------------------------------


def test_fixed_shift_is_the_schedulers_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    torch.testing.assert_close(shift_sigmas(plain, 3.0), shifted)
    assert not torch.allclose(plain, shifted)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_flux_shift_is_what_the_flux_pipeline_sets_at_inference(image_seq_len: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    assert resolution_shift_mu(image_seq_len, config) == pytest.approx(mu)
    sigmas = torch.linspace(1.0, 1 / 28, 28)
    scheduler.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    torch.testing.assert_close(exponential_time_shift(sigmas, mu), scheduler.sigmas[:-1])


def test_shifted_draws_are_seeded_and_shift_toward_noise() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config

    def draw(sampling: str, image_seq_len: int = 4096) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return sample_shifted_sigmas(sampling, 4096, image_seq_len, config, 3.0, generator=generator)

    torch.testing.assert_close(draw("shift"), draw("shift"))
    assert 0.0 < float(draw("shift").min()) and float(draw("shift").max()) < 1.0
    assert float(draw("shift").mean()) > 0.6  # a shift of 3 moves a logit-normal's mean 0.5 up
    assert float(draw("flux_shift", 4096).mean()) > float(draw("flux_shift", 256).mean())  # larger images, more noise


def test_caption_shuffle_keeps_the_first_tags_and_repeats_per_epoch() -> None:
    first = shuffle_caption(TAGGED_PROMPT, 1, seed=0, epoch=0, index=3)
    assert first == shuffle_caption(TAGGED_PROMPT, 1, seed=0, epoch=0, index=3)
    assert first.startswith("sks shape, ")
    assert sorted(first.split(", ")) == sorted(TAGGED_PROMPT.split(", "))
    orders = {shuffle_caption(TAGGED_PROMPT, 1, seed=0, epoch=epoch, index=3) for epoch in range(20)}
    assert len(orders) > 1
    assert shuffle_caption(TAGGED_PROMPT, 5, seed=0, epoch=1, index=3) == TAGGED_PROMPT
    assert caption_orderings(TAGGED_PROMPT, 1) == math.factorial(4)
    assert caption_orderings("a, b, b, c", 0) == 12  # 4! / 2!: repeated tags make fewer distinct captions


def test_masked_loss_is_on_the_unmasked_scale() -> None:
    error = torch.rand(2, 4, 8, 8)
    torch.testing.assert_close(masked_mean(error, torch.ones(2, 1, 8, 8)), error.reshape(2, -1).mean(1))
    pixels = torch.zeros(2, 1, 64, 64)
    pixels[..., :32] = 1.0
    grid = mask_to_latent_grid(pixels, 8)
    assert grid.shape == (2, 1, 8, 8) and float(grid[..., :4].min()) == 1.0 and float(grid[..., 4:].max()) == 0.0
    torch.testing.assert_close(masked_mean(error, grid), error[..., :4].reshape(2, -1).mean(1))


def test_held_out_images_and_fixed_noise_repeat_with_the_seed() -> None:
    assert validation_share("0.1") == 0.1 and validation_share("held-out") is None and validation_share(None) is None
    assert held_out_indices(6, 0.34, seed=0) == held_out_indices(6, 0.34, seed=0)
    assert len(held_out_indices(6, 0.34, seed=0)) == 2 and len(held_out_indices(6, 0.01, seed=0)) == 1
    assert held_out_indices(2, 0.9, seed=0) == [0, 1]  # none left to train on: the scripts refuse it

    items = [(torch.zeros(1, 4, 2, 2), "a"), (torch.zeros(1, 4, 4, 4), "b")]
    draws = []

    def loss_at(latents: torch.Tensor, key: str, sigma: float, noise: torch.Tensor) -> float:
        draws.append((key, sigma, noise))
        return float(noise.abs().mean()) * sigma

    first = fixed_noise_loss(items, 0, loss_at)
    assert [(key, sigma) for key, sigma, _ in draws] == [(k, s) for _, k in items for s in VALIDATION_SIGMAS]
    assert [noise.shape[-1] for _, _, noise in draws] == [2] * 5 + [4] * 5  # each image's shape
    noises = [noise for _, _, noise in draws]
    draws.clear()
    assert fixed_noise_loss(items, 0, loss_at) == first  # the same noise at every call
    assert all(torch.equal(a, b) for a, (_, _, b) in zip(noises, draws, strict=True))
    assert not torch.equal(noises[0], noises[1])  # each noise level draws its own
    assert fixed_noise_loss(items, 1, loss_at) != first


# ----------------------------------------------------------------------------------------------------------------
# Masks in the scripts: the gradient, and the crop
# ----------------------------------------------------------------------------------------------------------------


class RecordingTransformer(torch.nn.Module):
    """The tiny transformer, keeping its output so a test can read the loss's gradient with respect to it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.output: torch.Tensor | None = None

    def forward(self, **kwargs) -> tuple[torch.Tensor]:
        (self.output,) = self.model(**kwargs)
        self.output.retain_grad()
        return (self.output,)


def test_flux_masked_loss_gives_no_gradient_outside_the_mask(
    tiny_flux_path: Path, sample_images: Path, tmp_path: Path
) -> None:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    script = load_script()
    args = script.parse_args(["--pretrained_model_name_or_path", str(tiny_flux_path), "--instance_prompt", "x",
                              "--instance_data_dir", str(sample_images), "--timestep_sampling", "flux_shift",
                              "--output_dir", str(tmp_path / "unused")])  # fmt: skip
    model = FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer")
    transformer = RecordingTransformer(model)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_path, subfolder="scheduler")
    latent_space = script.LatentSpace(0.0, 1.0, 8)
    channels = model.config.in_channels // 4
    mean, std = torch.randn(2, channels, 4, 4), torch.full((2, channels, 4, 4), 0.1)
    sequence = torch.randn(2, 8, model.config.joint_attention_dim)
    embeddings = (sequence, torch.randn(2, model.config.pooled_projection_dim))
    masks = torch.zeros(2, 1, 32, 32)
    masks[..., :16] = 1.0  # the left half trains: latent columns 0 and 1
    torch.manual_seed(0)
    loss = script.flow_matching_loss(
        args, transformer, scheduler, latent_space, (mean, std), embeddings, model.config.guidance_embeds,
        torch.float32, masks,
    )  # fmt: skip
    loss.backward()
    gradient = FluxPipeline._unpack_latents(transformer.output.grad, 32, 32, 8)
    assert gradient.shape == (2, channels, 4, 4)
    assert float(gradient[..., 2:].abs().max()) == 0.0
    assert float(gradient[..., :2].abs().min()) > 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_sd3_masked_loss_gives_no_gradient_outside_the_mask() -> None:
    from test_sd3 import train_script

    prediction = torch.randn(4, 16, 4, 4, requires_grad=True)
    mask = torch.zeros(4, 1, 4, 4)
    mask[..., 1:3, :] = 1.0
    loss = train_script.flow_matching_loss(prediction, torch.randn(4, 16, 4, 4), torch.ones(4, 1, 1, 1), 0.5, mask)
    loss.backward()
    assert float(prediction.grad[..., [0, 3], :].abs().max()) == 0.0
    assert float(prediction.grad[..., 1:3, :].abs().min()) > 0.0


def test_flux_mask_follows_its_images_crop_and_flip(tmp_path: Path) -> None:
    """The mask is the image's red channel: after a random crop and flip it must still be that channel."""
    script = load_script()
    red = Image.linear_gradient("L").resize((96, 48)).rotate(30)
    image = Image.merge("RGB", (red, Image.new("L", red.size, 40), Image.new("L", red.size, 200)))
    example = script.Example(image, "a prompt", "one.png", mask=red)
    dataset = script.DreamBoothDataset([example], [(32, 32)], random_flip=True, seed=0)
    flipped = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        expected = (item["pixels"][0] + 1.0) / 2.0
        torch.testing.assert_close(item["mask"][0], expected, atol=1 / 255, rtol=0)
        flipped.add(float(item["mask"][0, 0, 0]) < float(item["mask"][0, 0, -1]))
    assert flipped == {True, False}, "the flip is drawn both ways over the epochs, and the mask follows each"


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def error_line(result: subprocess.CompletedProcess) -> str:
    """The worker's one `error:` line (the launcher adds its own exit-code line after it)."""
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def offload_launch(args: list[str], home: Path, script: Path | None = None) -> subprocess.CompletedProcess:
    command = launch_command(script or SCRIPT, *args, launcher="accelerate-offload", threads=os.cpu_count() or 1)
    return subprocess.run(
        command, env=environment(home), capture_output=True, text=True, cwd=home, timeout=280, check=False
    )


@pytest.fixture(scope="module")
def masks(sample_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mask per sample image, with another extension than its image: the left half trains."""
    folder = tmp_path_factory.mktemp("masks")
    for path in sample_images.glob("*.png"):
        with Image.open(path) as image:
            mask = Image.new("L", image.size, 0)
            mask.paste(255, (0, 0, image.width // 2, image.height))
            mask.save(folder / f"{path.stem}.bmp")
    return folder


def feature_args(model: Path, images: Path, masks: Path, output_dir: Path, *extra: str) -> list[str]:
    return base_args(
        model,
        output_dir,
        "--instance_data_dir", str(images),
        "--instance_prompt", TAGGED_PROMPT,
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--learning_rate", "1e-3",
        "--report_to", "tensorboard",
        "--num_validation_images", "1",
        "--mask_data_dir", str(masks),
        "--cache_latents",
        "--random_flip",
        "--timestep_sampling", "flux_shift",
        "--shuffle_caption", "--keep_tokens", "1",
        "--caption_dropout_rate", "0.25",
        "--validation_loss_images", "0.34",
        "--validation_steps", "2",
        *extra,
    )  # fmt: skip


def metrics_of(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def feature_runs(tiny_flux_path: Path, sample_images: Path, masks: Path, tmp_path_factory) -> dict[str, Path]:
    """Two runs with every feature on and the same seed, and a third with another learning rate."""
    home = tmp_path_factory.mktemp("features")
    runs = {}
    for name, extra in (("first", []), ("again", []), ("other_lr", ["--learning_rate", "3e-3"])):
        result = offload_launch(feature_args(tiny_flux_path, sample_images, masks, home / name, *extra), home)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = home / name
    return runs


def test_flux_features_run_end_to_end(feature_runs: dict[str, Path]) -> None:
    output = feature_runs["first"]
    records = metrics_of(output)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    measured = [record["step"] for record in records if "validation_loss" in record]
    assert measured == [2, 4]  # every --validation_steps, and the last step
    assert all(math.isfinite(record["validation_loss"]) for record in records if "validation_loss" in record)
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    with Image.open(output / "loss.png") as plot:
        assert plot.width > 300 and plot.height > 200
    card = (output / "README.md").read_text()
    assert "| `timestep_sampling` | `flux_shift` |" in card and "| `shuffle_caption` | `True` |" in card


def test_flux_validation_loss_goes_to_the_tracker(feature_runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for events in (feature_runs["first"] / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "validation_loss" in accumulator.Tags()["scalars"]:
            logged.update({event.step: event.value for event in accumulator.Scalars("validation_loss")})
    expected = {r["step"]: r["validation_loss"] for r in metrics_of(feature_runs["first"]) if "validation_loss" in r}
    assert logged == pytest.approx(expected)


def test_flux_validation_loss_repeats_with_the_seed_and_moves_with_the_lora(feature_runs: dict[str, Path]) -> None:
    def validation_losses(name: str) -> list[float]:
        return [record["validation_loss"] for record in metrics_of(feature_runs[name]) if "validation_loss" in record]

    assert validation_losses("first") == validation_losses("again")
    losses = {name: [r["loss"] for r in metrics_of(feature_runs[name])] for name in ("first", "again")}
    assert losses["first"] == losses["again"]
    assert all(a != b for a, b in zip(validation_losses("first"), validation_losses("other_lr"), strict=True))


def test_flux_too_many_shuffled_captions_is_one_line(
    tiny_flux_path: Path, sample_images: Path, masks: Path, tmp_path: Path
) -> None:
    args = feature_args(tiny_flux_path, sample_images, masks, tmp_path / "out", "--max_cached_captions", "3")
    result = offload_launch(args, tmp_path)
    assert result.returncode != 0
    last = error_line(result)
    assert last.startswith("error: --shuffle_caption makes ") and "--max_cached_captions 3" in last
    assert "raise --keep_tokens" in last
    assert not (tmp_path / "out").exists()


def test_flux_missing_mask_names_the_image(tiny_flux_path: Path, sample_images: Path, masks: Path, tmp_path: Path):
    partial = tmp_path / "masks"
    partial.mkdir()
    kept = sorted(masks.iterdir())
    for path in kept[1:]:
        (partial / path.name).write_bytes(path.read_bytes())
    result = offload_launch(feature_args(tiny_flux_path, sample_images, partial, tmp_path / "out"), tmp_path)
    assert result.returncode != 0
    last = error_line(result)
    assert last.startswith(f"error: no mask for training image {kept[0].stem}.png in --mask_data_dir {partial}")


def test_sd3_features_run_end_to_end(tiny_sd3_path: Path, sample_images: Path, masks: Path, tmp_path: Path) -> None:
    from test_sd3 import compute_embeddings, embedding_args

    embeddings = tmp_path / "embeddings.parquet"
    compute_embeddings.main(embedding_args(tiny_sd3_path, sample_images, embeddings))
    script = Path(__file__).resolve().parents[1] / "train_sd3_dreambooth_lora.py"
    args = ["--pretrained_model_name_or_path", str(tiny_sd3_path), "--embeddings_path", str(embeddings),
            "--instance_data_dir", str(sample_images), "--instance_prompt", INSTANCE_PROMPT, "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", "2", "--seed", "0", "--report_to", "none",
            "--mask_data_dir", str(masks), "--random_flip", "--timestep_sampling", "shift",
            "--caption_dropout_rate", "0.5", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    result = offload_launch(args, tmp_path, script)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()

    shuffled = offload_launch([*args[:-1], str(tmp_path / "shuffled"), "--shuffle_caption"], tmp_path, script)
    assert shuffled.returncode == 2
    assert error_line(shuffled).startswith("error: --shuffle_caption needs every shuffled caption embedded")
