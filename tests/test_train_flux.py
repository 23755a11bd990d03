"""End-to-end runs of train_flux_lora.py through `accelerate launch` on the CPU with the tiny Flux pipeline."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import launching
from launching import REPO, environment, launch_command, start, worker
from PIL import Image
from safetensors.torch import load_file

SCRIPT = REPO / "train_flux_lora.py"
RESOLUTION = 32
INSTANCE_PROMPT = "a photo of sks shape"
VALIDATION_PROMPT = "a sks shape in the snow"

pytestmark = pytest.mark.timeout(300)


@dataclass
class Run:
    output_dir: Path
    stdout: str
    stderr: str
    returncode: int
    files: list[str] = field(default_factory=list)  # what a run of a chain left, before the next one changed it

    def metrics(self) -> list[dict]:
        lines = (self.output_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def lora(self) -> dict[str, torch.Tensor]:
        return load_file(self.output_dir / "pytorch_lora_weights.safetensors")


def load_script():
    """The training script as a module, for its data helpers."""
    spec = importlib.util.spec_from_file_location("train_flux_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# Runs the script given as its first argument, unchanged, as __main__, after making the LoRA write of
# checkpoint-STEP fail: "STEP:kill" SIGKILLs the process as a power cut would, "STEP:disk_full" raises ENOSPC.
SAVE_FAULT_WRAPPER = """
import errno, os, runpy, signal, sys
from pathlib import Path

from diffusers import FluxPipeline

step, _, fault = os.environ["FLUX_TEST_SAVE_FAULT"].partition(":")
real_save = FluxPipeline.save_lora_weights.__func__


def save_lora_weights(cls, save_directory, *args, **kwargs):
    real_save(cls, save_directory, *args, **kwargs)
    if Path(save_directory).name == f"checkpoint-{step}.tmp":
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(save_directory))


FluxPipeline.save_lora_weights = classmethod(save_lora_weights)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def output_dir_of(args: list[str], home: Path) -> Path:
    return Path(args[args.index("--output_dir") + 1]) if "--output_dir" in args else home


def launch(
    args: list[str],
    home: Path,
    expect_success: bool = True,
    extra_env: dict[str, str] | None = None,
    save_fault: str | None = None,
) -> Run:
    """`accelerate launch --quiet` of the script on one CPU process.

    `save_fault` ("STEP:kill" or "STEP:disk_full") runs the script under SAVE_FAULT_WRAPPER.
    """
    env = environment(home, **(extra_env or {}))
    script = [SCRIPT]
    if save_fault:
        env["FLUX_TEST_SAVE_FAULT"] = save_fault
        wrapper = home / "save_fault_wrapper.py"
        wrapper.write_text(SAVE_FAULT_WRAPPER)
        script = [wrapper, SCRIPT]
    result = launching.run(launch_command(*script, *args, threads=os.cpu_count() or 1), home, env, timeout=280)
    run = Run(output_dir_of(args, home), result.stdout, result.stderr, result.returncode)
    if expect_success:
        assert result.returncode == 0, result.stderr[-4000:]
    return run


def launch_and_signal(args: list[str], home: Path, number: signal.Signals, after_step: int) -> Run:
    """Sends `number` to the training process (not the launcher, which does not forward it) after `after_step`."""
    output_dir = output_dir_of(args, home)
    command = launch_command(SCRIPT, *args, launcher="accelerate-offload", threads=os.cpu_count() or 1)
    with (home / f"{output_dir.name}.log").open("w+") as log:
        process = start(command, home, log, env=environment(home))
        deadline = time.monotonic() + 240
        metrics = output_dir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= after_step):
            assert process.poll() is None and time.monotonic() < deadline, "training ended before the signal"
            time.sleep(0.02)
        worker(process).send_signal(number)
        returncode = process.wait(timeout=120)
        log.seek(0)
        output = log.read()
    return Run(output_dir, "", output, returncode)


def base_args(model: Path, output_dir: Path, *extra: str) -> list[str]:
    common = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir)]
    common += ["--resolution", str(RESOLUTION), "--max_sequence_length", "16", "--seed", "0", "--center_crop"]
    return common + list(extra)


