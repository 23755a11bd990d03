"""Whole jobs at full size under a GPU cap: every phase's GPU peak and the host memory over the run.

Each job runs a script itself (random weights of the full-size architectures, built first by
`build_full_size_pipeline.py` unless `--work_dir` holds them) as a smaller card would see it: the scripts'
package caps the process with `torch.cuda.set_per_process_memory_fraction` (`OFFLOAD_JOB_GPU_CAP`; the CUDA
context is not counted) and appends one JSON line per phase (`OFFLOAD_JOB_PHASE_LOG`) with the GPU peaks since
the phase began. The benchmark samples the host memory of the worker's process tree (RssAnon, RssFile,
RssShmem from /proc) and the device memory `nvidia-smi` reports (context included). Per job it writes
`job_<name>.json` (device, versions, resolution, cap, phase peaks, host peaks, s/step, wall time) and
`job_<name>.png` (GPU and host memory over time, phases marked) to `--output_dir`, and prints a table last.

    python benchmarks/bench_job_memory.py --work_dir job-memory --output_dir benchmarks/results/job_memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import yaml

from accelerate_offload.memory import GPU_CAP_VARIABLE, host_memory
from accelerate_offload.phases import PHASE_LOG_VARIABLE
from accelerate_offload.testing.tiny_pipelines import write_sample_images

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_PROMPT = "a photo of sks shape"
CLASS_PROMPT = "a photo of a shape"
VALIDATION_PROMPT = "a sks shape in a bucket"
SAMPLE_SECONDS = 0.2
JOBS = ("embeddings", "sd3_1024", "flux_1024", "flux_2048")


@dataclass
class Job:
    name: str
    command: list[str]
    gpu_cap: str
    resolution: int | None
    metrics: Path | None = None  # the script's metrics.jsonl, where it writes one
    samples: list[dict] = field(default_factory=list)


def launch(config: Path, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate_offload.cli", "launch", "--config_file", str(config),
            str(ROOT / script), *args]


def offload_config(work: Path, name: str, **settings) -> Path:
    """The low-VRAM launch config (everything streamed, activations offloaded), with `settings` on top."""
    config = yaml.safe_load((ROOT / "configs" / "offload_flux_lowvram.yaml").read_text())
    config["offload_config"].update(settings)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def flux_job(name: str, work: Path, resolution: int, config: Path, steps: int) -> Job:
    output = work / name
    command = launch(
        config, "train_flux_lora.py", "--pretrained_model_name_or_path", str(work / "flux-dev-random"),
        "--instance_data_dir", str(work / "images"), "--instance_prompt", INSTANCE_PROMPT,
        "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
        "--learning_rate", "1e-4", "--rank", "16", "--gradient_checkpointing", "--cache_latents",
        "--checkpointing_steps", str(steps - 1), "--validation_prompt", VALIDATION_PROMPT,
        "--num_validation_images", "1", "--num_inference_steps", "4", "--seed", "0", "--mixed_precision", "bf16",
        "--report_to", "none", "--output_dir", str(output),
    )
    return Job(name, command, "5GB", resolution, output / "metrics.jsonl")


def build_jobs(work: Path) -> dict[str, Job]:
    sd3, embeddings = work / "sd3-medium-random", work / "sd3-embeddings.parquet"
    return {
        "embeddings": Job("embeddings", [
            sys.executable, str(ROOT / "compute_embeddings.py"), "--pretrained_model_name_or_path", str(sd3),
            "--instance_data_dir", str(work / "images"), "--instance_prompt", INSTANCE_PROMPT,
            "--class_prompt", CLASS_PROMPT, "--validation_prompt", VALIDATION_PROMPT, "--t5_mode", "stream",
            "--output_path", str(embeddings),
        ], "3GB", None),
        "sd3_1024": Job("sd3_1024", launch(
            offload_config(work, "sd3-streamed"), "train_sd3_dreambooth_lora.py",
            "--pretrained_model_name_or_path", str(sd3), "--embeddings_path", str(embeddings),
            "--instance_data_dir", str(work / "images"), "--instance_prompt", INSTANCE_PROMPT,
            "--with_prior_preservation", "--class_data_dir", str(work / "sd3-class-images"),
            "--class_prompt", CLASS_PROMPT, "--num_class_images", "2", "--sample_batch_size", "1",
            "--resolution", "1024", "--train_batch_size", "1", "--max_train_steps", "3",
            "--validation_prompt", VALIDATION_PROMPT, "--num_validation_images", "1", "--validation_epochs", "1",
            "--num_inference_steps", "4", "--mixed_precision", "bf16", "--gradient_checkpointing", "--seed", "0",
            "--report_to", "tensorboard", "--output_dir", str(work / "sd3_1024"),
        ), "3GB", 1024),
        "flux_1024": flux_job("flux_1024", work, 1024, ROOT / "configs" / "offload_flux_lowvram.yaml", 3),
        "flux_2048": flux_job("flux_2048", work, 2048, offload_config(work, "flux-2048", sequence_chunks="auto"), 3),
    }


def process_tree_memory(pid: int) -> dict[str, int]:
    """Host memory of a process and all its descendants (the launcher and its worker)."""
    total: dict[str, int] = {}
    try:
        pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return total
    for one in pids:
        for key, value in host_memory(one).items():
            if key != "VmHWM":
                total[key] = total.get(key, 0) + value
    return total


def device_memory() -> int | None:
    """Bytes in use on GPU 0 as the driver sees them (all processes, CUDA contexts included)."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                            capture_output=True, text=True)
    return int(result.stdout.strip()) * 2**20 if result.returncode == 0 and result.stdout.strip() else None


