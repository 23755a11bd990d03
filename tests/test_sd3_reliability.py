"""The SD3 scripts under interruption, faults and bad input, through real `accelerate launch --cpu` subprocesses.

Exact resume (cached latents too), atomic checkpoints (a process killed mid-save), SIGTERM/SIGINT, a non-finite
loss, out of memory and a table of bad inputs. Runs that do not depend on each other go two at a time (the CI
machine has two cores).
Faults that cannot be caused for real on a CPU (a kill in the middle of a save, CUDA out of memory) are injected
by a wrapper that patches one function and then runs the unchanged script.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: prove nothing is fetched

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import test_sd3  # noqa: E402
import torch  # noqa: E402
from launching import REPO, environment, launch_command, run, start, worker  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_sd3 import INSTANCE_PROMPT, MAX_SEQUENCE_LENGTH, compute_embeddings, embedding_args, train_script  # noqa: E402

from accelerate_offload.script_errors import UsageError  # noqa: E402

TRAINING_STATE = train_script.TRAINING_STATE
# the module fixtures of test_sd3.py (fixtures are found by name among a module's attributes)
instance_dir = test_sd3.instance_dir
embeddings_path = test_sd3.embeddings_path

pytestmark = pytest.mark.timeout(600)

# Patches one function, then runs the script given as its first argument, unchanged, as __main__.
FAULT_WRAPPER = """
import os, runpy, signal, sys
import torch

