"""`accelerate-offload` config files, launcher and environment variables, on the CPU.

The launch tests run accelerate's real launcher and a real worker (tests/scripts/report_offload_settings.py),
which reports the settings it sees: that is the only place the settings matter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from accelerate.commands.config import load_config_from_file
from launching import environment, launch_command, run, start

from accelerate_offload import LayerOffloadPlugin, OffloadConfigError
from accelerate_offload.cli import (
    ALLOCATOR_VARIABLES,
    main,
    offload_environment,
    read_config,
    split_offload_section,
)
from accelerate_offload.plugin import ENV_PREFIX

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REPORT_SCRIPT = ROOT / "tests" / "scripts" / "report_offload_settings.py"
CPU_CONFIG = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "NO",
    "mixed_precision": "no",
    "use_cpu": True,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No offload variables from the shell, workers import this checkout, temporary files land in tmp_path."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))


def write_yaml(path: Path, config: Any) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def launch(config_path: Path, *script: str | Path) -> int:
    """Runs `accelerate-offload launch` in this process (its log lines reach caplog); the worker is a subprocess."""
    return main(["launch", "--config_file", str(config_path), *map(str, script)])


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs the `accelerate-offload` console script's entry point in a fresh interpreter."""
    return run([sys.executable, "-m", "accelerate_offload.cli", *map(str, args)], ROOT, environment(**(env or {})))


# Offload section -> environment variables.


def test_offload_section_becomes_environment_variables(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "config.yaml",
        {
            **CPU_CONFIG,
            "offload_config": {
                "layer_offload_fraction": 0.75,
                "activation_offloading": True,
                "prefetch_blocks": 2,
                "block_names": ["blocks", "single_blocks"],
            },
        },
    )
    config = read_config(path)
    section = split_offload_section(config, path)

    assert "offload_config" not in config
    assert offload_environment(section) == {
        "ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION": "0.75",
        "ACCELERATE_OFFLOAD_ACTIVATION_OFFLOADING": "true",
        "ACCELERATE_OFFLOAD_PREFETCH_BLOCKS": "2",
        "ACCELERATE_OFFLOAD_BLOCK_NAMES": "blocks,single_blocks",
    }


def test_empty_or_missing_section_exports_nothing(tmp_path: Path) -> None:
    for config in (CPU_CONFIG, {**CPU_CONFIG, "offload_config": None}):
        path = write_yaml(tmp_path / "config.yaml", config)
        assert offload_environment(split_offload_section(read_config(path), path)) == {}


def test_unknown_offload_key_is_refused_with_the_known_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_yaml(tmp_path / "config.yaml", {**CPU_CONFIG, "offload_config": {"layer_fraction": 0.5}})

    with pytest.raises(OffloadConfigError, match="unknown key layer_fraction") as raised:
        split_offload_section(read_config(path), path)
    assert "layer_offload_fraction, activation_offloading" in str(raised.value)

    assert launch(path, REPORT_SCRIPT, tmp_path / "report.json") == 2
    assert len(error_lines(caplog)) == 1
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layer_offload_fraction": 1.5}, "must be in 0..1"),
        ({"layer_offload_fraction": "half"}, "must be a number"),
        ({"prefetch_blocks": -1}, "whole number"),
        ({"activation_offloading": "maybe"}, "true or false"),
        ({"offload_device": "disk"}, "must be 'cpu'"),
        ({"pin_memory": False}, "async_offloading needs pin_memory"),
        ({"layer_offload_fraction": 0.5, "gradient_checkpointing": False}, "needs gradient_checkpointing"),
    ],
)
def test_bad_offload_values_fail_before_launch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, settings: dict[str, Any], message: str
) -> None:
    path = write_yaml(tmp_path / "config.yaml", {**CPU_CONFIG, "offload_config": settings})

    assert launch(path, REPORT_SCRIPT, tmp_path / "report.json") == 2

    [error] = error_lines(caplog)
    assert message in error and "\n" not in error
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("- a list\n- not a mapping\n", "must hold a mapping"),
        ("distributed_type: [NO\n", "is not valid YAML"),
        ("distributed_type: 'NO'\noffload_config: 0.5\n", "offload_config must be a mapping"),
        ("distributed_type: 'NO'\noffload_config: []\n", "offload_config must be a mapping"),
        ("distributed_type: 'NO'\noffload:\n  layer_offload_fraction: 0.5\n", "unknown keys (['offload'])"),
    ],
)
def test_broken_config_files_give_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | None, message: str
) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")

    assert launch(path, REPORT_SCRIPT, tmp_path / "report.json") == 2

    [error] = error_lines(caplog)
    assert message in error and "\n" not in error
    assert str(path) in error
    assert list(Path(tempfile.gettempdir()).iterdir()) == []