def dreambooth_args(model: Path, images: Path, output_dir: Path, *extra: str) -> list[str]:
    return base_args(
        model,
        output_dir,
        "--instance_data_dir", str(images),
        "--instance_prompt", INSTANCE_PROMPT,
        "--aspect_ratio_buckets", "auto",
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--checkpointing_steps", "2",
        "--learning_rate", "1e-3",
        "--validation_prompt", VALIDATION_PROMPT,
        "--num_validation_images", "2",
        "--validation_epochs", "2",  # at the end of epoch 0 (step 3); the final run adds 2 more images
        *extra,
    )  # fmt: skip


def captioned_args(model: Path, images: Path, output_dir: Path, *extra: str, report_to: str = "none") -> list[str]:
    return base_args(
        model,
        output_dir,
        "--dataset_name", str(images),
        "--caption_column", "text",
        "--train_batch_size", "1",
        "--max_train_steps", "2",
        "--report_to", report_to,
        "--num_validation_images", "1",
        *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-flux")


@pytest.fixture(scope="module")
def dreambooth_run(tiny_flux_path: Path, sample_images: Path, home: Path) -> Run:
    """DreamBooth folder, mixed image shapes in buckets, batch 2, checkpoints every 2 steps, validation each epoch."""
    return launch(dreambooth_args(tiny_flux_path, sample_images, home / "dreambooth"), home)


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from accelerate_offload.testing.tiny_pipelines import write_sample_images

    return write_sample_images(tmp_path_factory.mktemp("captioned"), captions=True)


@pytest.fixture(scope="module")
def uncached_run(tiny_flux_path: Path, captioned_images: Path, home: Path) -> Run:
    return launch(captioned_args(tiny_flux_path, captioned_images, home / "uncached"), home)


@pytest.fixture(scope="module")
def cached_wandb_run(tiny_flux_path: Path, captioned_images: Path, home: Path) -> Run:
    """Same data and seed as `uncached_run`, with cached latents, wandb (offline) and a validation image."""
    extra = ["--cache_latents", "--validation_prompt", VALIDATION_PROMPT]
    args = captioned_args(tiny_flux_path, captioned_images, home / "cached", *extra, report_to="wandb")
    return launch(args, home)


def test_dreambooth_run_writes_lora_model_card_and_images(dreambooth_run: Run) -> None:
    out = dreambooth_run.output_dir
    lora = dreambooth_run.lora()
    assert lora and all(key.startswith("transformer.") and ".lora_" in key for key in lora)
    assert all(tensor.dtype == torch.float32 for tensor in lora.values()), "LoRA parameters train in fp32"
    card = (out / "README.md").read_text()
    for expected in (
        "template:sd-lora",
        f"instance_prompt: {INSTANCE_PROMPT}",
        "url: final-0.png",
        "| `rank` | `4` |",
    ):
        assert expected in card
    assert sorted(path.name for path in out.glob("final-*.png")) == ["final-0.png", "final-1.png", "final-grid.png"]
    validation = sorted(path.name for path in (out / "validation").glob("*.png"))
    assert validation == ["step-000003-0.png", "step-000003-1.png", "step-000003-grid.png"]
    assert Image.open(out / "validation" / "step-000003-0.png").size == (RESOLUTION, RESOLUTION)
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard is the default tracker"
    metrics = dreambooth_run.metrics()
    assert [record["step"] for record in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(record["loss"]) and record["seconds_per_step"] > 0 for record in metrics)
    assert "Encoded 2 prompts; text encoders freed" in dreambooth_run.stderr  # instance + validation


def test_each_image_trains_at_its_own_bucket(dreambooth_run: Run, sample_images: Path) -> None:
    from diffusers.training_utils import generate_aspect_ratio_buckets

    script = load_script()
    buckets = generate_aspect_ratio_buckets(RESOLUTION, divisibility=script.SIZE_MULTIPLE)
    expected = {script.nearest_bucket(Image.open(path).size, buckets) for path in sample_images.glob("*.png")}

    seen = {tuple(record["size"]) for record in dreambooth_run.metrics()[:3]}  # epoch 0 visits every bucket once

    assert len(expected) >= 3 and seen == expected


def test_bucket_batches_never_mix_shapes_and_follow_the_epoch(sample_images: Path) -> None:
    from diffusers.training_utils import generate_aspect_ratio_buckets

    script = load_script()
    examples = [script.Example(script.read_image(path), "p") for path in sorted(sample_images.glob("*.png"))]
    dataset = script.DreamBoothDataset(examples, generate_aspect_ratio_buckets(64), center_crop=True)
    sampler = script.BucketBatchSampler(dataset, batch_size=2, seed=0)

    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)

    assert sorted(index for batch in first for index in batch) == list(range(len(examples)))
    assert all(len({dataset.bucket_of(index) for index in batch}) == 1 for batch in first)
    sampler.set_epoch(0)
    assert list(sampler) == first and second != first


