"""A stand-in training worker: on SIGTERM it 'saves' (writes a marker) and exits with 128 + 15."""

import signal
import sys
import time
from pathlib import Path

marker = Path(sys.argv[1])


def save_and_exit(signum: int, frame: object) -> None:
    marker.write_text("saved")
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, save_and_exit)
marker.with_suffix(".ready").write_text("ready")
time.sleep(120)
