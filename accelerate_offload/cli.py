"""`accelerate-offload`: accelerate's launcher, plus an `offload_config:` section in the accelerate config file.

Accelerate refuses unknown top-level keys in its config file and has no hook for third-party plugins, but every
worker inherits the launcher's environment. So `launch` takes the `offload_config:` section out of the config,
checks it by building a `LayerOffloadPlugin`, exports it as `ACCELERATE_OFFLOAD_*` variables, and hands the
rest of the file to accelerate's own launcher, where `LayerOffloadPlugin()` reads the variables back. Unless the
shell configures PyTorch's CUDA allocator itself, the workers get expandable segments (see `allocator_environment`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from accelerate.commands.config import default_config_file, load_config_from_file
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command, launch_command_parser
from accelerate.utils import ComputeEnvironment, DistributedType, patch_environment

from .plugin import ENV_PREFIX, LayerOffloadPlugin, OffloadConfigError, env_name, setting_names
from .quiet import quiet_third_party_noise

SECTION = "offload_config"
USAGE_ERROR = 2
ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"

# Named explicitly: under `python -m accelerate_offload.cli`, __name__ is "__main__".
logger = logging.getLogger("accelerate_offload.cli")


class ConfigFileError(Exception):
    """A config file that is missing, unreadable or not shaped like an accelerate config; reported as one line."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand and returns the exit code; errors in the user's input are one line, not a traceback."""
    quiet_third_party_noise()
    _setup_logging()
    args = _build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigFileError, OffloadConfigError, OSError) as error:
        logger.error("%s", " ".join(str(error).split()))
        return USAGE_ERROR


def _setup_logging() -> None:
    """Prefixes this package's messages; other libraries' logging stays as they set it up."""
    package_logger = logging.getLogger("accelerate_offload")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("accelerate-offload: %(levelname)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelerate-offload",
        description="Accelerate's launcher and config writer, with the layer-offload settings in the config file.",
        allow_abbrev=False,
    )
    subcommands = parser.add_subparsers(dest="command", required=True)

    # accelerate's own parser, so every `accelerate launch` argument works unchanged.
    launch = launch_command_parser(subcommands)
    launch.description = (
        "Like `accelerate launch`, but the config file may hold an `offload_config:` section, exported to the "
        "workers as ACCELERATE_OFFLOAD_* variables."
    )
    launch.set_defaults(run=_launch)

    config = subcommands.add_parser(
        "config",
        help="Write an accelerate config file with an offload_config section.",
        description="Write a single-process accelerate config file with an offload_config section, "
        "without questions. Offload settings left out keep the plugin's defaults.",
        allow_abbrev=False,
    )
    config.add_argument("--config_file", required=True, type=Path, help="Where to write the YAML file.")
    config.add_argument("--force", action="store_true", help="Overwrite the file if it exists.")
    config.add_argument("--cpu", action="store_true", help="Train on the CPU (use_cpu: true).")
    config.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16", "fp8"],
        help="Accelerate's mixed precision; defaults to bf16, or no with --cpu.",
    )
    hints = typing.get_type_hints(LayerOffloadPlugin)
    for spec in fields(LayerOffloadPlugin):
        if bool in typing.get_args(hints[spec.name]):
            # `--activation_offloading` alone means true; `--activation_offloading false` is accepted too.
            config.add_argument(f"--{spec.name}", nargs="?", const="true", metavar="BOOL", help=spec.metadata["help"])
        else:
            config.add_argument(f"--{spec.name}", help=spec.metadata["help"])
    config.set_defaults(run=_write_config)

    env = subcommands.add_parser(
        "env",
        help="Print the offload settings that the environment gives a worker.",
        description="Print the offload settings LayerOffloadPlugin() would read from the ACCELERATE_OFFLOAD_* "
        "variables now, as an offload_config section.",
    )
    env.set_defaults(run=_print_env)
    return parser


