"""T5-XXL prompt-embedding memory on a GPU: all on the GPU in bf16, streamed block by block, and 8-bit.

Builds the encoder from `configs/models/t5-xxl-encoder.json` with random weights (bf16, `wo` kept in fp32 as
transformers loads it), embeds a batch of 512-token prompts each way in this one process, and writes peak
allocated GB, seconds and the difference from the bf16 result to `--output_dir`.

    python benchmarks/bench_t5_embeddings.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import T5Config, T5EncoderModel

from accelerate_offload import offload_model

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "models" / "t5-xxl-encoder.json"


def build_on(device: torch.device) -> T5EncoderModel:
    config = T5Config(**{k: v for k, v in json.loads(CONFIG.read_text()).items() if not k.startswith("_")},
                      is_encoder_decoder=False)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = T5EncoderModel(config).eval().requires_grad_(False)  # frozen, as for embedding
    finally:
        torch.set_default_dtype(torch.float32)
    for name, module in model.named_modules():
        if name.endswith(".wo"):
            module.float()  # as from_pretrained(torch_dtype=bf16) leaves it (_keep_in_fp32_modules)
    return model


def embed(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        output = model(tokens.to(device)).last_hidden_state.float().cpu()
    seconds = time.perf_counter() - start
    return output, torch.cuda.max_memory_allocated() / 1e9, seconds


class Results(list):
    """Rows written to disk as each mode finishes, so a slow last mode loses nothing measured before it."""

    def __init__(self, path: Path, batch: int) -> None:
        super().__init__()
        self.path, self.batch = path, batch

    def append(self, row: dict) -> None:
        row.update(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=self.batch, tokens=512)
        super().append(row)
        self.path.write_text(json.dumps(list(self), indent=2) + "\n")
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--skip_8bit", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokens = torch.randint(0, 32000, (args.batch, 512), generator=torch.Generator().manual_seed(0))
    model = build_on(device)
    results = Results(args.output_dir / "t5_xxl_embeddings.json", args.batch)
    reference, peak, seconds = embed(model, tokens, device)
    results.append({"mode": "bf16 on GPU", "peak_allocated_gb": peak, "seconds": seconds, "relative_error": 0.0})
    model.to("cpu")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() / 1e9
    offload_model(model, device, layer_offload_fraction=1.0, gradient_checkpointing=False)
    embed(model, tokens, device)  # warm-up: first pass pays for cuBLAS handles and pinned pages
    output, peak, seconds = embed(model, tokens, device)
    error = ((output - reference).norm() / reference.norm()).item()
    results.append({"mode": "bf16 streamed", "peak_allocated_gb": peak - base, "seconds": seconds,
                    "relative_error": error})
    if not args.skip_8bit:
        from transformers import BitsAndBytesConfig

        from accelerate_offload import remove_offload

        remove_offload(model, "cpu")
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            del model
            torch.cuda.empty_cache()
            quantized = T5EncoderModel.from_pretrained(
                folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": 0},
                dtype=torch.bfloat16,
            )
        output, peak, seconds = embed(quantized, tokens, device)
        error = ((output - reference).norm() / reference.norm()).item()
        results.append({"mode": "8-bit (bitsandbytes)", "peak_allocated_gb": peak, "seconds": seconds,
                        "relative_error": error})
    print(f"\n{'mode':22} {'peak GB':>8} {'seconds':>8} {'rel. error':>10}")
    for r in results:
        print(f"{r['mode']:22} {r['peak_allocated_gb']:8.2f} {r['seconds']:8.2f} {r['relative_error']:10.2e}")


if __name__ == "__main__":
    main()
