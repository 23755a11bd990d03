"""Both training scripts end to end through `accelerate-offload launch` with LoKr, LoHa, DoRA, kohya files and EMA."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sd3 import INSTANCE_PROMPT as SD3_PROMPT
from test_sd3 import MAX_SEQUENCE_LENGTH as SD3_TOKENS
from test_sd3 import embeddings_path, instance_dir, run  # noqa: F401 (fixtures)
from launching import environment, launch_command
from test_train_flux import RESOLUTION, SCRIPT, base_args

from accelerate_offload.adapters import KOHYA_WEIGHT_NAME, load_adapter_file
from accelerate_offload.lora_formats import linear_out_features, to_kohya

REPO = Path(__file__).resolve().parents[1]
LORA = "pytorch_lora_weights.safetensors"
EMA = "pytorch_lora_weights_ema.safetensors"
# double-block modules only: diffusers' kohya reader converts a single block's linear1 at FLUX.1's sizes only
KOHYA_LAYERS = "transformer_blocks.0.attn.to_q,transformer_blocks.0.attn.to_k,attn.add_v_proj,attn.to_out.0,ff.net.2"

LOKR_FLAGS = ("--adapter", "lokr", "--use_ema")
LOHA_FLAGS = ("--adapter", "loha", "--use_ema")

pytestmark = pytest.mark.timeout(600)


def launch_flux(model: Path, images: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = base_args(model, output_dir, "--instance_data_dir", str(images), "--instance_prompt", "a photo of sks")
    args += ["--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "none"]
    args += ["--learning_rate", "1e-2", "--num_validation_images", "1", "--num_inference_steps", "2", *extra]
    command = launch_command(SCRIPT, *args, launcher="accelerate-offload", threads=os.cpu_count() or 1)
    result = subprocess.run(command, env=environment(output_dir.parent), capture_output=True, text=True,
                            cwd=output_dir.parent, timeout=400)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def launch_sd3(model: Path, images: Path, embeddings: Path, output_dir: Path, *extra: str):
    script = str(REPO / "train_sd3_dreambooth_lora.py")
    command = launch_command(script, launcher="accelerate-offload", threads=os.cpu_count() or 1)
    command += ["--pretrained_model_name_or_path", str(model), "--instance_prompt", SD3_PROMPT, "--resolution", "32"]
    command += ["--embeddings_path", str(embeddings), "--instance_data_dir", str(images), "--report_to", "none"]
    command += ["--seed", "0", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--train_batch_size", "2"]
    command += ["--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(output_dir), *extra]
    result = run(command, output_dir.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def resume_from_half_way(straight: Path, resumed: Path, launch, inputs: tuple, flags: tuple) -> None:
    """Continues checkpoint-2 of the straight run in a new folder: 2 steps, resume, 2 steps."""
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    launch(*inputs, resumed, *flags, "--resume_from_checkpoint", "latest")


def assert_same_files(first: Path, second: Path, names: list[str]) -> None:
    for name in names:
        one, two = load_file(first / name), load_file(second / name)
        assert one.keys() == two.keys() and one, name
        assert all(torch.equal(one[key], two[key]) for key in one), name


def flux_image(pipeline) -> np.ndarray:
    kwargs = {"height": RESOLUTION, "width": RESOLUTION, "num_inference_steps": 2, "max_sequence_length": 16}
    return pipeline("a sks shape", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images[0]


def sd3_image(pipeline) -> np.ndarray:
    kwargs = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": SD3_TOKENS}
    return pipeline(SD3_PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def flux_lokr(tiny_flux_path: Path, sample_images: Path, work: Path) -> Path:
    launch_flux(tiny_flux_path, sample_images, work / "flux-lokr", *LOKR_FLAGS)
    return work / "flux-lokr"


def test_flux_lokr_and_its_ema_resume_bit_for_bit(flux_lokr: Path, tiny_flux_path, sample_images, work) -> None:
    resumed = work / "flux-lokr-resumed"
    resume_from_half_way(flux_lokr, resumed, launch_flux, (tiny_flux_path, sample_images), LOKR_FLAGS)

    assert_same_files(flux_lokr, resumed, [LORA, EMA, f"checkpoint-4/{LORA}"])
    ema, ema_again = (torch.load(path / "checkpoint-4" / "custom_checkpoint_0.pkl") for path in (flux_lokr, resumed))
    assert ema["optimization_step"] == ema_again["optimization_step"] == 4
    assert all(torch.equal(value, ema_again["shadow"][name]) for name, value in ema["shadow"].items())
    assert all(value.device.type == "cpu" for value in ema["shadow"].values()), "the EMA costs no GPU memory"


def test_flux_lokr_loads_with_diffusers_and_changes_the_output(flux_lokr: Path, tiny_flux_path: Path) -> None:
    from diffusers import FluxPipeline

    lora, ema = load_file(flux_lokr / LORA), load_file(flux_lokr / EMA)
    assert any(".lokr_w2" in key for key in lora) and lora.keys() == ema.keys()
    assert any(not torch.equal(lora[key], ema[key]) for key in lora), "the average is not the last step"
    pipeline = FluxPipeline.from_pretrained(tiny_flux_path)
    before = flux_image(pipeline)
    pipeline.transformer.load_lora_adapter(str(flux_lokr), weight_name=LORA, prefix="transformer")
    assert np.abs(flux_image(pipeline) - before).max() > 1e-3
    card = (flux_lokr / "README.md").read_text()
    assert "pipeline.transformer.load_lora_adapter(" in card and "| `use_ema` | `True` |" in card


@pytest.mark.parametrize("flags", [["--adapter", "loha"], ["--use_dora"]], ids=["loha", "dora"])
def test_flux_loha_and_dora_train_and_load(flags, tiny_flux_path: Path, sample_images: Path, work: Path) -> None:
    from diffusers import FluxPipeline

    output_dir = work / f"flux-{flags[-1].strip('-')}"
    launch_flux(tiny_flux_path, sample_images, output_dir, *flags, "--max_train_steps", "2")
    pipeline = FluxPipeline.from_pretrained(tiny_flux_path)
    before = flux_image(pipeline)
    if flags[-1] == "loha":
        load_adapter_file(pipeline.transformer, output_dir / LORA)  # PEFT: diffusers reads no LoHa
        assert "hada_w1_a" in "".join(load_file(output_dir / LORA))
    else:
        pipeline.load_lora_weights(output_dir)
        assert pipeline.transformer.peft_config["default_0"].use_dora
    assert np.abs(flux_image(pipeline) - before).max() > 1e-3


def test_flux_kohya_file_gives_the_image_of_the_diffusers_file(tiny_flux_path, sample_images, work) -> None:
    """diffusers' own kohya reader (`lora_state_dict`, then `load_lora_weights`) turns our kohya-keyed file back."""
    from diffusers import FluxPipeline

    output_dir = work / "flux-kohya"
    flags = ["--save_format", "diffusers,kohya", "--lora_layers", KOHYA_LAYERS, "--lora_alpha", "8"]
    launch_flux(tiny_flux_path, sample_images, output_dir, *flags, "--max_train_steps", "2")
    kohya = load_file(output_dir / KOHYA_WEIGHT_NAME)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in kohya
    assert "lora_unet_double_blocks_0_txt_attn_qkv.alpha" in kohya

    pipeline = FluxPipeline.from_pretrained(tiny_flux_path)
    base = flux_image(pipeline)
    pipeline.load_lora_weights(output_dir, weight_name=LORA)
    with_diffusers_file = flux_image(pipeline)
    pipeline.unload_lora_weights()
    pipeline.load_lora_weights(FluxPipeline.lora_state_dict(str(output_dir / KOHYA_WEIGHT_NAME)))
    with_kohya_file = flux_image(pipeline)

    assert np.abs(with_diffusers_file - base).max() > 1e-3
    np.testing.assert_allclose(with_kohya_file, with_diffusers_file, atol=1e-5)


