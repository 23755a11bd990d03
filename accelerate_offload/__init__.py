"""accelerate-offload: stream a diffusion transformer's blocks from pinned CPU memory while a LoRA trains.

Modules, each importing only those above it (`tests/test_imports.py` checks it):

- `quiet`: dependencies' import-time notes silenced at their loggers (entry points call it first).
- `script_errors`: `UsageError` and `TrainingFault`, the one-line errors the scripts stop with.
- `recompute`: whether the code running is a checkpoint's recomputation.
- `settings`: `OffloadSettings`, the one object the settings travel in.
- `block_compiler`: `compile_blocks`, each block's own computation compiled once per class, its compile time apart.
- `timeline`: a traced step's events and its VRAM picture.
- `streams`: host<->device copies on side CUDA streams.
- `block_weights`: one host buffer per streamed block, parameters re-pointed at it.
- `shared_weights`: one host copy of the streamed blocks per machine, shared by the processes training on it.
- `disk_tier`: `max_ram`, the streamed blocks past a host budget, read from a block file through a staging ring.
- `planner`: `max_vram`, the resident blocks chosen from the first step's peak.
- `activations`: checkpointed block inputs shuttled to host memory.
- `conductor`: which blocks are on the device, when they load and leave.
- `chunk_rows`: the model-independent half of token-chunked blocks.
- `registry`: the model registry (block lists, late feed-forwards, chunk mirrors), and the fallback to a class's
  declared blocks.
- `models.flux`, `models.sd3`: the chunk mirrors, imported (with diffusers) only when such a block is chunked.
- `chunking`: a block's chunked forward, through the registry.
- `block_hook`: the per-block hook: checkpointing, and the conductor's calls around the block.
- `offload`: `offload_model`, `remove_offload`, `get_conductor`, `trace_step`.
- `memory`: host and GPU memory figures, the GPU cap, freeing what a phase left behind.
- `oom`: the out-of-memory explanation.
- `vae_memory`: a whole, sliced or tiled VAE pass, chosen from the image size and the room left.
- `phases`: a job's phases: one line for an out-of-memory error in any of them, a record of each one's peaks.
- `adapters`: PEFT adapters (LoRA, DoRA, LoKr, LoHa): configs, their saved files and loaders, the scripts' flag checks.
- `lora_formats`: a LoRA rewritten with kohya keys (`lora_unet_...`) for ComfyUI, Forge and sd-scripts.
- `ema`: the adapter's moving average in CPU memory.
- `inference`: a pipeline placed for inference (frozen, streamed like training), a saved LoRA loaded onto it.
- `optimizers`: the optimizer flags of diffusers' scripts (`--optimizer` in any case, `--use_8bit_adam`, Prodigy's
  switches), checked and built one way for both scripts.
- `training_utils`: what the scripts share: atomic checkpoints and their resume checks, metrics.jsonl, finite
  checks, stop signals, file modes, the latent cache of `--cache_latents`.
- `training_math`: shifted timestep draws, shuffled captions, masks on the latent grid, the validation loss's
  held-out images and fixed noise.
- `buckets`: aspect-ratio buckets: the sizes from `--aspect_ratio_buckets`, each image's nearest one, the crop to
  it, batches of one bucket in a (seed, epoch) order.
- `loss_plot`: the run's summary plot, training and validation loss.
- `plugin`: `LayerOffloadPlugin`, the settings read from the launch config; `cli`: `accelerate-offload`.
- `testing.tiny_pipelines`: tiny random pipelines and drawn images for tests and the demo.
"""

from .inference import place_pipeline
from .offload import get_conductor, offload_model, remove_offload, trace_step
from .oom import explain_out_of_memory
from .planner import VramBudgetError
from .plugin import LayerOffloadPlugin, OffloadConfigError
from .registry import BlocksNotFoundError, find_blocks
from .settings import OffloadSettings
from .timeline import plot_timeline

__all__ = [
    "BlocksNotFoundError",
    "LayerOffloadPlugin",
    "OffloadConfigError",
    "OffloadSettings",
    "VramBudgetError",
    "explain_out_of_memory",
    "find_blocks",
    "get_conductor",
    "offload_model",
    "place_pipeline",
    "plot_timeline",
    "remove_offload",
    "trace_step",
]
__version__ = "0.1.0"
