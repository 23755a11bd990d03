"""Commands written for diffusers' own DreamBooth LoRA scripts work with ours: the optimizer flags (any case,
`--use_8bit_adam`, Prodigy's switches), SD3's `--lora_blocks` and `--lora_dropout`, `--upcast_before_saving`,
`--prior_generation_precision`, `--local_rank`; `--train_text_encoder` is refused in one line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from launching import environment, launch_command, run
from safetensors import safe_open
from test_sd3 import embedding_args, launch_training, train_script
from test_train_flux import SCRIPT, base_args, load_script

from accelerate_offload.optimizers import (
    add_optimizer_args,
    build_optimizer,
    chosen_optimizer,
    optimizer_checkpoint_problem,
    optimizer_problem,
    saved_optimizer,
)

pytestmark = pytest.mark.timeout(600)

flux_script = load_script()


def optimizer_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_args(parser)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    return parser.parse_args(argv)


def one_parameter() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


# ----------------------------------------------------------------------------------------------------------------
# The optimizer flags
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "name"), [("prodigy", "prodigy"), ("Prodigy", "prodigy"), ("AdamW", "adamw"),
                                             ("adamW8bit", "adamw8bit")])  # fmt: skip
def test_optimizer_names_take_any_case(given: str, name: str) -> None:
    assert optimizer_args("--optimizer", given).optimizer == name


def test_an_unknown_optimizer_is_refused() -> None:
    with pytest.raises(SystemExit):
        optimizer_args("--optimizer", "lion")


def test_prodigy_switches_mean_what_they_say() -> None:
    import prodigyopt  # a training extra: importing it here keeps `pytest -m cuda` collectable without it

    args = optimizer_args(
        "--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_decouple", "false",
        "--prodigy_use_bias_correction", "0", "--prodigy_beta3", "0.9", "--adam_weight_decay", "0.01",
    )  # fmt: skip
    optimizer = build_optimizer(args, one_parameter())
    assert isinstance(optimizer, prodigyopt.Prodigy)
    (group,) = optimizer.param_groups
    assert group["decouple"] is False and group["use_bias_correction"] is False  # diffusers' type=bool reads True
    assert group["safeguard_warmup"] is True  # diffusers' default
    assert (group["beta3"], group["weight_decay"], group["lr"]) == (0.9, 0.01, 1.0)


def test_a_switch_that_is_not_true_or_false_is_refused() -> None:
    with pytest.raises(SystemExit):
        optimizer_args("--prodigy_decouple", "maybe")


def test_adamw_gets_the_adam_flags() -> None:
    args = optimizer_args("--adam_beta1", "0.8", "--adam_beta2", "0.95", "--adam_epsilon", "1e-6", "--learning_rate",
                          "3e-4", "--adam_weight_decay", "0.02")  # fmt: skip
    optimizer = build_optimizer(args, one_parameter())
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert (group["betas"], group["eps"], group["lr"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 3e-4, 0.02)


def test_use_8bit_adam_makes_adamw_8bit_and_is_checked() -> None:
    args = optimizer_args("--use_8bit_adam")
    assert chosen_optimizer(args) == "adamw8bit"
    assert optimizer_problem(args, cuda=False).startswith("--use_8bit_adam needs a CUDA GPU")
    prodigy = optimizer_args("--use_8bit_adam", "--optimizer", "prodigy")
    assert optimizer_problem(prodigy, cuda=True) == "--use_8bit_adam makes AdamW 8-bit; drop it for --optimizer prodigy"


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--adam_beta2", "1.0", "--adam_beta2 must be in [0, 1), got 1.0"),
    ("--prodigy_beta3", "-0.1", "--prodigy_beta3 must be in [0, 1), got -0.1"),
    ("--adam_epsilon", "0", "--adam_epsilon must be a positive number, got 0.0"),
    ("--adam_weight_decay", "-1", "--adam_weight_decay cannot be negative, got -1.0"),
])  # fmt: skip
def test_bad_optimizer_numbers_are_one_line(flag: str, value: str, message: str) -> None:
    assert optimizer_problem(optimizer_args(flag, value), cuda=True) == message


def stepped_state(name: str) -> dict:
    args = optimizer_args("--optimizer", name, "--learning_rate", "1.0")
    parameters = one_parameter()
    optimizer = build_optimizer(args, parameters)
    parameters[0].grad = torch.ones(3)
    optimizer.step()
    return optimizer.state_dict()


def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path: Path) -> None:
    for name in ("adamw", "prodigy"):
        torch.save(stepped_state(name), tmp_path / "optimizer.bin")
        assert saved_optimizer(torch.load(tmp_path / "optimizer.bin", weights_only=False)) == name
        assert optimizer_checkpoint_problem(tmp_path, name) is None
    assert optimizer_checkpoint_problem(tmp_path, "adamw") == (
        "its optimizer state is prodigy's, --optimizer is adamw (pass --optimizer prodigy to continue it)"
    )
    # bitsandbytes' 8-bit AdamW (CUDA only) names its moments state1 and state2
    assert saved_optimizer({"state": {0: {"state1": torch.zeros(1), "state2": torch.zeros(1)}}}) == "adamw8bit"
    (tmp_path / "optimizer.bin").write_bytes(b"cut short")
    assert optimizer_checkpoint_problem(tmp_path, "adamw") is None  # left to the checkpoint's damage check


# ----------------------------------------------------------------------------------------------------------------
# Both scripts take a command written for diffusers' scripts
# ----------------------------------------------------------------------------------------------------------------


def test_flux_takes_a_diffusers_command(sample_images: Path, tmp_path: Path) -> None:
    args = flux_script.parse_args([
        "--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev", "--instance_data_dir", str(sample_images),
        "--output_dir", str(tmp_path / "out"), "--mixed_precision=bf16", "--instance_prompt=a photo of sks dog",
        "--resolution=512", "--train_batch_size=1", "--guidance_scale=1", "--gradient_accumulation_steps=4",
        "--optimizer=prodigy", "--learning_rate=1.", "--report_to=tensorboard", "--lr_scheduler=constant",
        "--lr_warmup_steps=0", "--max_train_steps=500", "--validation_prompt=A photo of sks dog in a bucket",
        "--validation_epochs=25", "--seed=0", "--prodigy_safeguard_warmup=True", "--upcast_before_saving",
        "--prior_generation_precision=bf16", "--local_rank=0",
    ])  # fmt: skip
    assert (args.optimizer, args.prodigy_safeguard_warmup, args.upcast_before_saving) == ("prodigy", True, True)


def test_sd3_takes_a_diffusers_command(sample_images: Path, tmp_path: Path) -> None:
    args = train_script.parse_args([
        "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-3-medium-diffusers", "--instance_data_dir",
        str(sample_images), "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out"),
        "--optimizer", "Prodigy", "--learning_rate", "1.0", "--lora_blocks", "12,30", "--lora_layers",
        "attn.to_q,attn.to_k", "--lora_dropout", "0.1", "--upcast_before_saving", "--local_rank", "0",
    ])  # fmt: skip
    assert args.optimizer == "prodigy"
    assert train_script.lora_targets(args) == [
        "transformer_blocks.12.attn.to_q", "transformer_blocks.12.attn.to_k",
        "transformer_blocks.30.attn.to_q", "transformer_blocks.30.attn.to_k",
    ]  # fmt: skip


@pytest.mark.parametrize("script", ["flux", "sd3"])
def test_train_text_encoder_is_refused_in_one_line(script: str, sample_images: Path, tmp_path: Path, capsys) -> None:
    argv = ["--pretrained_model_name_or_path", "model", "--instance_data_dir", str(sample_images),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "out"), "--train_text_encoder"]
    with pytest.raises(SystemExit) as stopped:
        (flux_script if script == "flux" else train_script).parse_args(argv)
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --train_text_encoder is not offered: ") and "drop the flag" in line


def test_sd3_lora_blocks_that_are_not_indices_are_one_line(sample_images: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        train_script.parse_args(["--pretrained_model_name_or_path", "model", "--instance_data_dir", str(sample_images),
                                 "--instance_prompt", "x", "--output_dir", str(tmp_path / "o"), "--lora_blocks", "1,"])
    assert capsys.readouterr().err.strip() == (
        "error: --lora_blocks takes comma-separated block indices such as 12,30, got '1,'"
    )


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------


def saved_dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(path, "pt") as file:
        return {file.get_tensor(key).dtype for key in file.keys() if not key.endswith(".alpha")}


@pytest.mark.parametrize("upcast", [False, True])
def test_flux_saves_in_the_training_precision_unless_upcast(
    upcast: bool, tiny_flux_path: Path, sample_images: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    args = base_args(
        tiny_flux_path, output, "--instance_data_dir", str(sample_images), "--instance_prompt", "a sks shape",
        "--train_batch_size", "1", "--max_train_steps", "1", "--mixed_precision", "bf16", "--report_to", "none",
        "--save_format", "diffusers,kohya", "--checkpointing_steps", "1",
        *(["--upcast_before_saving"] if upcast else []),
    )  # fmt: skip
    result = run(launch_command(SCRIPT, *args, threads=2), tmp_path, timeout=280, env=environment(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    expected = torch.float32 if upcast else torch.bfloat16
    assert saved_dtypes(output / "pytorch_lora_weights.safetensors") == {expected}
    assert saved_dtypes(output / "pytorch_lora_weights_kohya.safetensors") == {expected}
    assert saved_dtypes(output / "checkpoint-1" / "pytorch_lora_weights.safetensors") == {torch.float32}


def test_flux_resume_with_another_optimizer_is_one_line(
    tiny_flux_path: Path, sample_images: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "out"
    args = base_args(
        tiny_flux_path, output, "--instance_data_dir", str(sample_images), "--instance_prompt", "a sks shape",
        "--train_batch_size", "1", "--max_train_steps", "1", "--checkpointing_steps", "1", "--report_to", "none",
        "--optimizer", "prodigy", "--learning_rate", "1.0",
    )  # fmt: skip
    result = run(launch_command(SCRIPT, *args, threads=2), tmp_path, timeout=280, env=environment(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = [*args[:-4], "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]  # AdamW, the default
    with pytest.raises(SystemExit):
        flux_script.parse_args(resumed)
    assert capsys.readouterr().err.strip() == (
        f"error: cannot resume from {output / 'checkpoint-1'}: its optimizer state is prodigy's, --optimizer is "
        "adamw (pass --optimizer prodigy to continue it); no earlier checkpoint is usable"
    )


def test_sd3_prodigy_on_chosen_blocks_end_to_end(tiny_sd3_path: Path, sample_images: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from test_sd3 import compute_embeddings

    embeddings = tmp_path / "embeddings.parquet"
    compute_embeddings.main(embedding_args(tiny_sd3_path, sample_images, embeddings))
    output = tmp_path / "out"
    result = launch_training(
        tiny_sd3_path, tmp_path, "--embeddings_path", str(embeddings), "--instance_data_dir", str(sample_images),
        "--output_dir", str(output), "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--optimizer", "prodigy", "--learning_rate", "1.0", "--lora_blocks", "1", "--lora_dropout", "0.1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    with safe_open(output / "pytorch_lora_weights.safetensors", "pt") as file:
        modules = {key.split(".lora_")[0] for key in file.keys()}
    assert modules and all(module.startswith("transformer.transformer_blocks.1.") for module in modules), modules
    state = torch.load(output / "checkpoint-2" / "optimizer.bin", map_location="cpu", weights_only=False)
    assert "d" in state["param_groups"][0]  # Prodigy's step-size estimate: the optimizer that trained
    assert "| optimizer | prodigy |" in (output / "README.md").read_text()
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    pipeline.load_lora_weights(output)
    loaded = [name for name, _ in pipeline.transformer.named_parameters() if ".lora_A." in name]
    assert loaded and all(name.startswith("transformer_blocks.1.") for name in loaded), loaded

    beyond = launch_training(
        tiny_sd3_path, tmp_path, "--embeddings_path", str(embeddings), "--instance_data_dir", str(sample_images),
        "--output_dir", str(tmp_path / "beyond"), "--max_train_steps", "1", "--lora_blocks", "0,99",
    )  # fmt: skip
    assert beyond.returncode != 0  # the worker's 2; `accelerate launch --quiet` itself exits 1
    assert "\nerror: --lora_blocks 99: the transformer has blocks 0 to " in beyond.stderr


def test_sd3_names_images_smaller_than_their_bucket(caplog) -> None:
    import io

    from accelerate import PartialState
    from PIL import Image

    PartialState(cpu=True)  # the script logs through accelerate's logger
    encoded = io.BytesIO()
    Image.new("RGB", (40, 40)).save(encoded, format="PNG")
    files = [("square.png", encoded.getvalue())]
    square = argparse.Namespace(aspect_ratio_buckets=None, resolution=32, strict=False)
    bucketed = argparse.Namespace(aspect_ratio_buckets="48,48", resolution=32, strict=False)
    with caplog.at_level("WARNING"):
        assert train_script.usable_images(files, "test images", square) == files
        assert not [record for record in caplog.records if "upscaled" in record.message]
        assert train_script.usable_images(files, "test images", bucketed) == files
    (said,) = [record.message for record in caplog.records if "upscaled" in record.message]
    assert "square.png 40x40 < 48x48" in said