def test_saved_lora_loads_in_flux_pipeline_and_changes_the_output(dreambooth_run: Run, tiny_flux_path: Path) -> None:
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(tiny_flux_path)

    def image() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        kwargs = {"height": RESOLUTION, "width": RESOLUTION, "num_inference_steps": 4, "max_sequence_length": 16}
        return pipeline(VALIDATION_PROMPT, generator=generator, output_type="np", **kwargs).images[0]

    before = image()
    pipeline.load_lora_weights(dreambooth_run.output_dir)
    after = image()

    assert np.abs(after - before).max() > 1e-3


@pytest.fixture(scope="module")
def interrupted_run(tiny_flux_path: Path, sample_images: Path, home: Path) -> Run:
    """The DreamBooth run, sent SIGTERM once step 1 is logged: it saves at the next step boundary and exits."""
    args = dreambooth_args(tiny_flux_path, sample_images, home / "interrupted")
    return snapshot(launch_and_signal(args, home, signal.SIGTERM, after_step=1))


@pytest.fixture(scope="module")
def crashed_run(interrupted_run: Run, tiny_flux_path: Path, sample_images: Path, home: Path) -> Run:
    """Resumes the interrupted run and is SIGKILLed half-way through writing checkpoint-4 (LoRA written, rest not)."""
    extra = ["--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1"]
    args = dreambooth_args(tiny_flux_path, sample_images, interrupted_run.output_dir, *extra)
    return snapshot(launch(args, home, expect_success=False, save_fault="4:kill"))


@pytest.fixture(scope="module")
def resumed_run(crashed_run: Run, tiny_flux_path: Path, sample_images: Path, home: Path) -> Run:
    extra = ["--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1"]
    return launch(dreambooth_args(tiny_flux_path, sample_images, crashed_run.output_dir, *extra), home)


def snapshot(run: Run) -> Run:
    """The run with the files it left: output_dir's and those inside its checkpoint folders."""
    out = run.output_dir
    return replace(
        run, files=sorted(str(path.relative_to(out)) for path in [*out.glob("*"), *out.glob("checkpoint-*/*")])
    )


def checkpoint_names(output_dir: Path) -> list[str]:
    return sorted(path.name for path in output_dir.glob("checkpoint-*"))


def test_sigterm_saves_a_checkpoint_at_the_next_step_and_says_how_to_resume(interrupted_run: Run) -> None:
    (checkpoint,) = [name for name in interrupted_run.files if name.startswith("checkpoint-") and "/" not in name]
    step = int(checkpoint.removeprefix("checkpoint-"))
    message = (
        f"Stopped by SIGTERM at step {step}; saved {interrupted_run.output_dir / checkpoint}. To continue, run the "
        "same command with --resume_from_checkpoint latest"
    )

    assert interrupted_run.returncode == 128 + signal.SIGTERM, interrupted_run.stderr[-3000:]
    assert message in interrupted_run.stderr and "Traceback" not in interrupted_run.stderr
    assert 1 <= step < 4, "the signal came once step 1 was logged; the run stops at the end of the step it hit"
    assert [record["step"] for record in interrupted_run.metrics()][:step] == list(range(1, step + 1))
    assert "pytorch_lora_weights.safetensors" not in interrupted_run.files