fault = os.environ["SD3_TEST_FAULT"]
if fault == "kill_mid_save":
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if "checkpoint-4.tmp" in str(f):  # one file of checkpoint-4 written: die as a power cut would
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save
elif fault == "oom":
    from diffusers import SD3Transformer2DModel

    def forward(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    SD3Transformer2DModel.forward = forward
elif fault == "sigint_while_embedding":  # Ctrl-C while a prompt is embedded
    from diffusers import StableDiffusion3Pipeline

    def encode_prompt(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)

    StableDiffusion3Pipeline.encode_prompt = encode_prompt
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
STEPS = 4  # 6 images at batch size 2: 3 steps an epoch, so the run resumes mid-epoch and crosses an epoch


def train_args(tiny_sd3_path: Path, embeddings: Path, images: Path, output_dir: Path, *extra: str) -> list[str]:
    args = [str(REPO / "train_sd3_dreambooth_lora.py"), "--pretrained_model_name_or_path", str(tiny_sd3_path)]
    args += ["--instance_prompt", INSTANCE_PROMPT, "--resolution", "32", "--report_to", "none", "--seed", "0"]
    args += ["--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--train_batch_size", "2"]
    args += ["--embeddings_path", str(embeddings), "--instance_data_dir", str(images), "--output_dir", str(output_dir)]
    return args + list(extra)


def in_pairs(jobs: dict) -> dict:
    """Runs the callables of `jobs` two at a time; their results by the same keys."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = last_line(result)
    assert re.match(r"(\S+: )?error: ", line), result.stderr[-3000:]  # ours, or argparse's `prog: error:`
    for fragment in fragments:
        assert fragment in line, line


def interrupt(command: list[str], cwd: Path, output_dir: Path, signum: int) -> subprocess.CompletedProcess:
    """Starts a long run, waits for its first checkpoint, sends `signum` to the training process, waits."""
    stdout, stderr = cwd / f"{signum}.out", cwd / f"{signum}.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        launcher = start(command, cwd, out, err)
        deadline = time.monotonic() + 300
        while not (output_dir / "checkpoint-2").exists():  # renamed into place once complete
            assert launcher.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.2)
        worker(launcher).send_signal(signum)
        launcher.wait(timeout=300)
    return subprocess.CompletedProcess(command, launcher.returncode, stdout.read_text(), stderr.read_text())


def write_fault_wrapper(directory: Path) -> Path:
    wrapper = directory / "fault_wrapper.py"
    wrapper.write_text(FAULT_WRAPPER)
    return wrapper


def truncated_png(path: Path) -> None:
    Image.new("RGB", (64, 64), "red").save(path)
    path.write_bytes(path.read_bytes()[:100])


@pytest.fixture(scope="module")
def odd_images(tiny_sd3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Grayscale, RGBA, palette, 16-bit, smaller than the resolution, and truncated images, with their embeddings."""
    root = tmp_path_factory.mktemp("odd-images")
    gradient = np.linspace(0, 255, 48 * 48).reshape(48, 48).astype(np.uint8)
    Image.fromarray(gradient, "L").save(root / "gray.png")
    rgba = Image.new("RGBA", (48, 48), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (8, 8, 40, 40))
    rgba.save(root / "rgba.png")
    Image.new("RGB", (48, 48), "green").convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    Image.fromarray((gradient.astype(np.uint16) * 257)).save(root / "gray16.png")
    Image.new("RGB", (16, 24), "yellow").save(root / "small.png")
    truncated_png(root / "truncated.png")
    path = root.parent / f"{root.name}.parquet"
    compute_embeddings.main(embedding_args(tiny_sd3_path, root, path))
    return root, path


@pytest.fixture(scope="module")
def masks(instance_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A loss mask per instance image: its left half trains, so a flip moves it."""
    folder = tmp_path_factory.mktemp("masks")
    for path in instance_dir.glob("*.png"):
        with Image.open(path) as image:
            mask = Image.new("L", image.size, 0)
            mask.paste(255, (0, 0, image.width // 2, image.height))
            mask.save(folder / path.name)
    return folder


@pytest.fixture(scope="module")
def runs(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, odd_images, masks: Path, tmp_path_factory
) -> dict:
    """Every training run of this file, independent ones two at a time; results by name, with their folders."""
    work = tmp_path_factory.mktemp("runs")
    wrapper = write_fault_wrapper(work)

    def args(name: str, *extra: str, images: Path = instance_dir, embeddings: Path = embeddings_path) -> list[str]:
        return train_args(tiny_sd3_path, embeddings, images, work / name, *extra)

    checkpointed = ["--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
    long_run = ["--max_train_steps", "100000", "--checkpointing_steps", "2"]
    # every checkpoint kept; a flip and a mask that the flip moves, both cached with the latents
    cached = ["--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--cache_latents", "--random_flip"]
    cached += ["--mask_data_dir", str(masks)]
    results = in_pairs(
        {
            "straight": lambda: run(launch_command(*args("straight", *checkpointed)), work),
            "crash": lambda: run(
                launch_command(wrapper, *args("crash", *checkpointed)),
                work,
                environment(SD3_TEST_FAULT="kill_mid_save"),
            ),
            "nan": lambda: run(
                launch_command(
                    *args("nan", "--max_train_steps", "4", "--checkpointing_steps", "1", "--learning_rate", "1e30")
                ),
                work,
            ),
            "oom": lambda: run(
                launch_command(wrapper, *args("oom", "--max_train_steps", "1")), work, environment(SD3_TEST_FAULT="oom")
            ),
            "sigterm": lambda: interrupt(
                launch_command(*args("sigterm", *long_run)), work, work / "sigterm", signal.SIGTERM
            ),
            "sigint": lambda: interrupt(
                launch_command(*args("sigint", *long_run)), work, work / "sigint", signal.SIGINT
            ),
            "odd_images": lambda: run(
                launch_command(
                    *args("odd_images", "--max_train_steps", "1", images=odd_images[0], embeddings=odd_images[1])
                ),
                work,
            ),
            "cached": lambda: run(launch_command(*args("cached", *cached)), work),
        }
    )
    # resume the crashed run; the folders of unfinished saves are passed over, then removed
    shutil.copytree(work / "crash", work / "resumed")
    (work / "resumed" / "checkpoint-9.tmp").mkdir()
    # the cached run as if stopped after its step-2 checkpoint
    shutil.copytree(work / "cached", work / "cached_resumed")
    shutil.rmtree(work / "cached_resumed" / "checkpoint-4")
    (work / "cached_resumed" / "pytorch_lora_weights.safetensors").unlink()
    results |= in_pairs(
        {
            "resumed": lambda: run(
                launch_command(*args("resumed", *checkpointed, "--resume_from_checkpoint", "latest")), work
            ),
            "cached_resumed": lambda: run(
                launch_command(*args("cached_resumed", *cached, "--resume_from_checkpoint", "latest")), work
            ),
        }
    )
    return {name: (result, work / name) for name, result in results.items()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_after_a_crash_is_exact(runs: dict):
    """4 steps straight vs 2 steps, a crash, `--resume_from_checkpoint latest`, 2 more: bit for bit in fp32."""
    (straight, straight_dir), (resumed, resumed_dir) = runs["straight"], runs["resumed"]
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from checkpoint checkpoint-2" in resumed.stdout + resumed.stderr
    for name in ("pytorch_lora_weights.safetensors", "checkpoint-4/pytorch_lora_weights.safetensors"):
        expected, got = load_file(straight_dir / name), load_file(resumed_dir / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    # optimizer moments and step counts, the lr schedule
    for name in ("optimizer.bin", "scheduler.bin"):
        expected = torch.load(straight_dir / "checkpoint-4" / name, weights_only=False)
        got = torch.load(resumed_dir / "checkpoint-4" / name, weights_only=False)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
    state = json.loads((resumed_dir / "checkpoint-4" / TRAINING_STATE).read_text())
    assert state == {"seed": 0}


def test_resume_with_cached_latents_is_exact(runs: dict):
    """4 cached steps with flips and masks straight vs resumed from step 2: the cache, rebuilt, is the same."""
    (cached, cached_dir), (resumed, resumed_dir) = runs["cached"], runs["cached_resumed"]
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from checkpoint checkpoint-2" in resumed.stdout + resumed.stderr
    for name in ("pytorch_lora_weights.safetensors", "checkpoint-4/pytorch_lora_weights.safetensors"):
        expected, got = load_file(cached_dir / name), load_file(resumed_dir / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    for name in ("optimizer.bin", "scheduler.bin"):
        expected = torch.load(cached_dir / "checkpoint-4" / name, weights_only=False)
        got = torch.load(resumed_dir / "checkpoint-4" / name, weights_only=False)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


def test_checkpoint_total_limit_keeps_the_newest_complete_ones(runs: dict):
    _, straight_dir = runs["straight"]
    assert sorted(path.name for path in straight_dir.glob("*checkpoint-*")) == ["checkpoint-4"]
    _, resumed_dir = runs["resumed"]
    # the unfinished folders are not counted, and the resumed run removed them
    assert sorted(path.name for path in resumed_dir.glob("*checkpoint-*")) == ["checkpoint-4"]
    assert "checkpoint-9.tmp, left by a save that did not finish" in runs["resumed"][0].stderr


def test_kill_mid_save_leaves_the_previous_checkpoint(runs: dict):
    crash, crash_dir = runs["crash"]
    assert crash.returncode != 0
    partial = crash_dir / "checkpoint-4.tmp"
    assert partial.is_dir() and not (partial / "scheduler.bin").exists()  # killed inside the save
    assert not (crash_dir / "checkpoint-4").exists()
    # --checkpoints_total_limit 1 deletes checkpoint-2 only once checkpoint-4 is complete
    checkpoint = crash_dir / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.iterdir()) == [
        "optimizer.bin",
        "pytorch_lora_weights.safetensors",
        "random_states_0.pkl",
        "scheduler.bin",
        TRAINING_STATE,
    ]
    assert not (crash_dir / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("name", ["sigterm", "sigint"])
def test_signal_saves_a_checkpoint_and_names_the_resume_flag(runs: dict, name: str):
    result, output_dir = runs[name]
    assert result.returncode != 0  # the launcher reports the interrupted worker
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    match = re.search(
        r"Stopped by (\w+) after step (\d+): saved (\S+)\. .* --resume_from_checkpoint latest$", last_line(result)
    )
    assert match, result.stderr[-3000:]
    assert match[1] == name.upper()
    step = int(match[2])
    assert 2 <= step < 100000 and Path(match[3]) == output_dir / f"checkpoint-{step}"
    assert json.loads((output_dir / f"checkpoint-{step}" / TRAINING_STATE).read_text()) == {"seed": 0}
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_non_finite_loss_stops_with_the_last_good_checkpoint(runs: dict):
    """An absurd learning rate in fp32: step 1 is finite, step 2 overflows."""
    result, output_dir = runs["nan"]
    assert_one_line_error(
        result, "step 2:", "not finite", f"the last good checkpoint is {output_dir / 'checkpoint-1'}; continue"
    )
    assert "--learning_rate (now 1e+30)" in last_line(result)
    assert sorted(path.name for path in output_dir.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_out_of_memory_is_explained(runs: dict):
    result, _ = runs["oom"]
    assert_one_line_error(
        result, "step 1: CUDA ran out of memory", "layer offloading is off", "--train_batch_size (now 2)"
    )


def test_odd_images_are_converted_skipped_and_counted(runs: dict, odd_images):
    result, output_dir = runs["odd_images"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    log = result.stdout + result.stderr
    assert "Skipped 1 of 6 images" in log and "truncated.png" in log and "--strict" in log
    assert "1 images of --instance_data_dir" in log and "small.png 16x24" in log


def test_images_of_any_mode_become_8_bit_rgb(odd_images):
    root, _ = odd_images
    rgb = {path.stem: train_script.to_rgb(Image.open(path)) for path in root.glob("*.png") if path.stem != "truncated"}
    assert all(image.mode == "RGB" for image in rgb.values())
    gray = np.asarray(Image.open(root / "gray.png"))
    np.testing.assert_array_equal(np.asarray(rgb["gray16"])[..., 0], gray)  # scaled, not clipped to white
    assert rgb["rgba"].getpixel((0, 0)) == (255, 255, 255)  # transparent: white, not the hidden red
    assert rgb["rgba"].getpixel((20, 20)) == (0, 0, 255)
    assert rgb["palette"].getpixel((0, 0)) == (0, 128, 0)


# Bad input: (script, extra arguments or a function of the case folder returning them, environment, fragments).
def compute_case(*extra, **env):
    return "compute", extra, env


def train_case(*extra, **env):
    return "train", extra, env


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def model_index(case: Path, class_name: str) -> Path:
    """A pipeline folder with a model_index.json of `class_name` and nothing else."""
    index = {"_class_name": class_name, "transformer": ["diffusers", "SomeTransformer"]}
    return write(case / "model" / "model_index.json", json.dumps(index).encode()).parent


def one_truncated_image(case: Path) -> Path:
    images = case / "images"
    images.mkdir()
    truncated_png(images / "broken.png")
    return images


BAD_INPUT = {
    "compute-folder-missing": (
        compute_case(lambda c: ["--instance_data_dir", str(c / "nowhere")]),
        ["nowhere", "does not exist"],
    ),
    "compute-model-missing": (
        compute_case(lambda c: ["--pretrained_model_name_or_path", str(c / "no-model")]),
        ["no-model", "SD3 diffusers pipeline"],
    ),
    "compute-output-is-a-folder": (
        compute_case(lambda c: ["--output_path", str(c)]),
        ["is a folder", "pass a file path"],
    ),
    "compute-truncated-image-strict": (
        compute_case(lambda c: ["--instance_data_dir", str(one_truncated_image(c)), "--strict"]),
        ["broken.png", "drop --strict"],
    ),
    "train-folder-missing": (
        train_case(lambda c: ["--instance_data_dir", str(c / "nowhere")]),
        ["nowhere", "does not exist"],
    ),
    "train-truncated-image-strict": (
        train_case(lambda c: ["--instance_data_dir", str(one_truncated_image(c)), "--strict"]),
        ["broken.png", "drop --strict"],
    ),
    "train-resolution": (train_case("--resolution", "40"), ["multiple of 16"]),
    "train-resume-missing": (
        train_case("--resume_from_checkpoint", "checkpoint-7"),
        ["checkpoint-7 not found", "latest"],
    ),
    "train-output-is-a-file": (
        train_case(lambda c: ["--output_dir", str(write(c / "out.txt", b"keep me"))]),
        ["is a file, not a folder"],
    ),
    "train-offload-unknown-variable": (
        train_case(ACCELERATE_OFFLOAD_LAYER_FRACTON="0.5"),
        ["offload config", "ACCELERATE_OFFLOAD_LAYER_FRACTON"],
    ),
    "train-offload-fraction-out-of-range": (
        train_case(ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION="1.5"),
        ["offload config", "0..1"],
    ),
    "train-8bit-adam-without-cuda": (train_case("--use_8bit_adam"), ["--use_8bit_adam needs a CUDA GPU"]),
    "train-output-holds-another-run": (
        train_case(
            lambda c: ["--output_dir", str(write(c / "out" / "checkpoint-6" / TRAINING_STATE, b"{}").parents[1])]
        ),
        ["holds an earlier run (checkpoint-6)", "add --resume_from_checkpoint latest", "or choose a new --output_dir"],
    ),
    "train-latest-without-checkpoint": (
        train_case(
            lambda c: [
                "--output_dir",
                str(write(c / "out" / "pytorch_lora_weights.safetensors", b"earlier LoRA").parent),
                "--resume_from_checkpoint",
                "latest",
            ]
        ),
        ["holds an earlier run (pytorch_lora_weights.safetensors) but no checkpoint to continue from"],
    ),
    "train-negative-learning-rate": (
        train_case("--learning_rate", "-1"),
        ["--learning_rate must be a positive number"],
    ),
    "train-rank-zero": (train_case("--rank", "0"), ["--rank must be at least 1, got 0"]),
    "train-rank-negative": (train_case("--rank", "-4"), ["--rank must be at least 1, got -4"]),
    "train-resolution-zero": (train_case("--resolution", "0"), ["--resolution must be a positive multiple of 16"]),
    "train-lora-layers-typo": (
        train_case("--lora_layers", "nonexistent_module"),
        ["--lora_layers nonexistent_module: the transformer has no such module"],
    ),
    "train-flux-pipeline": (
        train_case(lambda c: ["--pretrained_model_name_or_path", str(model_index(c, "FluxPipeline"))]),
        ["is a FluxPipeline, not an SD3 diffusers pipeline (train FLUX.1 LoRAs with train_flux_lora.py)"],
    ),
    "train-no-transformer": (
        train_case(lambda c: ["--pretrained_model_name_or_path", str(model_index(c, "StableDiffusion3Pipeline"))]),
        ["has no transformer/ folder"],
    ),
    "train-block-names-typo": (
        train_case("--gradient_checkpointing", ACCELERATE_OFFLOAD_BLOCK_NAMES="transformer_blockz"),
        ["offload config", "has no block list 'transformer_blockz'"],
    ),
    "train-output-dir-under-a-file": (
        train_case(lambda c: ["--output_dir", str(write(c / "a-file", b"keep me") / "out")]),
        ["cannot be created", "a-file is not a writable folder"],
    ),
    "compute-cuda-without-cuda": (compute_case("--device", "cuda"), ["--device cuda needs a CUDA GPU"]),
    "compute-sequence-too-long": (
        compute_case("--max_sequence_length", "4096"),
        ["--max_sequence_length must be in 1..512"],
    ),
    "compute-flux-pipeline": (
        compute_case(lambda c: ["--pretrained_model_name_or_path", str(model_index(c, "FluxPipeline"))]),
        ["is a FluxPipeline, not an SD3 diffusers pipeline (train FLUX.1 LoRAs with train_flux_lora.py)"],
    ),
    "train-model-missing": (
        train_case(lambda c: ["--pretrained_model_name_or_path", str(c / "no-model")]),
        ["no-model", "SD3 diffusers pipeline"],
    ),
}


def snapshot(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): digest(path) for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def bad_input_results(tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path_factory) -> dict:
    """Each case in its own folder, two at a time; the results with the folder's files before and after."""
    work = tmp_path_factory.mktemp("bad-input")

    def job(name: str):
        (script, extra, env), _ = BAD_INPUT[name]
        case = work / name
        case.mkdir()
        extra = [arg for item in extra for arg in (item(case) if callable(item) else [item])]
        if script == "compute":
            command = [sys.executable, str(REPO / "compute_embeddings.py"), "--pretrained_model_name_or_path"]
            command += [
                str(tiny_sd3_path),
                "--instance_data_dir",
                str(instance_dir),
                "--instance_prompt",
                INSTANCE_PROMPT,
            ]
            command += ["--max_sequence_length", str(MAX_SEQUENCE_LENGTH), "--device", "cpu", "--output_path"]
            command += [str(case / "embeddings.parquet"), *extra]
        else:
            command = launch_command(
                *train_args(
                    tiny_sd3_path, embeddings_path, instance_dir, case / "out", "--max_train_steps", "1", *extra
                )
            )
        before = snapshot(case)
        result = run(command, case, environment(**env))
        return result, before, snapshot(case)

    return in_pairs({name: (lambda name=name: job(name)) for name in BAD_INPUT})


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_one_line_and_changes_no_file(bad_input_results: dict, name: str):
    if "without-cuda" in name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result, before, after = bad_input_results[name]
    assert_one_line_error(result, *BAD_INPUT[name][1])
    assert "usage:" not in result.stderr, "an argument error is one line, with a pointer to --help"
    assert after == before  # nothing written, nothing lost


# Bad input checked in-process: the same one-line errors, from the functions that raise them (no process start).
def test_more_bad_input_raises_one_line_errors(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no images found"):
        compute_embeddings.main(embedding_args(tiny_sd3_path, empty, tmp_path / "e.parquet"))
    write(tmp_path / "m" / "metadata.jsonl", b"{oops\n")
    with pytest.raises(UsageError, match="line 1 is not JSON"):
        compute_embeddings.main(embedding_args(tiny_sd3_path, tmp_path / "m", tmp_path / "e.parquet"))

    def args(*extra: str):
        base = ["--pretrained_model_name_or_path", str(tiny_sd3_path), "--instance_prompt", INSTANCE_PROMPT]
        base += ["--instance_data_dir", str(instance_dir), "--output_dir", str(tmp_path / "out")]
        return train_script.parse_args([*base, *extra])

    with pytest.raises(UsageError, match="no images found"):
        train_script.instance_image_files(args("--instance_data_dir", str(empty)))
    broken = one_truncated_image(tmp_path)
    files, source = train_script.instance_image_files(args("--instance_data_dir", str(broken)))
    with pytest.raises(UsageError, match="none of the 1 images .*broken.png"):
        train_script.usable_images(files, source, args())
    with pytest.raises(SystemExit):  # argparse: `prog: error: --checkpointing_steps must be at least 1`
        args("--checkpointing_steps", "0")
    with pytest.raises(UsageError, match="truncated or corrupt"):
        train_script.load_embeddings(write(tmp_path / "cut.parquet", b"PAR1 cut short"), args())
    embeddings = train_script.load_embeddings(embeddings_path, args())
    with pytest.raises(UsageError, match="'never embedded': rerun compute_embeddings.py with --valid"):
        embeddings.row("validation", "never embedded", "--validation_prompt")
    incomplete = write(tmp_path / "out" / "checkpoint-3" / "optimizer.bin", b"").parent
    with pytest.raises(SystemExit):  # `error: cannot resume from .../checkpoint-3: its pytorch_lora_weights...`
        args("--resume_from_checkpoint", str(incomplete))


def test_a_checkpoint_that_cannot_resume_is_named_with_the_next_usable_one(
    runs: dict, tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path, capsys
):
    _, straight_dir = runs["straight"]
    out = tmp_path / "out"
    for step in (2, 4):
        shutil.copytree(straight_dir / "checkpoint-4", out / f"checkpoint-{step}")
    optimizer = out / "checkpoint-4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    before = snapshot(out)

    damaged = run(
        launch_command(
            *train_args(tiny_sd3_path, embeddings_path, instance_dir, out, "--resume_from_checkpoint", "latest")
        ),
        tmp_path,
    )
    other_rank = run(
        launch_command(
            *train_args(
                tiny_sd3_path,
                embeddings_path,
                instance_dir,
                out,
                "--rank",
                "8",
                "--resume_from_checkpoint",
                str(out / "checkpoint-2"),
            )
        ),
        tmp_path,
    )

    assert_one_line_error(
        damaged,
        f"cannot resume from {out / 'checkpoint-4'}: its optimizer.bin cannot be read (",
        f"the next usable earlier checkpoint is {out / 'checkpoint-2'}: resume with --resume_from_checkpoint",
    )
    assert_one_line_error(
        other_rank,
        f"cannot resume from {out / 'checkpoint-2'}: its LoRA has rank 4, --rank is 8 (pass --rank 4 to continue it)",
        "no earlier checkpoint is usable",
    )
    assert snapshot(out) == before
    lora = out / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:-10])
    args = train_args(tiny_sd3_path, embeddings_path, instance_dir, out, "--resume_from_checkpoint")[1:]
    with pytest.raises(SystemExit):
        train_script.parse_args([*args, str(out / "checkpoint-2")])
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: cannot resume from {out / 'checkpoint-2'}: its pytorch_lora_weights.safetensors cannot")
    assert line.endswith("no earlier checkpoint is usable")


def test_argument_errors_are_one_line_pointing_at_help(capsys):
    """argparse's own errors end with a pointer to --help; values that parse but cannot work name their fix."""
    common = ["--pretrained_model_name_or_path", "m", "--instance_prompt", "p"]
    for script, extra, expected in (
        (compute_embeddings, ["--dataset_name", "./x"], r"error: --dataset_name \./x does not exist: give a local"),
        (train_script, ["--dataset_name", "./x"], r"error: --dataset_name \./x does not exist: give a local"),
        (
            train_script,
            ["--instance_data_dir", ".", "--rank", "many"],
            r"\S+: error: argument --rank: invalid int value: 'many' \(see \S+ --help\)$",
        ),
    ):
        with pytest.raises(SystemExit):
            script.parse_args([*common, *extra])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.match(expected, err), err


def test_a_null_caption_is_no_caption(tmp_path: Path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "b.png")
    records = [{"file_name": "a.png", "text": None}, {"file_name": "b.png", "text": "a blue square"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(record) for record in records))

    assert compute_embeddings.folder_captions(tmp_path, "text") == {"b.png": "a blue square"}


def test_ctrl_c_while_embedding_is_one_line_and_keeps_the_file(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    output = tmp_path / "embeddings.parquet"
    shutil.copy(embeddings_path, output)
    before = digest(output)
    command = [sys.executable, str(write_fault_wrapper(tmp_path)), str(REPO / "compute_embeddings.py")]
    command += ["--pretrained_model_name_or_path", str(tiny_sd3_path), "--instance_data_dir", str(instance_dir)]
    command += ["--instance_prompt", INSTANCE_PROMPT, "--max_sequence_length", str(MAX_SEQUENCE_LENGTH)]
    command += ["--device", "cpu", "--output_path", str(output), "--validation_prompt", "a prompt not embedded yet"]

    result = run(command, tmp_path, environment(SD3_TEST_FAULT="sigint_while_embedding"))

    assert result.returncode == 128 + signal.SIGINT and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result) == f"error: interrupted; {output} was not changed"
    assert digest(output) == before and sorted(path.name for path in tmp_path.glob("*.parquet*")) == [output.name]


def test_push_to_hub_uploads_without_checkpoints_and_a_failed_upload_keeps_the_files(
    tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, tmp_path: Path
):
    from hub_server import NAMESPACE, HubServer

    def push(name: str) -> subprocess.CompletedProcess:
        extra = ["--max_train_steps", "1", "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "sd3-lora"]
        args = train_args(tiny_sd3_path, embeddings_path, instance_dir, tmp_path / name, *extra, "--hub_token", "t0k")
        return run(launch_command(*args), tmp_path, environment(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0"))

    with HubServer(token="t0k") as hub:
        pushed = push("pushed")
        hub.fail_commits = True
        failed = push("failed")

    assert pushed.returncode == 0, pushed.stderr[-3000:]
    (commit,) = hub.commits
    assert sorted(commit) == ["README.md", "loss.png", "metrics.jsonl", "pytorch_lora_weights.safetensors"]
    assert (tmp_path / "pushed" / "checkpoint-1").is_dir()
    assert_one_line_error(failed, f"the upload to {NAMESPACE}/sd3-lora failed (", "without training again: hf upload")
    assert {"README.md", "pytorch_lora_weights.safetensors", "checkpoint-1"} <= {
        path.name for path in (tmp_path / "failed").iterdir()
    }