@pytest.fixture(scope="module")
def sd3_loha(tiny_sd3_path: Path, instance_dir: Path, embeddings_path: Path, work: Path) -> Path:  # noqa: F811
    output_dir = work / "sd3-loha"
    launch_sd3(tiny_sd3_path, instance_dir, embeddings_path, output_dir, *LOHA_FLAGS)
    return output_dir


def test_sd3_loha_and_its_ema_resume_bit_for_bit(
    sd3_loha, tiny_sd3_path, instance_dir, embeddings_path, work  # noqa: F811
) -> None:
    resumed = work / "sd3-loha-resumed"
    inputs = (tiny_sd3_path, instance_dir, embeddings_path)
    resume_from_half_way(sd3_loha, resumed, launch_sd3, inputs, LOHA_FLAGS)

    assert_same_files(sd3_loha, resumed, [LORA, EMA])


def test_sd3_loha_loads_through_peft_and_changes_the_output(sd3_loha: Path, tiny_sd3_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    before = sd3_image(pipeline)
    load_adapter_file(pipeline.transformer, sd3_loha / EMA)
    assert np.abs(sd3_image(pipeline) - before).max() > 1e-4
    assert "load_adapter_file(pipeline.transformer" in (sd3_loha / "README.md").read_text()


def test_sd3_kohya_file_is_the_diffusers_file_rekeyed(tiny_sd3_path, instance_dir, embeddings_path, work):  # noqa: F811
    """No kohya SD3 reader in diffusers 0.42: the kohya file must be the fused rewrite of the diffusers file."""
    from diffusers import SD3Transformer2DModel

    output_dir = work / "sd3-kohya"
    flags = ["--save_format", "kohya", "--max_train_steps", "2"]
    launch_sd3(tiny_sd3_path, instance_dir, embeddings_path, output_dir, *flags)
    lora = {key.removeprefix("transformer."): value for key, value in load_file(output_dir / LORA).items()}
    sizes = linear_out_features(SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer"))

    kohya = load_file(output_dir / KOHYA_WEIGHT_NAME)

    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in kohya
    expected = to_kohya(lora, 1.0, "sd3", sizes)
    assert kohya.keys() == expected.keys() and all(torch.equal(kohya[key], expected[key]) for key in kohya)