def test_a_crash_while_saving_keeps_the_previous_checkpoint(interrupted_run: Run, crashed_run: Run) -> None:
    (stopped_at,) = [name for name in interrupted_run.files if name.startswith("checkpoint-") and "/" not in name]
    # the last complete checkpoint before step 4: the crashed run itself saves checkpoint-2 if it resumed from 1
    earlier = f"checkpoint-{max(2, int(stopped_at.removeprefix('checkpoint-')))}"
    checkpoints = [name for name in crashed_run.files if name.startswith("checkpoint-") and "/" not in name]
    in_partial = [name for name in crashed_run.files if name.startswith("checkpoint-4.tmp/")]

    assert crashed_run.returncode != 0
    # the new checkpoint never got its name, and --checkpoints_total_limit 1 removed nothing before it was complete
    assert checkpoints == [earlier, "checkpoint-4.tmp"]
    assert f"{earlier}/optimizer.bin" in crashed_run.files
    assert in_partial == ["checkpoint-4.tmp/pytorch_lora_weights.safetensors"], "killed after the LoRA, before Adam"
    assert "pytorch_lora_weights.safetensors" not in crashed_run.files


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(dreambooth_run: Run, resumed_run: Run) -> None:
    """N steps straight == stopped by SIGTERM, resumed, killed mid-save, resumed again: weights, Adam, lr, data."""
    out = resumed_run.output_dir
    assert "Removing" in resumed_run.stderr and "checkpoint-4.tmp, left by a save that did not finish" in (
        resumed_run.stderr
    )
    assert checkpoint_names(out) == ["checkpoint-4"], "the limit pruned the older one once checkpoint-4 was complete"

    # metrics.jsonl dropped the steps the crashed run logged after its checkpoint; the resumed run logged them again
    straight, resumed = dreambooth_run.metrics(), resumed_run.metrics()
    for key in ("step", "epoch", "loss", "lr", "size", "indices"):
        assert [record[key] for record in resumed] == [record[key] for record in straight], key
    original, again = dreambooth_run.lora(), resumed_run.lora()
    assert original.keys() == again.keys()
    assert all(torch.equal(again[key], original[key]) for key in original)

    def state(run: Run, name: str) -> dict:
        return torch.load(run.output_dir / "checkpoint-4" / name, weights_only=False)

    adam, adam_again = state(dreambooth_run, "optimizer.bin"), state(resumed_run, "optimizer.bin")
    assert adam["param_groups"] == adam_again["param_groups"]
    assert adam["state"].keys() == adam_again["state"].keys() and len(adam["state"]) > 0
    for number, moments in adam["state"].items():
        assert all(torch.equal(adam_again["state"][number][key], value) for key, value in moments.items())
    assert state(dreambooth_run, "scheduler.bin") == state(resumed_run, "scheduler.bin")


def test_imagefolder_captions_are_the_prompts(uncached_run: Run, captioned_images: Path) -> None:
    captions = {json.loads(line)["text"] for line in (captioned_images / "metadata.jsonl").read_text().splitlines()}

    # every caption plus the final image's prompt (the first caption, as no other prompt was given)
    assert f"Encoded {len(captions)} prompts; text encoders freed" in uncached_run.stderr
    assert len(uncached_run.metrics()) == 2
    assert "widget:\n- text: a " in (uncached_run.output_dir / "README.md").read_text()


def test_cached_latents_give_the_same_losses(uncached_run: Run, cached_wandb_run: Run) -> None:
    cached = [record["loss"] for record in cached_wandb_run.metrics()]
    uncached = [record["loss"] for record in uncached_run.metrics()]

    np.testing.assert_allclose(cached, uncached, rtol=1e-4)


