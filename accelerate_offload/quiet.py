"""Quiets the notes that dependencies log while they import, which say nothing about the user's run.

The project's entry points call `quiet_third_party_noise()` before anything heavy is imported: each note is
silenced at the logger that emits it, so every other message of those libraries still reaches the user.
"""

from __future__ import annotations

import logging

# Logger name -> why its import-time notes are noise for a training run.
IMPORT_NOISE_LOGGERS = {
    # bitsandbytes looks for an optional CPU kernel for 4-bit matmuls on import; the project uses its 8-bit Adam.
    "bitsandbytes.backends.cpu.ops": "optional CPU 4-bit kernel not installed",
    # transformers notes that image processors fall back to their PIL backend without torchvision; they work.
    "transformers.utils.import_utils": "image processors use PIL without torchvision",
}


def quiet_third_party_noise() -> None:
    """Raises the known noisy import-time loggers to ERROR; their errors still show."""
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
