"""The README's tiny jobs, run as written: no warnings in their output, and outputs other users can read."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOISE = re.compile(r"warning|deprecated|failed to load", re.IGNORECASE)  # logging's WARNING lines too
# Lines of that shape that the project cannot influence, each with why. Empty: every one so far had a cause here.
UNAVOIDABLE: dict[str, str] = {}

pytestmark = pytest.mark.timeout(600)


def readme_block(heading: str) -> str:
    """The first ```bash block after `heading` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return section[section.index("```bash\n") + len("```bash\n") : section.index("\n```", section.index("```bash"))]


def commands_of(block: str) -> list[list[str]]:
    """The block's commands without the `pip install` step, with the repository's files by absolute path."""
    lines = block.replace("\\\n", " ").splitlines()
    commands = [part for line in lines for part in line.split(" && ") if part.strip()]
    commands = [shlex.split(command) for command in commands if not command.startswith("pip install")]
    for words in commands:
        for index, word in enumerate(words):
            if (REPO / word).exists() and ("/" in word or word.endswith(".py")):
                words[index] = str(REPO / word)
    return commands


def run_quietly(words: list[str], cwd: Path) -> str:
    """Runs one README command in `cwd`, offline, and returns its stderr after checking it succeeded."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_OFFLOAD_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"), PYTHONPATH=str(REPO))
    env.pop("OMP_NUM_THREADS", None)  # accelerate's thread notice appears only without it
    if words[0] == "python":
        words = [sys.executable, *words[1:]]
    elif words[0] == "accelerate-offload":
        words = [sys.executable, "-m", "accelerate_offload.cli", *words[1:]]
    result = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, f"{shlex.join(words)} failed:\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def noisy_lines(output: str) -> list[str]:
    lines = [line for chunk in output.splitlines() for line in chunk.split("\r")]
    return [line for line in lines if NOISE.search(line) and not any(name in line for name in UNAVOIDABLE)]


def assert_default_mode(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, f"{path} has mode {oct(path.stat().st_mode)}"


def test_readme_main_job_is_quiet_and_readable(tmp_path: Path) -> None:
    commands = commands_of(readme_block("## Quick start"))
    assert len(commands) == 3, commands  # two builders and the launch
    commands[-1] += ["--checkpointing_steps", "10"]
    output = "".join(run_quietly(words, tmp_path) for words in commands)

    assert noisy_lines(output) == []
    out = tmp_path / "output-tiny-lora"
    assert (out / "final-0.png").is_file()
    for path in [out / "pytorch_lora_weights.safetensors", *(out / "checkpoint-10").rglob("*")]:
        assert_default_mode(path)
    for path in [out / "README.md", *(out / "validation").iterdir()]:
        assert_default_mode(path)


def test_readme_sd3_flow_is_quiet_and_readable(tmp_path: Path) -> None:
    commands = commands_of(readme_block("## SD3 DreamBooth LoRA in two steps"))
    assert [words[-1] for words in commands[:2]] == ["tiny-sd3", "--captions"]
    output = "".join(run_quietly(words, tmp_path) for words in commands)

    assert noisy_lines(output) == []
    out = tmp_path / "output-tiny-sd3-lora"
    for path in [out / "pytorch_lora_weights.safetensors", *(out / "checkpoint-10").rglob("*")]:
        assert_default_mode(path)


def test_launcher_checks_the_config_before_importing_model_libraries() -> None:
    code = (
        "import sys; import accelerate_offload.cli; "
        "print(sorted(m for m in ('diffusers', 'peft', 'transformers', 'bitsandbytes') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
