"""GPU memory of whole and tiled VAE passes at full size, beside the estimate `vae_memory` plans with.

The planner's per-pixel figures were counted on CPU (live tensors of every op). On CUDA the kernels' own scratch
and the caching allocator add to that; this measures each pass's peak above what was allocated before it, for
the Flux VAE (bf16) and SD3's (fp32, as the SD3 script keeps it), so the estimate can be checked and calibrated.
Writes `vae_passes.json` to `--output_dir` and prints a table.

    python benchmarks/bench_vae_passes.py --output_dir benchmarks/results/vae_passes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_full_size_pipeline import FLUX_VAE, SD3_VAE  # noqa: E402

from accelerate_offload.vae_memory import IMAGE_COPIES, VaePlan, apply_vae_plan, pass_bytes  # noqa: E402

GB = 1e9
VAES = {"flux": (FLUX_VAE, torch.bfloat16), "sd3": (SD3_VAE, torch.float32)}


def estimate(vae: AutoencoderKL, size: int, plan: VaePlan, kind: str) -> int:
    channels, itemsize = vae.config.block_out_channels[0], vae.dtype.itemsize
    if plan.tile_size is None:
        return pass_bytes(channels, size, size, 1, itemsize, kind)
    return pass_bytes(channels, plan.tile_size, plan.tile_size, 1, itemsize, kind) + IMAGE_COPIES * 3 * size**2 * itemsize


def measure(vae: AutoencoderKL, size: int, plan: VaePlan, kind: str) -> int:
    """Peak bytes above the pass's input."""
    apply_vae_plan(vae, plan)
    latent = size // 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator("cuda").manual_seed(0)
    if kind == "decode":
        sample = torch.randn(1, vae.config.latent_channels, latent, latent, generator=generator, device="cuda")
    else:
        sample = torch.randn(1, 3, size, size, generator=generator, device="cuda")
    sample = sample.to(vae.dtype)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        output = vae.decode(sample).sample if kind == "decode" else vae.encode(sample).latent_dist.sample()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del output, sample
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results" / "vae_passes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = False
    rows = []
    for name, (config, dtype) in VAES.items():
        with torch.device("cuda"):
            vae = AutoencoderKL(**config).to(dtype).eval()
        for size in args.sizes:
            plans = [VaePlan()] + [VaePlan(tile_size=tile) for tile in (1024, 512, 256) if tile < size]
            for kind in ("decode", "encode"):
                for plan in plans:
                    peak = measure(vae, size, plan, kind)
                    rows.append({
                        "vae": name, "dtype": str(dtype).removeprefix("torch."), "size": size, "kind": kind,
                        "tile": plan.tile_size, "peak_gb": peak / GB, "estimate_gb": estimate(vae, size, plan, kind) / GB,
                    })
                    row = rows[-1]
                    print(f"{name:5s} {row['dtype']:9s} {size:5d} {kind:7s} tile {str(plan.tile_size):5s} "
                          f"peak {row['peak_gb']:6.2f} GB  estimate {row['estimate_gb']:6.2f} GB  "
                          f"ratio {row['peak_gb'] / row['estimate_gb']:.2f}", flush=True)
        del vae
        torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(), "rows": rows,
    }
    (args.output_dir / "vae_passes.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