def _launch(args: argparse.Namespace) -> int:
    """Checks and exports the offload settings, then runs accelerate's launcher on the rest of the config."""
    config_path = _config_accelerate_reads(args)
    config: dict[str, Any] = {} if config_path is None else read_config(config_path)
    section = split_offload_section(config, config_path)
    exported = offload_environment(section)
    for name, value in exported.items():
        shell_value = os.environ.get(name)
        if shell_value is not None and shell_value != value:
            logger.warning("%s=%s from the config file overrides %s from the environment", name, value, shell_value)
    exported.update(allocator_environment())
    if exported:
        logger.info("exporting %s", " ".join(f"{name}={value}" for name, value in exported.items()))

    _pick_cpu_threads(args, config)
    with _accelerate_config_file(config, config_path) as accelerate_config:
        args.config_file = accelerate_config
        with patch_environment(**exported), _workers_get_the_signals():
            try:
                launch_command(args)
            except subprocess.CalledProcessError as error:
                # The worker has already printed its own error; the launcher's traceback adds nothing.
                logger.error("the training script exited with code %d", error.returncode)
                return error.returncode
    return 0


def _pick_cpu_threads(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """Passes accelerate the CPU thread count it would pick itself, so it does not print a notice about choosing it.

    For CPU training without OMP_NUM_THREADS, accelerate gives each process the machine's physical cores shared
    among the processes of one machine, and says so in a warning; any other run gets one thread from it, silently.
    """
    if args.num_cpu_threads_per_process is not None or "OMP_NUM_THREADS" in os.environ:
        return
    if not (args.cpu or config.get("use_cpu", False)):
        return
    import psutil

    processes = args.num_processes or config.get("num_processes") or 1
    machines = args.num_machines or config.get("num_machines") or 1
    local_processes = max(int(processes / machines), 1)
    args.num_cpu_threads_per_process = max(int((psutil.cpu_count(logical=False) or 1) / local_processes), 1)


@contextmanager
def _workers_get_the_signals() -> Iterator[None]:
    """SIGTERM goes on to the training processes and Ctrl-C is left to them, so they can save and exit.

    Accelerate's launcher forwards neither: SIGTERM would kill it and orphan a training worker, and Ctrl-C
    (which the terminal sends to the worker too) would end it mid-save with a traceback. The launcher instead
    waits and returns the worker's exit code.
    """
    import psutil

    def forward(signum: int, frame: Any) -> None:
        for child in psutil.Process().children():
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGINT: signal.signal(signal.SIGINT, lambda signum, frame: None),
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _config_accelerate_reads(args: argparse.Namespace) -> Path | None:
    """The config file `accelerate launch` would read: `--config_file`, else its default one unless `--cpu`."""
    if args.config_file is not None:
        return Path(args.config_file)
    if os.path.isfile(default_config_file) and not args.cpu:
        return Path(default_config_file)
    return None


def read_config(path: Path) -> dict[str, Any]:
    """Loads an accelerate config file (YAML or JSON) as a mapping."""
    if not path.is_file():
        raise ConfigFileError(f"config file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as file:
            config = yaml.safe_load(file)
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise ConfigFileError(f"{path} must hold a mapping of accelerate settings, got {type(config).__name__}")
    return config


def split_offload_section(config: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Removes the `offload_config:` section from `config` and returns it; unknown keys are refused."""
    section = config.pop(SECTION, None)
    if section is None:  # no section, or `offload_config:` with nothing under it
        return {}
    if not isinstance(section, dict):
        raise ConfigFileError(f"{path}: {SECTION} must be a mapping of offload settings, got {section!r}")
    known = setting_names()
    unknown = sorted(str(key) for key in section if key not in known)
    if unknown:
        raise OffloadConfigError(
            f"{path}: unknown key {', '.join(unknown)} in {SECTION}; known keys: {', '.join(known)}"
        )
    return section


def offload_environment(section: dict[str, Any]) -> dict[str, str]:
    """The `ACCELERATE_OFFLOAD_*` variables for `section`, after checking the settings a worker will end up with.

    The plugin is built with the current environment, so settings the section leaves out come from the shell's
    variables, exactly as in the workers, and contradictions between the two are caught before launch too.
    """
    plugin = LayerOffloadPlugin(**section)
    wanted = {env_name(name) for name in section}
    return {name: value for name, value in plugin.to_env().items() if name in wanted}


def allocator_environment() -> dict[str, str]:
    """Expandable segments for the workers' CUDA allocator, unless the shell sets the allocator's options.

    Under a tight budget the caching allocator's fixed segments fragment: streamed blocks of two sizes, token
    chunks and VAE tiles leave free memory split across segments, and a pass that fits in what is allocated fails
    for want of one contiguous segment. Expandable segments map one growing range instead. Linux only: elsewhere
    PyTorch ignores the option with a warning.
    """
    if sys.platform != "linux" or any(name in os.environ for name in ALLOCATOR_VARIABLES):
        return {}
    return {ALLOCATOR_VARIABLES[0]: EXPANDABLE_SEGMENTS}


@contextmanager
def _accelerate_config_file(config: dict[str, Any], source: Path | None) -> Iterator[str | None]:
    """Writes `config` (the offload section removed) to a temporary file that accelerate accepts; deletes it after."""
    if source is None:
        yield None
        return
    handle, name = tempfile.mkstemp(prefix="accelerate-offload-", suffix=".yaml")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            yaml.safe_dump(config, file)
        try:
            load_config_from_file(name)
        except (ValueError, TypeError) as error:
            raise ConfigFileError(f"accelerate rejects {source}: {str(error).replace(name, str(source))}") from None
        yield name
    finally:
        os.unlink(name)


def _write_config(args: argparse.Namespace) -> int:
    """Writes an accelerate single-process config with a checked `offload_config:` section."""
    given = {name: getattr(args, name) for name in setting_names() if getattr(args, name) is not None}
    with _without_offload_environment():
        plugin = LayerOffloadPlugin(**given)
    # Settings with a fixed default are written so the file shows every knob; gradient_checkpointing (derived
    # from the others) and block_names (model-specific) only when given, so later edits stay consistent.
    section = {
        spec.name: getattr(plugin, spec.name)
        for spec in fields(plugin)
        if spec.name in given or spec.metadata["default"] is not None
    }
    mixed_precision = args.mixed_precision or ("no" if args.cpu else "bf16")
    config = ClusterConfig(
        compute_environment=ComputeEnvironment.LOCAL_MACHINE,
        distributed_type=DistributedType.NO,
        mixed_precision=mixed_precision,
        use_cpu=args.cpu,
        debug=False,
        num_processes=1,
    ).to_dict()
    config[SECTION] = section
    text = (
        f"# Launch with: accelerate-offload launch --config_file {args.config_file} train.py ...\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    args.config_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Mode "x" refuses an existing file atomically.
        with open(args.config_file, "w" if args.force else "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise ConfigFileError(f"{args.config_file} exists; pass --force to overwrite it") from None
    logger.info("wrote %s", args.config_file)
    return 0


@contextmanager
def _without_offload_environment() -> Iterator[None]:
    """Hides the shell's `ACCELERATE_OFFLOAD_*` variables so a written config depends only on its arguments."""
    hidden = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith(ENV_PREFIX)}
    try:
        yield
    finally:
        os.environ.update(hidden)


def _print_env(args: argparse.Namespace) -> int:
    """Prints what `LayerOffloadPlugin()` reads from this environment, each value with where it came from."""
    plugin = LayerOffloadPlugin()
    lines = [f"{SECTION}:"]
    for name in setting_names():
        variable = env_name(name)
        source = variable if variable in os.environ else "default"
        lines.append(f"  {name}: {json.dumps(getattr(plugin, name))}  # {source}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