def run_job(job: Job, work: Path, timeout: float) -> dict:
    phase_log = work / f"{job.name}-phases.jsonl"
    phase_log.unlink(missing_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_OFFLOAD_")}
    env.update({GPU_CAP_VARIABLE: job.gpu_cap, PHASE_LOG_VARIABLE: str(phase_log), "PYTHONUNBUFFERED": "1"})
    log_path = work / f"{job.name}.log"
    start = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen(job.command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                job.samples.append({"time": time.time(), **process_tree_memory(process.pid), "gpu": device_memory()})
                done.wait(SAMPLE_SECONDS)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        done.set()
        sampler.join()
    wall = time.time() - start
    phases = [json.loads(line) for line in phase_log.read_text().splitlines()] if phase_log.exists() else []
    return summarize(job, phases, returncode, start, wall, log_path)


def summarize(job: Job, phases: list[dict], returncode: int, start: float, wall: float, log_path: Path) -> dict:
    for phase in phases:
        inside = [s for s in job.samples if phase["start"] <= s["time"] <= phase["end"] + SAMPLE_SECONDS]
        for key in ("RssAnon", "RssFile", "RssShmem"):
            phase[f"host_{key}_peak"] = max((s.get(key, 0) for s in inside), default=None)
    steps = [p for p in phases if p["phase"].startswith("step ")]
    seconds = [p["end"] - p["start"] for p in steps[1:]]
    if job.metrics is not None and job.metrics.exists():
        records = [json.loads(line) for line in job.metrics.read_text().splitlines()]
        seconds = [r["seconds_per_step"] for r in records[1:]] or seconds
    lines = log_path.read_text().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return {
        "job": job.name,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "versions": {name: _version(name) for name in ("diffusers", "transformers", "accelerate", "peft")},
        "resolution": job.resolution,
        "gpu_cap": job.gpu_cap,
        "gpu_cap_note": "per-process cap on the caching allocator; the CUDA context is not counted",
        "command": job.command,
        "returncode": returncode,
        "error": errors[-1] if errors else (lines[-1] if returncode and lines else None),
        "wall_seconds": wall,
        "seconds_per_step": statistics.median(seconds) if seconds else None,
        "gpu_peak_allocated_gb": max((p.get("gpu_peak_allocated", 0) for p in phases), default=0) / 1e9,
        "gpu_peak_reserved_gb": max((p.get("gpu_peak_reserved", 0) for p in phases), default=0) / 1e9,
        "host_peaks_gb": {key: max((s.get(key, 0) for s in job.samples), default=0) / 1e9
                          for key in ("RssAnon", "RssFile", "RssShmem")},
        "phases": [{**p, "start": p["start"] - start, "end": p["end"] - start} for p in phases],
        "samples": [{**s, "time": s["time"] - start} for s in job.samples],
    }


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def draw(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (gpu, host) = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
    times = [s["time"] for s in result["samples"]]
    for phase in result["phases"]:
        for axis in (gpu, host):
            axis.axvspan(phase["start"], phase["end"], alpha=0.08, color="tab:red" if not phase["ok"] else "tab:blue")
        if "gpu_peak_allocated" in phase:
            gpu.hlines(phase["gpu_peak_allocated"] / 1e9, phase["start"], phase["end"], color="tab:blue", lw=2)
            gpu.hlines(phase["gpu_peak_reserved"] / 1e9, phase["start"], phase["end"], color="tab:orange", lw=2)
        if not phase["phase"].startswith("step ") or phase["phase"] == "step 1":
            label = "steps" if phase["phase"] == "step 1" else phase["phase"]
            gpu.annotate(label, (phase["start"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                         va="top", fontsize=8)
    driver = [(t, s["gpu"] / 1e9) for t, s in zip(times, result["samples"]) if s.get("gpu") is not None]
    if driver:
        gpu.plot(*zip(*driver), color="gray", lw=1, label="device memory in use (driver, context included)")
    gpu.axhline(float(result["gpu_cap"].removesuffix("GB")), color="black", ls="--", lw=1, label="cap")
    gpu.plot([], [], color="tab:blue", lw=2, label="phase peak allocated")
    gpu.plot([], [], color="tab:orange", lw=2, label="phase peak reserved")
    gpu.set_ylabel("GPU GB")
    gpu.legend(loc="upper right", fontsize=8)
    for key, colour in (("RssAnon", "tab:green"), ("RssFile", "tab:purple"), ("RssShmem", "tab:brown")):
        host.plot(times, [s.get(key, 0) / 1e9 for s in result["samples"]], color=colour, label=key)
    host.set_ylabel("host GB (process tree)")
    host.set_xlabel("seconds")
    host.legend(loc="upper right", fontsize=8)
    gpu.set_title(f"{result['job']}: {result['device']}, cap {result['gpu_cap']}, exit {result['returncode']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_pipelines(work: Path, jobs: list[str]) -> None:
    needed = {"flux": any(j.startswith("flux") for j in jobs), "sd3": any(not j.startswith("flux") for j in jobs)}
    folders = {"flux": work / "flux-dev-random", "sd3": work / "sd3-medium-random"}
    for model, folder in folders.items():
        if needed[model] and not (folder / "model_index.json").exists():
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "build_full_size_pipeline.py"), "--model", model,
                            "--output_dir", str(folder)], check=True)
    if not (work / "images").exists():
        write_sample_images(work / "images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, required=True, help="Pipelines, images and job outputs (~55 GB).")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "benchmarks" / "results" / "job_memory")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--timeout", type=float, default=300, help="Seconds before a job is stopped.")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    build_pipelines(args.work_dir, args.jobs)
    jobs = build_jobs(args.work_dir.resolve())
    results = []
    for name in [job for job in JOBS if job in args.jobs]:  # embeddings before the SD3 job that reads them
        print(f"running {name}", flush=True)
        result = run_job(jobs[name], args.work_dir.resolve(), args.timeout)
        (args.output_dir / f"job_{name}.json").write_text(json.dumps(result, indent=1))
        draw(result, args.output_dir / f"job_{name}.png")
        results.append(result)
    print(f"{'job':12s} {'cap':>5s} {'exit':>4s} {'GPU alloc':>9s} {'reserved':>8s} {'RssAnon':>8s} {'RssFile':>8s} "
          f"{'s/step':>7s} {'wall s':>7s}  worst phase")
    for r in results:
        worst = max(r["phases"], key=lambda p: p.get("gpu_peak_reserved", 0), default={"phase": "-"})
        step = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "-"
        print(f"{r['job']:12s} {r['gpu_cap']:>5s} {r['returncode']:4d} {r['gpu_peak_allocated_gb']:9.2f} "
              f"{r['gpu_peak_reserved_gb']:8.2f} {r['host_peaks_gb']['RssAnon']:8.2f} "
              f"{r['host_peaks_gb']['RssFile']:8.2f} {step:>7s} {r['wall_seconds']:7.0f}  {worst['phase']}"
              + (f"  {r['error']}" if r["error"] else ""))


if __name__ == "__main__":
    main()
