"""Runs the real gfpgan-serve process (flags, signals, drain) around the fake pipeline.

FAKE_DELAY_S: the fake's seconds per batch; FAKE_WARMUP_S: how long its warm-up takes;
FAKE_LOAD_ERROR: the pipeline fails to load with this message; FAKE_OUT_OF_MEMORY_ABOVE: batches
of more faces run out of device memory; FAKE_WINDOWS_LOOP=1: the event loop has no
add_signal_handler, as on Windows. The process keeps no copy of
the faces it sees (scripts/soak.py measures its memory).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.app import configure_logging, run_process  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.fakes import FakePipeline  # noqa: E402


def fake_factory(settings: Settings) -> FakePipeline:
    error = os.environ.get("FAKE_LOAD_ERROR")
    if error:
        raise FileNotFoundError(error)
    warmup_s = float(os.environ.get("FAKE_WARMUP_S", "0"))
    gate = None
    if warmup_s:
        gate = threading.Event()
        timer = threading.Timer(warmup_s, gate.set)
        timer.daemon = True  # a stop during warm-up must not wait for it
        timer.start()
    above = os.environ.get("FAKE_OUT_OF_MEMORY_ABOVE")
    return FakePipeline(delay_s=float(os.environ.get("FAKE_DELAY_S", "0")), warmup_gate=gate,
                        record_faces=False, out_of_memory_above=int(above) if above else None)


if __name__ == "__main__":
    if os.environ.get("FAKE_WINDOWS_LOOP"):
        import asyncio

        # Windows' loops (Proactor and Selector) keep BaseEventLoop's: NotImplementedError
        asyncio.SelectorEventLoop.add_signal_handler = asyncio.BaseEventLoop.add_signal_handler
        asyncio.SelectorEventLoop.remove_signal_handler = asyncio.BaseEventLoop.remove_signal_handler
    settings = Settings.from_args()
    configure_logging(settings.log_level)
    run_process(settings, fake_factory)
