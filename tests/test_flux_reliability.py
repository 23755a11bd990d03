"""train_flux_lora.py under faults and bad input: one clear line, never a traceback, nothing on disk lost.

Interruption, crash mid-save and exact resume run in test_train_flux.py (they compare with its uninterrupted run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from launching import environment
from PIL import Image
from safetensors.torch import load_file
from test_train_flux import INSTANCE_PROMPT, Run, base_args, launch, load_script

from accelerate_offload.script_errors import TrainingFault

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flux-reliability")


@pytest.fixture(scope="module")
def mixed_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every awkward PIL mode, one image smaller than the resolution, a truncated PNG and a stray text file."""
    folder = tmp_path_factory.mktemp("mixed-images")
    gradient = np.linspace(0, 255, 48 * 48).reshape(48, 48).astype(np.uint8)
    Image.fromarray(gradient).save(folder / "gray.png")
    Image.fromarray(gradient.astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    rgba = np.dstack([gradient, 255 - gradient, gradient, (gradient > 100).astype(np.uint8) * 255])
    Image.fromarray(rgba).save(folder / "transparent.png")
    Image.fromarray(np.dstack([gradient] * 3)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(np.dstack([gradient] * 3)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.new("RGB", (20, 12), "orange").save(folder / "tiny.png")
    Image.new("RGB", (48, 48), "blue").save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# In-process: image modes, out-of-memory wiring, NaN checks, metrics on resume
# ----------------------------------------------------------------------------------------------------------------


def test_every_image_mode_becomes_8_bit_rgb(script, mixed_images: Path) -> None:
    read = {
        path.stem: script.read_image(path) for path in mixed_images.glob("*") if path.stem not in ("truncated", "notes")
    }

    assert {image.mode for image in read.values()} == {"RGB"}
    assert np.asarray(read["sixteen_bit"])[-1, -1].tolist() == [255, 255, 255], "16-bit white stays white"
    np.testing.assert_array_equal(np.asarray(read["sixteen_bit"]), np.asarray(read["gray"]))
    corner = np.asarray(read["transparent"])[0, 0].tolist()
    assert corner == [255, 255, 255], "transparent pixels become white, not black"
    assert np.asarray(read["palette"]).std() > 10 and read["tiny"].size == (20, 12)
    with pytest.raises(ValueError, match="cannot read image .*truncated.png"):
        script.read_image(mixed_images / "truncated.png")


def test_out_of_memory_in_a_step_is_one_line_with_the_fixes(script) -> None:
    model = torch.nn.Linear(4, 4)  # not offloaded: the advice is to stream blocks

    with (
        pytest.raises(TrainingFault) as stopped,
        script.out_of_memory_explained(model, torch.device("cpu"), 2, 512, step=7),
    ):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    message = str(stopped.value)
    assert "\n" not in message and message.startswith("step 7: CUDA ran out of memory; layer offloading is off")
    assert (
        "layer_offload_fraction" in message and "lower --train_batch_size (now 2) or --resolution (now 512)" in message
    )


def test_non_finite_loss_gradient_or_weights_stop_naming_the_step(script, tmp_path: Path) -> None:
    args = argparse.Namespace(learning_rate=1e-3, output_dir=str(tmp_path))
    script.check_finite_step(0.5, 1.0, 3, args)
    script.check_finite_step(0.5, None, 3, args)  # fp16: the loss scaler handles inf gradients
    for loss, norm in ((float("nan"), 1.0), (0.5, float("inf"))):
        with pytest.raises(TrainingFault, match="^step 3: the loss is .* no checkpoint was saved yet"):
            script.check_finite_step(loss, norm, 3, args)
    lora = torch.nn.Linear(2, 2)
    script.check_finite_lora(lora, 4, args)
    with torch.no_grad():
        lora.weight[0, 0] = float("inf")
    with pytest.raises(TrainingFault, match="^step 4: the LoRA weights are not finite"):
        script.check_finite_lora(lora, 4, args)


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once(script) -> None:
    """The SIGINT path with a real signal (the SIGTERM one runs end to end in test_train_flux.py)."""
    one_process = SimpleNamespace(num_processes=1)
    stop = script.StopSignals()
    try:
        assert not stop.requested(one_process)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT and stop.requested(one_process)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


# ----------------------------------------------------------------------------------------------------------------
# Bad input: `accelerate launch --quiet`, one line naming the fix, no traceback, nothing written
# ----------------------------------------------------------------------------------------------------------------

# (id, change to the arguments or "{placeholders}", ACCELERATE_OFFLOAD_* variables, end of the last stderr line)
BAD_INPUTS = [
    (
        "data-dir-missing",
        ["--instance_data_dir", "{home}/nowhere"],
        {},
        "nowhere is not a folder; point it at a folder",
    ),
    ("data-dir-empty", ["--instance_data_dir", "{empty}"], {}, "has no images (.bmp, .gif"),
    ("images-all-unreadable", ["--instance_data_dir", "{broken}"], {}, "none of the 1 training images in"),
    ("strict-stops-on-unreadable", ["--strict", True], {}, "truncated.png (image file is truncated"),
    ("no-instance-prompt", ["--instance_prompt", None], {}, "give --instance_prompt (e.g. 'a photo of sks dog')"),
    ("two-data-sources", ["--dataset_name", "{captioned}"], {}, "give exactly one of --instance_data_dir"),
    (
        "dataset-missing",
        ["--instance_data_dir", None, "--dataset_name", "{home}/no-dataset"],
        {},
        "cannot load --dataset_name",
    ),
    (
        "caption-column-missing",
        ["--instance_data_dir", None, "--dataset_name", "{captioned}", "--caption_column", "caption"],
        {},
        "--caption_column 'caption' is not in the dataset; its columns are: image, text",
    ),
    ("resolution-not-16", ["--resolution", "40"], {}, "--resolution must be a multiple of 16, got 40; try 32 or 48"),
    ("bad-buckets", ["--aspect_ratio_buckets", "512,500"], {}, "sides must be positive multiples of 16"),
    (
        "model-missing",
        ["--pretrained_model_name_or_path", "{home}/no-model"],
        {},
        "cannot load --pretrained_model_name_or_path",
    ),
    (
        "resume-missing",
        ["--resume_from_checkpoint", "checkpoint-7"],
        {},
        "checkpoint-7 not found; give a checkpoint-N folder",
    ),
    ("output-dir-is-a-file", ["--output_dir", "{a-file}"], {}, "is a file; give a folder"),
    (
        "offload-unknown-key",
        [],
        {"ACCELERATE_OFFLOAD_LAYER_OFLOAD_FRACTION": "0.5"},
        "known settings: layer_offload_fraction",
    ),
    (
        "offload-fraction-range",
        [],
        {"ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION": "1.5"},
        "layer_offload_fraction must be in 0..1, got 1.5",
    ),
    (
        "adamw8bit-without-cuda",
        ["--optimizer", "AdamW8bit"],
        {},
        "--optimizer AdamW8bit needs a CUDA GPU; use --optimizer AdamW",
    ),
    ("validation-epochs-zero", ["--validation_epochs", "0"], {}, "--validation_epochs must be at least 1, got 0"),
    ("negative-steps", ["--max_train_steps", "-3"], {}, "--max_train_steps must be at least 1, got -3"),
    (
        "zero-learning-rate",
        ["--learning_rate", "0"],
        {},
        "--learning_rate must be a positive number, got 0.0",
    ),
    ("negative-warmup", ["--lr_warmup_steps", "-1"], {}, "--lr_warmup_steps cannot be negative, got -1"),
    (
        "sd3-pipeline",
        ["--pretrained_model_name_or_path", "{sd3}"],
        {},
        "is a StableDiffusion3Pipeline, not a FLUX.1 pipeline (train it with train_sd3_dreambooth_lora.py)",
    ),
    (
        "no-transformer",
        ["--pretrained_model_name_or_path", "{model-without-transformer}"],
        {},
        "has no transformer/ folder",
    ),
    (
        "lora-layers-typo",
        ["--lora_layers", "attn.to_q,attn.to_qq"],
        {},
        "--lora_layers attn.to_qq: the transformer has no such module",
    ),
    (
        "block-names-typo",
        ["--gradient_checkpointing", True],
        {"ACCELERATE_OFFLOAD_BLOCK_NAMES": "transformer_blockz"},
        "offload settings: FluxTransformer2DModel has no block list 'transformer_blockz'",
    ),
    ("output-dir-under-a-file", ["--output_dir", "{a-file}/out"], {}, "a-file is a file; give a folder path"),
    (
        "dataset-folder-missing",
        ["--instance_data_dir", None, "--dataset_name", "./no-such-folder", "--caption_column", "text"],
        {},
        "cannot load --dataset_name ./no-such-folder: no such folder",
    ),
    ("sequence-too-long", ["--max_sequence_length", "4096"], {}, "must be at most 512 (FLUX.1's T5 limit), got 4096"),
]


def bad_input_args(change: list, folders: dict[str, str], output_dir: Path, model: Path) -> list[str]:
    """A valid run's arguments with `change` applied: a flag followed by None is dropped, by True is set alone."""
    options = {
        "--pretrained_model_name_or_path": str(model),
        "--output_dir": str(output_dir),
        "--instance_data_dir": folders["mixed"],
        "--instance_prompt": INSTANCE_PROMPT,
        "--resolution": "32",
        "--max_sequence_length": "16",
        "--max_train_steps": "2",
    }
    for flag, value in zip(change[0::2], change[1::2]):
        options[flag] = value.format(**folders) if isinstance(value, str) else value
    args = []
    for flag, value in options.items():
        args += [flag] if value is True else [] if value is None else [flag, value]
    return args


@pytest.fixture(scope="module")
def bad_input_runs(tiny_flux_path: Path, tiny_sd3_path: Path, mixed_images: Path, home: Path) -> dict[str, Run]:
    """Every case, two at a time: each fails before any model is loaded, in a few seconds."""
    from accelerate_offload.testing.tiny_pipelines import write_sample_images

    (home / "model-without-transformer").mkdir()
    shutil.copy(tiny_flux_path / "model_index.json", home / "model-without-transformer")

    (home / "empty").mkdir()
    (home / "broken").mkdir()
    (home / "broken" / "broken.png").write_bytes(b"not an image")
    (home / "a-file").write_text("keep me")
    write_sample_images(home / "captioned", sizes=[(32, 32)], captions=True)
    folders = {
        name: str(home / name) for name in ("empty", "broken", "captioned", "a-file", "model-without-transformer")
    }
    folders.update(home=str(home), mixed=str(mixed_images), sd3=str(tiny_sd3_path))

    def run(case: tuple) -> Run:
        name, change, env, _ = case
        return launch(bad_input_args(change, folders, home / name, tiny_flux_path), home, False, extra_env=env)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([case[0] for case in BAD_INPUTS], pool.map(run, BAD_INPUTS)))


@pytest.mark.parametrize(
    ("name", "expected"), [(case[0], case[3]) for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_fails_with_one_clear_line(
    name: str, expected: str, bad_input_runs: dict[str, Run], home: Path
) -> None:
    if name == "adamw8bit-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = bad_input_runs[name]
    last_line = run.stderr.strip().splitlines()[-1]

    assert run.returncode != 0
    assert "error: " in last_line and expected in last_line, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "usage:" not in run.stderr, "an argument error is one line with a pointer to --help, not the usage text"
    if name == "output-dir-is-a-file":
        assert (home / "a-file").read_text() == "keep me"
    else:
        assert not (home / name).exists(), "nothing is written before the input is checked"


# ----------------------------------------------------------------------------------------------------------------
# Faults mid-run
# ----------------------------------------------------------------------------------------------------------------


def finite_lora(path: Path) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in load_file(path).values())


@pytest.fixture(scope="module")
def disk_full_run(tiny_flux_path: Path, mixed_images: Path, home: Path) -> Run:
    """Trains on the awkward images (batch 3, so two steps see all six readable ones); the disk fills at step 2."""
    args = base_args(
        tiny_flux_path,
        home / "disk-full",
        "--instance_data_dir", str(mixed_images),
        "--instance_prompt", INSTANCE_PROMPT,
        "--train_batch_size", "3",
        "--max_train_steps", "2",
        "--checkpointing_steps", "1",
        "--report_to", "none",
    )  # fmt: skip
    return launch(args, home, expect_success=False, save_fault="2:disk_full")


def test_unreadable_images_are_skipped_and_every_mode_trains(disk_full_run: Run) -> None:
    stderr = disk_full_run.stderr

    assert "Skipped 1 of 7 training images that cannot be read: truncated.png" in stderr
    assert "1 images are smaller than their training size and are upscaled: tiny.png (20x12 < 32x32)" in stderr
    indices = [index for record in disk_full_run.metrics() for index in record["indices"]]
    assert sorted(indices) == list(range(6)), "gray, 16-bit, RGBA, palette, CMYK and the tiny image all trained"
    assert all(np.isfinite(record["loss"]) for record in disk_full_run.metrics())


def test_a_full_disk_while_saving_stops_and_keeps_the_previous_checkpoint(disk_full_run: Run) -> None:
    out = disk_full_run.output_dir
    last_line = disk_full_run.stderr.strip().splitlines()[-1]

    assert disk_full_run.returncode != 0 and "Traceback" not in disk_full_run.stderr
    assert last_line.startswith("error: could not save checkpoint-2 at step 2 (OSError: [Errno 28] No space left")
    assert f"{out / 'checkpoint-1'} is intact" in last_line and "--resume_from_checkpoint latest" in last_line
    assert sorted(path.name for path in out.iterdir() if path.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert finite_lora(out / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_a_huge_learning_rate_stops_at_the_first_nan_and_saves_nothing_broken(
    tiny_flux_path: Path, sample_images: Path, home: Path
) -> None:
    # lr 1e30: step 1 leaves finite but enormous LoRA weights; step 2's forward pass overflows to inf/NaN
    args = base_args(
        tiny_flux_path,
        home / "nan",
        "--instance_data_dir", str(sample_images),
        "--instance_prompt", INSTANCE_PROMPT,
        "--train_batch_size", "2",
        "--max_train_steps", "3",
        "--checkpointing_steps", "1",
        "--learning_rate", "1e30",
        "--report_to", "none",
    )  # fmt: skip

    run = launch(args, home, expect_success=False)

    last_line = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert last_line.startswith(("error: step 2: the loss is nan", "error: step 2: the loss is inf"))
    assert "Lower --learning_rate (now 1e+30)" in last_line
    assert f"the last good checkpoint is {run.output_dir / 'checkpoint-1'}" in last_line
    assert [record["step"] for record in run.metrics()] == [1]
    assert sorted(path.name for path in run.output_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert finite_lora(run.output_dir / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert not (run.output_dir / "pytorch_lora_weights.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# Exact resume with random crops and flips
# ----------------------------------------------------------------------------------------------------------------


def random_crop_args(model: Path, images: Path, output_dir: Path, *extra: str) -> list[str]:
    """Square training at 32 px: the 96x64, 64x96, 80x48 and 48x80 sample images are cropped at random, and flipped."""
    args = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir)]
    args += ["--instance_data_dir", str(images), "--instance_prompt", INSTANCE_PROMPT, "--random_flip"]
    args += ["--resolution", "32", "--max_sequence_length", "16", "--seed", "0", "--train_batch_size", "2"]
    args += ["--max_train_steps", "5", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--report_to", "none"]
    return args + list(extra)


def test_crops_and_flips_depend_on_seed_epoch_and_index_only(script, sample_images: Path) -> None:
    import random

    examples = [script.Example(script.read_image(path), "p") for path in sorted(sample_images.glob("*.png"))]
    dataset = script.DreamBoothDataset(examples, [(32, 32)], random_flip=True, seed=0)

    random.seed(1)
    first = [dataset[index]["pixels"] for index in range(len(dataset))]
    random.seed(2)
    again = [dataset[index]["pixels"] for index in reversed(range(len(dataset)))][::-1]
    dataset.set_epoch(1)
    next_epoch = [dataset[index]["pixels"] for index in range(len(dataset))]

    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, next_epoch)), "a new epoch draws new crops and flips"


@pytest.fixture(scope="module")
def crops_run(tiny_flux_path: Path, sample_images: Path, home: Path) -> Run:
    """5 steps with random crops and flips, checkpoint-2 and checkpoint-4."""
    return launch(random_crop_args(tiny_flux_path, sample_images, home / "crops-straight"), home)


def test_resume_with_random_crops_and_flips_is_bit_exact(
    crops_run: Run, tiny_flux_path: Path, sample_images: Path, home: Path
) -> None:
    """5 steps straight == the same run resumed from its checkpoint-2 (mid-epoch 0, then across into epoch 1)."""
    straight = crops_run
    resumed_dir = home / "crops-resumed"
    resumed_dir.mkdir()
    shutil.copytree(straight.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")

    extra = ["--resume_from_checkpoint", "latest"]
    resumed = launch(random_crop_args(tiny_flux_path, sample_images, resumed_dir, *extra), home)

    after = [record for record in straight.metrics() if record["step"] > 2]
    assert [record["step"] for record in resumed.metrics()] == [3, 4, 5]
    for key in ("epoch", "indices", "loss"):
        assert [record[key] for record in resumed.metrics()] == [record[key] for record in after], key
    original, again = straight.lora(), resumed.lora()
    assert original.keys() == again.keys() and all(torch.equal(again[key], original[key]) for key in original)


# ----------------------------------------------------------------------------------------------------------------
# An --output_dir that holds another run
# ----------------------------------------------------------------------------------------------------------------


def test_a_finished_run_is_never_overwritten(tiny_flux_path: Path, sample_images: Path, home: Path) -> None:
    finished = home / "finished"
    finished.mkdir()
    for name, text in (("pytorch_lora_weights.safetensors", "earlier LoRA"), ("metrics.jsonl", '{"step": 1}\n')):
        (finished / name).write_text(text)
    args = base_args(tiny_flux_path, finished, "--instance_data_dir", str(sample_images))
    args += ["--instance_prompt", INSTANCE_PROMPT, "--max_train_steps", "1", "--report_to", "none"]

    new_run = launch(args, home, expect_success=False)
    latest = launch([*args, "--resume_from_checkpoint", "latest"], home, expect_success=False)

    assert (
        new_run.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"--output_dir {finished} holds an earlier run (metrics.jsonl, pytorch_lora_weights.safetensors): add "
            "--resume_from_checkpoint latest to continue it, or choose a new --output_dir"
        )
    ), new_run.stderr[-2000:]
    assert (
        latest.stderr.strip().splitlines()[-1].endswith("but no checkpoint to continue from: choose a new --output_dir")
    ), latest.stderr[-2000:]
    assert new_run.returncode != 0 and latest.returncode != 0
    assert sorted(path.name for path in finished.iterdir()) == ["metrics.jsonl", "pytorch_lora_weights.safetensors"]
    assert (finished / "pytorch_lora_weights.safetensors").read_text() == "earlier LoRA"
    assert (finished / "metrics.jsonl").read_text() == '{"step": 1}\n'


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints that cannot be resumed
# ----------------------------------------------------------------------------------------------------------------


def test_a_damaged_checkpoint_is_named_with_the_next_usable_one(
    crops_run: Run, script, tiny_flux_path: Path, sample_images: Path, home: Path, capsys
) -> None:
    damaged = home / "damaged"
    shutil.copytree(crops_run.output_dir, damaged)
    optimizer = damaged / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    args = random_crop_args(tiny_flux_path, sample_images, damaged, "--resume_from_checkpoint", "latest")

    run = launch(args, home, expect_success=False)

    last_line = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"error: cannot resume from {damaged / 'checkpoint-4'}: its optimizer.bin cannot be read (" in last_line
    assert last_line.endswith(
        f"the next usable earlier checkpoint is {damaged / 'checkpoint-2'}: resume with --resume_from_checkpoint "
        f"{damaged / 'checkpoint-2'}"
    )

    lora = damaged / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:-10])
    with pytest.raises(SystemExit):
        script.parse_args(args)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-4: its optimizer.bin cannot be read" in line and line.endswith("no earlier checkpoint is usable")
    with pytest.raises(SystemExit):
        script.parse_args([*args, "--resume_from_checkpoint", str(damaged / "checkpoint-2")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-2: its pytorch_lora_weights.safetensors cannot be read (" in line


def test_a_checkpoint_of_another_rank_or_other_layers_is_refused(
    crops_run: Run, script, sample_images: Path, capsys
) -> None:
    out = crops_run.output_dir
    common = ["--pretrained_model_name_or_path", "unused", "--instance_data_dir", str(sample_images)]
    args = [*common, "--instance_prompt", "p", "--output_dir", str(out), "--resume_from_checkpoint", "latest"]

    for extra, expected in (
        (["--rank", "8"], "its LoRA has rank 4, --rank is 8 (pass --rank 4 to continue it); no earlier checkpoint"),
        (["--lora_layers", "attn.to_k"], "it has LoRA layers not in --lora_layers ("),
        (["--lora_layers", f"{script.DEFAULT_LORA_LAYERS},proj_mlp"], "it has no LoRA on proj_mlp; pass the"),
    ):
        with pytest.raises(SystemExit):
            script.parse_args([*args, *extra])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"cannot resume from {out / 'checkpoint-4'}: {expected}" in line, line


# ----------------------------------------------------------------------------------------------------------------
# Subfolders, long prompts
# ----------------------------------------------------------------------------------------------------------------


def test_subfolders_of_the_image_folder_are_included_hidden_ones_not(script, tmp_path: Path) -> None:
    for name in ("top.png", "dogs/sub.png", "dogs/deeper/deep.jpg", ".cache/hidden.png", "dogs/.thumb.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(tmp_path / name)

    found = [path.relative_to(tmp_path).as_posix() for path in script.list_images(tmp_path)]

    assert found == ["dogs/deeper/deep.jpg", "dogs/sub.png", "top.png"]


def test_truncation_warnings_name_only_the_first_dropped_words(script, tiny_flux_path: Path) -> None:
    import logging.handlers

    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    pipeline = FluxPipeline.from_pretrained(tiny_flux_path, transformer=None, vae=None)
    pipeline_logger = diffusers_logging.get_logger(FluxPipeline.__module__)
    shorten, seen = script.ShortTruncationWarnings(), logging.handlers.BufferingHandler(capacity=100)
    pipeline_logger.addFilter(shorten)
    pipeline_logger.addHandler(seen)
    try:
        pipeline.encode_prompt(
            " ".join(f"word{number}" for number in range(200)), prompt_2=None, max_sequence_length=16
        )
    finally:
        pipeline_logger.removeFilter(shorten)
        pipeline_logger.removeHandler(seen)

    warnings = [record.getMessage() for record in seen.buffer if "truncated" in record.getMessage()]
    assert len(warnings) == 2, warnings  # CLIP's 77 tokens, then T5's --max_sequence_length
    assert all("word199" not in line and len(line) < 250 and line.endswith(" ...") for line in warnings), warnings
    assert "`max_sequence_length` is set to  16 tokens; dropped 186 words: rd14 word15 word16" in warnings[1]


# ----------------------------------------------------------------------------------------------------------------
# --push_to_hub against a local Hub
# ----------------------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_lora_card_and_images_and_a_failed_upload_says_how_to_retry(
    tiny_flux_path: Path, sample_images: Path, home: Path
) -> None:
    import shlex
    import subprocess

    from hub_server import NAMESPACE, HubServer

    def args(output_dir: Path, token: str) -> list[str]:
        extra = ["--instance_data_dir", str(sample_images), "--instance_prompt", INSTANCE_PROMPT, "--report_to", "none"]
        extra += ["--max_train_steps", "2", "--checkpointing_steps", "1", "--num_validation_images", "1"]
        extra += ["--push_to_hub", "--hub_model_id", "tiny-lora", "--hub_token", token]
        return base_args(tiny_flux_path, output_dir, *extra)

    with HubServer(token="good-token") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        pushed = launch(args(home / "pushed", "good-token"), home, extra_env=env)
        bad_token = launch(args(home / "bad-token", "wrong-token"), home, expect_success=False, extra_env=env)
        hub.fail_commits = True
        failed = launch(args(home / "upload-fails", "good-token"), home, expect_success=False, extra_env=env)
        hub.fail_commits = False
        retry_command = failed.stderr.strip().splitlines()[-1].partition("without training again: ")[2]
        retry_env = environment(home, **env, HF_TOKEN="good-token")
        retried = subprocess.run(shlex.split(retry_command), env=retry_env, capture_output=True, text=True, cwd=home)

    (commit, retried_commit) = hub.commits
    assert sorted(commit) == [
        "README.md",
        "final-0.png",
        "final-grid.png",
        "loss.png",
        "metrics.jsonl",
        "pytorch_lora_weights.safetensors",
    ]
    assert (
        commit["pytorch_lora_weights.safetensors"]
        == (pushed.output_dir / "pytorch_lora_weights.safetensors").read_bytes()
    )
    assert f"{NAMESPACE}/tiny-lora" in commit["README.md"].decode()
    assert (pushed.output_dir / "checkpoint-2").is_dir(), "checkpoints stay local"

    bad_line = bad_token.stderr.strip().splitlines()[-1]
    assert (
        bad_line.startswith("error: --push_to_hub: cannot create the Hub repository tiny-lora (") and "401" in bad_line
    )
    assert not (home / "bad-token").exists(), "the folder the run created, left empty, is removed"

    failed_line = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert failed_line.startswith(f"error: the upload to {NAMESPACE}/tiny-lora failed (") and "500" in failed_line
    assert retry_command.startswith(f"hf upload {NAMESPACE}/tiny-lora {home / 'upload-fails'} --exclude 'checkpoint-*'")
    assert {"pytorch_lora_weights.safetensors", "README.md", "final-0.png", "checkpoint-2"} <= {
        path.name for path in failed.output_dir.iterdir()
    }, "a failed upload keeps every file"
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert sorted(retried_commit) == sorted(commit)
    assert (
        retried_commit["pytorch_lora_weights.safetensors"]
        == (failed.output_dir / "pytorch_lora_weights.safetensors").read_bytes()
    )