def test_unknown_offload_variable_in_the_shell_fails_before_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_FOO", "1")
    path = write_yaml(tmp_path / "config.yaml", CPU_CONFIG)

    assert launch(path, REPORT_SCRIPT, tmp_path / "report.json") == 2
    [error] = error_lines(caplog)
    assert "ACCELERATE_OFFLOAD_FOO" in error


# The config writer.


def test_config_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "offload.yaml"

    arguments = ["--layer_offload_fraction", "0.9", "--activation_offloading", "--prefetch_blocks", "2"]
    arguments += ["--block_names", "transformer_blocks, single_transformer_blocks"]
    assert main(["config", "--config_file", str(path), *arguments]) == 0

    config = read_config(path)
    section = split_offload_section(config, path)
    assert section == {
        "layer_offload_fraction": 0.9,
        "activation_offloading": True,
        "async_offloading": True,
        "prefetch_blocks": 2,
        "pin_memory": True,
        "offload_device": "cpu",
        "sequence_chunks": 1,
        "block_names": ["transformer_blocks", "single_transformer_blocks"],
        "share_host_weights": "auto",
        "compile_blocks": False,
    }
    assert LayerOffloadPlugin(**section).gradient_checkpointing
    accelerate_part = write_yaml(tmp_path / "accelerate.yaml", config)
    loaded = load_config_from_file(str(accelerate_part))
    assert (loaded.mixed_precision, loaded.use_cpu, loaded.num_processes) == ("bf16", False, 1)


def test_config_writer_for_the_cpu(tmp_path: Path) -> None:
    path = tmp_path / "cpu.yaml"

    arguments = ["--cpu", "--async_offloading", "false", "--pin_memory", "no"]
    assert main(["config", "--config_file", str(path), *arguments]) == 0

    config = read_config(path)
    assert (config["use_cpu"], config["mixed_precision"]) == (True, "no")
    assert config["offload_config"]["async_offloading"] is False
    assert config["offload_config"]["pin_memory"] is False


def test_config_writer_ignores_the_shell_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_PIN_MEMORY", "false")
    path = tmp_path / "offload.yaml"

    assert main(["config", "--config_file", str(path)]) == 0

    assert read_config(path)["offload_config"]["pin_memory"] is True
    assert os.environ["ACCELERATE_OFFLOAD_PIN_MEMORY"] == "false"


def test_config_writer_refuses_to_overwrite(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "offload.yaml"
    path.write_text("precious: true\n", encoding="utf-8")

    assert main(["config", "--config_file", str(path), "--layer_offload_fraction", "0.5"]) == 2
    assert path.read_text(encoding="utf-8") == "precious: true\n"
    [error] = error_lines(caplog)
    assert "--force" in error

    assert main(["config", "--config_file", str(path), "--layer_offload_fraction", "0.5", "--force"]) == 0
    assert read_config(path)["offload_config"]["layer_offload_fraction"] == 0.5


def test_config_writer_refuses_bad_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "offload.yaml"

    assert main(["config", "--config_file", str(path), "--layer_offload_fraction", "2"]) == 2
    assert not path.exists()
    [error] = error_lines(caplog)
    assert "layer_offload_fraction must be in 0..1" in error


# The plugin reads the environment.


def test_plugin_reads_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION", "0.25")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_ACTIVATION_OFFLOADING", "yes")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_ASYNC_OFFLOADING", "0")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_PREFETCH_BLOCKS", "3")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_BLOCK_NAMES", "a.blocks,b")

    plugin = LayerOffloadPlugin()

    assert plugin.layer_offload_fraction == 0.25
    assert plugin.activation_offloading is True
    assert plugin.async_offloading is False
    assert plugin.prefetch_blocks == 3
    assert plugin.block_names == ["a.blocks", "b"]
    assert plugin.gradient_checkpointing is True
    assert plugin.pin_memory is True