def test_wandb_offline_run_has_loss_and_validation_images(cached_wandb_run: Run, home: Path) -> None:
    (run_dir,) = (home / "wandb").glob("offline-run-*")
    (history,) = run_dir.glob("run-*.wandb")

    logged = history.read_bytes()  # offline runs keep their history as JSON values inside this binary log
    images = [path.name for path in (run_dir / "files" / "media" / "images").rglob("*.png")]

    assert all(json.dumps(record["loss"]).encode() in logged for record in cached_wandb_run.metrics())
    assert any(name.startswith("validation") for name in images)
    assert any(name.startswith("test") for name in images), "the final run's images are logged too"


def test_gradient_checkpointing_goes_through_the_offload_plugin(
    uncached_run: Run, tiny_flux_path: Path, captioned_images: Path, home: Path
) -> None:
    args = captioned_args(tiny_flux_path, captioned_images, home / "checkpointed", "--gradient_checkpointing")

    run = launch(args, home)

    assert "checkpointing on" in run.stderr, "the runtime logs how it set the model up"
    losses = [record["loss"] for record in run.metrics()]
    np.testing.assert_allclose(losses, [record["loss"] for record in uncached_run.metrics()], rtol=1e-5)


def test_prior_preservation_generates_class_images_and_trains_at_batch_size_two(
    tiny_flux_path: Path, sample_images: Path, home: Path
) -> None:
    class_dir = home / "class-images"
    args = base_args(
        tiny_flux_path,
        home / "prior",
        "--instance_data_dir", str(sample_images),
        "--instance_prompt", INSTANCE_PROMPT,
        "--with_prior_preservation",
        "--class_prompt", "a photo of a shape",
        "--class_data_dir", str(class_dir),
        "--num_class_images", "3",
        "--sample_batch_size", "2",
        "--aspect_ratio_buckets", "auto",
        "--train_batch_size", "2",
        "--max_train_steps", "2",
        "--report_to", "none",
    )  # fmt: skip

    run = launch(args, home)

    class_images = sorted(class_dir.glob("*.png"))
    assert len(class_images) == 3
    assert {Image.open(path).size for path in class_images} == {(RESOLUTION, RESOLUTION)}
    assert len(run.metrics()) == 2 and all(np.isfinite(record["loss"]) for record in run.metrics())


def test_prior_batches_pair_every_image_with_its_own_prompt(sample_images: Path, tmp_path: Path) -> None:
    script = load_script()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "class.png")
    paths = sorted(sample_images.glob("*.png"))
    examples = [script.Example(script.read_image(path), f"prompt {path.stem}") for path in paths]
    dataset = script.DreamBoothDataset(examples, [(32, 32)], [tmp_path / "class.png"], "class prompt", True)
    prompts = sorted({example.prompt for example in examples} | {"class prompt"})
    cache = {
        p: script.PromptEmbeddings(torch.full((4, 8), float(n)), torch.full((8,), float(n)))
        for n, p in enumerate(prompts)
    }

    batch = script.collate([dataset[0], dataset[1]])
    sequence, pooled = script.stack_embeddings(cache, batch["prompts"], torch.device("cpu"), torch.float32)

    assert batch["pixels"].shape == (4, 3, 32, 32)
    assert batch["prompts"][2:] == ["class prompt", "class prompt"]
    assert batch["prompts"][:2] == [examples[0].prompt, examples[1].prompt]
    assert sequence.shape[0] == pooled.shape[0] == 4
    assert [row[0].item() for row in pooled] == [cache[prompt].pooled[0].item() for prompt in batch["prompts"]]


def test_earlier_checkpoints_are_never_overwritten(
    dreambooth_run: Run, tiny_flux_path: Path, sample_images: Path, home: Path
) -> None:
    before = sorted(path.name for path in dreambooth_run.output_dir.glob("checkpoint-*"))
    args = dreambooth_args(tiny_flux_path, sample_images, dreambooth_run.output_dir, "--checkpoints_total_limit", "1")

    run = launch(args, home, expect_success=False)

    assert "--resume_from_checkpoint latest" in run.stderr.strip().splitlines()[-1]
    assert (
        sorted(path.name for path in dreambooth_run.output_dir.glob("checkpoint-*"))
        == before
        == [
            "checkpoint-2",
            "checkpoint-4",
        ]
    )
