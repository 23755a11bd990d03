"""train_sd3_dreambooth_lora.py's metrics.jsonl, validation loss and loss.png, end to end through
`accelerate-offload launch` on the tiny SD3 pipeline (CPU): the same records and the same validation loss as
train_flux_lora.py's, continued without duplicates on resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_sd3 import compute_embeddings, embedding_args, train_script
from test_training_features import error_line, metrics_of, offload_launch

from accelerate_offload.testing.tiny_pipelines import write_sample_images

pytestmark = pytest.mark.timeout(600)

SCRIPT = Path(__file__).resolve().parents[1] / "train_sd3_dreambooth_lora.py"
INSTANCE_PROMPT = "a photo of sks shape"  # test_sd3's embedding_args embeds this one
HELD_OUT_CAPTION = "a sks shape held out, from metadata"


@pytest.fixture(scope="module")
def instance_dir(sample_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample images, the first with its own caption (so its embeddings row is not the instance prompt's)."""
    root = tmp_path_factory.mktemp("sd3-instance")
    for path in sample_images.glob("*.png"):
        shutil.copy(path, root / path.name)
    first = sorted(root.glob("*.png"))[0].name
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": first, "text": HELD_OUT_CAPTION}) + "\n")
    return root


@pytest.fixture(scope="module")
def embeddings(tiny_sd3_path: Path, instance_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sd3-embeddings") / "embeddings.parquet"
    compute_embeddings.main(embedding_args(tiny_sd3_path, instance_dir, path))
    return path


def sd3_args(model: Path, embeddings: Path, images: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--embeddings_path", str(embeddings),
            "--instance_data_dir", str(images), "--instance_prompt", INSTANCE_PROMPT, "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--seed", "0", "--report_to", "tensorboard",
            "--validation_loss_images", "0.34", "--validation_steps", "2", "--output_dir", str(output_dir),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_sd3_path: Path, embeddings: Path, instance_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two runs with the same seed, and a third with another learning rate."""
    home = tmp_path_factory.mktemp("sd3-features")
    found = {}
    for name, extra in (("first", []), ("again", []), ("other_lr", ["--learning_rate", "3e-3"])):
        result = offload_launch(sd3_args(tiny_sd3_path, embeddings, instance_dir, home / name, *extra), home, SCRIPT)
        assert result.returncode == 0, result.stderr[-4000:]
        found[name] = home / name
    return found


def validation_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["validation_loss"] for r in metrics_of(output_dir) if "validation_loss" in r}


def test_metrics_have_a_line_per_step_and_the_validation_loss(runs: dict[str, Path]) -> None:
    records = metrics_of(runs["first"])
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert [record["epoch"] for record in records] == [0, 0, 1, 1]  # 4 of 6 images train: 2 batches an epoch
    assert all(math.isfinite(record["loss"]) and record["lr"] == 1e-3 for record in records)
    assert all(record["size"] == [32, 32] and record["seconds_per_step"] > 0 for record in records)
    assert sorted(validation_losses(runs["first"])) == [2, 4]  # every --validation_steps, and the last step
    assert all(math.isfinite(loss) for loss in validation_losses(runs["first"]).values())
    with Image.open(runs["first"] / "loss.png") as plot:
        assert plot.width > 300 and plot.height > 200
    assert "| validation_loss_images | 0.34 |" in (runs["first"] / "README.md").read_text()


def test_validation_loss_goes_to_the_tracker(runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for events in (runs["first"] / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "validation_loss" in accumulator.Tags()["scalars"]:
            logged.update({event.step: event.value for event in accumulator.Scalars("validation_loss")})
    assert logged == pytest.approx(validation_losses(runs["first"]))


def test_validation_loss_repeats_with_the_seed_and_moves_with_the_lora(runs: dict[str, Path]) -> None:
    assert validation_losses(runs["first"]) == validation_losses(runs["again"])
    assert [r["loss"] for r in metrics_of(runs["first"])] == [r["loss"] for r in metrics_of(runs["again"])]
    first, other = validation_losses(runs["first"]), validation_losses(runs["other_lr"])
    assert first.keys() == other.keys() and all(first[step] != other[step] for step in first)


def test_resume_continues_metrics_without_duplicates(
    runs: dict[str, Path], tiny_sd3_path: Path, embeddings: Path, instance_dir: Path, tmp_path: Path
) -> None:
    """A run killed while writing step 4's line: resumed from checkpoint-2, the file goes on with steps 3 and 4."""
    output_dir = tmp_path / "out"
    shutil.copytree(runs["first"], output_dir)
    shutil.rmtree(output_dir / "checkpoint-4")
    for name in ("pytorch_lora_weights.safetensors", "loss.png", "README.md"):
        (output_dir / name).unlink()
    metrics = output_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # steps 1-3, and step 4's line torn
    args = sd3_args(tiny_sd3_path, embeddings, instance_dir, output_dir, "--resume_from_checkpoint", "latest")
    result = offload_launch(args, tmp_path, SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Dropping the half-written last line" in result.stderr
    resumed, uninterrupted = metrics_of(output_dir), metrics_of(runs["first"])
    assert [record["step"] for record in resumed] == [1, 2, 3, 4]
    for key in ("loss", "lr", "epoch"):  # exact resume: the same numbers as the run that was not stopped
        assert [record[key] for record in resumed] == [record[key] for record in uninterrupted]
    assert validation_losses(output_dir) == validation_losses(runs["first"])
    assert (output_dir / "loss.png").is_file()


def test_a_folder_of_held_out_images_uses_their_own_rows(
    tiny_sd3_path: Path, embeddings: Path, instance_dir: Path, tmp_path: Path
) -> None:
    """The captioned image keeps its caption's embedding; an image the file never saw gets the instance prompt's."""
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    captioned = sorted(instance_dir.glob("*.png"))[0]
    shutil.copy(captioned, held_out / captioned.name)
    write_sample_images(tmp_path / "new", sizes=((48, 48),), seed=7)
    (new_image,) = (tmp_path / "new").glob("*.png")
    shutil.copy(new_image, held_out / "zz_new.png")

    args = train_script.parse_args(sd3_args(tiny_sd3_path, embeddings, instance_dir, tmp_path / "unused"))
    loaded = train_script.load_embeddings(embeddings, args)
    args.validation_loss_images = str(held_out)
    _, files = train_script.split_validation_images([], args)
    rows = train_script.validation_rows(files, loaded, args)
    assert [loaded.labels[row] for row in rows] == [("caption", HELD_OUT_CAPTION), ("instance", INSTANCE_PROMPT)]

    output_dir = tmp_path / "out"
    extra = ["--validation_loss_images", str(held_out), "--max_train_steps", "1"]
    result = offload_launch(sd3_args(tiny_sd3_path, embeddings, instance_dir, output_dir, *extra), tmp_path, SCRIPT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert list(validation_losses(output_dir)) == [1] and math.isfinite(validation_losses(output_dir)[1])


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("1.5", "--validation_loss_images 1.5: give a share in (0, 1)"), ("missing", "is neither a share such as 0.1")],
)
def test_bad_validation_loss_images_is_one_line(
    tiny_sd3_path: Path, embeddings: Path, instance_dir: Path, tmp_path: Path, value: str, fragment: str
) -> None:
    args = sd3_args(tiny_sd3_path, embeddings, instance_dir, tmp_path / "out")
    args[args.index("--validation_loss_images") + 1] = value
    result = offload_launch(args, tmp_path, SCRIPT)
    assert result.returncode == 2 and fragment in error_line(result)
    assert not (tmp_path / "out").exists()
