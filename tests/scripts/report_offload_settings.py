"""Writes the offload settings a launched worker sees to a JSON file, for the launcher tests.

Usage: report_offload_settings.py OUTPUT.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from accelerate import Accelerator

from accelerate_offload import LayerOffloadPlugin


def main() -> None:
    accelerator = Accelerator()
    plugin = LayerOffloadPlugin()
    report = {
        "settings": dataclasses.asdict(plugin),
        "mixed_precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
        "num_processes": accelerator.num_processes,
        "environment": {key: value for key, value in os.environ.items() if key.startswith("ACCELERATE_OFFLOAD_")},
    }
    with open(sys.argv[1], "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