def test_explicit_arguments_win_over_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION", "0.25")
    monkeypatch.setenv("ACCELERATE_OFFLOAD_PREFETCH_BLOCKS", "3")

    plugin = LayerOffloadPlugin(layer_offload_fraction=1.0, prefetch_blocks=0)

    assert (plugin.layer_offload_fraction, plugin.prefetch_blocks) == (1.0, 0)


def test_unknown_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_FOO", "1")

    with pytest.raises(OffloadConfigError, match="ACCELERATE_OFFLOAD_FOO"):
        LayerOffloadPlugin()


def test_env_command_prints_settings_and_sources(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION", "0.5")

    assert main(["env"]) == 0

    out = capsys.readouterr().out
    printed = yaml.safe_load(out)["offload_config"]
    assert printed["layer_offload_fraction"] == 0.5
    assert printed["gradient_checkpointing"] is True
    assert printed["pin_memory"] is True
    assert "layer_offload_fraction: 0.5  # ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION" in out
    assert "pin_memory: true  # default" in out


# Launches: accelerate's launcher and a worker that reports what it sees.


@pytest.mark.parametrize("config_path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_shipped_configs_launch(config_path: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"

    assert launch(config_path, REPORT_SCRIPT, report_path) == 0

    report = json.loads(report_path.read_text(encoding="utf-8"))
    section = yaml.safe_load(config_path.read_text(encoding="utf-8"))["offload_config"]
    for name, value in section.items():
        assert report["settings"][name] == value, name
    assert report["settings"] == dataclasses.asdict(LayerOffloadPlugin(**section))
    assert list(Path(tempfile.gettempdir()).iterdir()) == []


def test_cpu_config_runs_on_the_cpu_in_full_precision(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"

    assert launch(ROOT / "configs" / "cpu_tiny.yaml", REPORT_SCRIPT, report_path) == 0

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert (report["device"], report["mixed_precision"], report["num_processes"]) == ("cpu", "no", 1)


def test_launcher_returns_the_script_exit_code(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(3)\n", encoding="utf-8")
    path = write_yaml(tmp_path / "config.yaml", {**CPU_CONFIG, "offload_config": {"layer_offload_fraction": 0.5}})

    assert launch(path, script) == 3
    assert list(Path(tempfile.gettempdir()).iterdir()) == []


@pytest.mark.parametrize(
    ("shell", "worker_sees"),
    [
        ({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True" if sys.platform == "linux" else None}),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}),
        (
            {"PYTORCH_ALLOC_CONF": "backend:native"},
            {"PYTORCH_CUDA_ALLOC_CONF": None, "PYTORCH_ALLOC_CONF": "backend:native"},
        ),
    ],
    ids=["unset", "cuda-variable-set", "general-variable-set"],
)
def test_workers_get_expandable_segments_unless_the_shell_configures_the_allocator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shell: dict[str, str], worker_sees: dict[str, str | None]
) -> None:
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in shell.items():
        monkeypatch.setenv(name, value)
    seen = tmp_path / "seen.json"
    script = tmp_path / "allocator.py"
    script.write_text(
        "import json, os, sys\n"
        f"json.dump({{k: os.environ.get(k) for k in {list(ALLOCATOR_VARIABLES)!r}}}, open(sys.argv[1], 'w'))\n",
        encoding="utf-8",
    )
    path = write_yaml(tmp_path / "config.yaml", {**CPU_CONFIG, "offload_config": {"layer_offload_fraction": 0.5}})

    assert launch(path, script, seen) == 0
    observed = json.loads(seen.read_text())
    assert {name: observed[name] for name in worker_sees} == worker_sees
    assert {name: os.environ.get(name) for name in ALLOCATOR_VARIABLES} == {
        name: shell.get(name) for name in ALLOCATOR_VARIABLES
    }, "the launcher's own environment is left as it was"


def test_accelerate_offload_launch_end_to_end(tmp_path: Path) -> None:
    """The config's section arrives in the worker; shell variables fill in what it leaves out, and lose to it."""
    config_path = tmp_path / "offload.yaml"
    assert (
        run_cli(
            "config",
            "--config_file",
            config_path,
            "--cpu",
            "--layer_offload_fraction",
            "0.75",
            "--prefetch_blocks",
            "2",
        ).returncode
        == 0
    )
    report_path = tmp_path / "report.json"

    command = launch_command(REPORT_SCRIPT, report_path, launcher="accelerate-offload", config_file=config_path)
    env = environment(ACCELERATE_OFFLOAD_PREFETCH_BLOCKS="5", ACCELERATE_OFFLOAD_BLOCK_NAMES="blocks")

    result = run(command, ROOT, env)

    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["settings"]["layer_offload_fraction"] == 0.75
    assert report["settings"]["prefetch_blocks"] == 2
    assert report["settings"]["block_names"] == ["blocks"]
    assert report["settings"]["gradient_checkpointing"] is True
    assert (report["device"], report["mixed_precision"]) == ("cpu", "no")
    assert "overrides 5 from the environment" in result.stderr


def test_offload_section_in_accelerates_default_config(tmp_path: Path) -> None:
    """Without --config_file, the section is taken from the default config file that accelerate would read."""
    default_config = tmp_path / "hf-home" / "accelerate" / "default_config.yaml"
    default_config.parent.mkdir(parents=True)
    write_yaml(default_config, {**CPU_CONFIG, "offload_config": {"layer_offload_fraction": 0.5}})
    report_path = tmp_path / "report.json"

    result = run_cli("launch", REPORT_SCRIPT, report_path, env={"HF_HOME": str(tmp_path / "hf-home")})

    assert result.returncode == 0, result.stderr
    assert json.loads(report_path.read_text(encoding="utf-8"))["settings"]["layer_offload_fraction"] == 0.5
    assert "offload_config" in default_config.read_text(encoding="utf-8")


def test_plain_accelerate_launch_with_environment_variables(tmp_path: Path) -> None:
    config_path = write_yaml(tmp_path / "accelerate.yaml", CPU_CONFIG)
    report_path = tmp_path / "report.json"
    command = launch_command(REPORT_SCRIPT, report_path, launcher="accelerate", config_file=config_path)
    env = environment(
        ACCELERATE_OFFLOAD_LAYER_OFFLOAD_FRACTION="1",
        ACCELERATE_OFFLOAD_ACTIVATION_OFFLOADING="true",
        ACCELERATE_OFFLOAD_PIN_MEMORY="false",
        ACCELERATE_OFFLOAD_ASYNC_OFFLOADING="false",
    )

    result = run(command, ROOT, env)

    assert result.returncode == 0, result.stderr
    settings = json.loads(report_path.read_text(encoding="utf-8"))["settings"]
    assert settings["layer_offload_fraction"] == 1.0
    assert settings["activation_offloading"] is True
    assert settings["pin_memory"] is False
    assert settings["gradient_checkpointing"] is True


def test_bad_value_fails_end_to_end_with_one_line(tmp_path: Path) -> None:
    config_path = write_yaml(tmp_path / "bad.yaml", {**CPU_CONFIG, "offload_config": {"layer_offload_fraction": 1.5}})
    report_path = tmp_path / "report.json"
    command = launch_command(REPORT_SCRIPT, report_path, launcher="accelerate-offload", config_file=config_path)

    result = run(command, ROOT)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "accelerate-offload: ERROR: layer_offload_fraction must be in 0..1, got 1.5"
    ]
    assert not report_path.exists()


def test_sigterm_to_the_launcher_reaches_the_worker_which_saves(tmp_path: Path) -> None:
    import signal
    import time

    marker = tmp_path / "marker.txt"
    script = Path(__file__).parent / "scripts" / "wait_for_sigterm.py"
    launcher = start(launch_command(script, marker, launcher="accelerate-offload"), ROOT, subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not marker.with_suffix(".ready").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=60)
    assert marker.read_text() == "saved", output
    assert launcher.returncode == 143, output
    assert "Traceback" not in output
