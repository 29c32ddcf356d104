"""server.bench_plan with a stand-in report, for the GPU check's tests (tests/test_gpu_check.py):
the same command line, files and exit statuses, and a section's first argument says what its
report does, fast and without a network:

    ok           prints a table row of 100 faces/s at batch 8
    sleep        takes 1.5 s, then as ok
    hang         sleeps far past any time limit
    lose-device  raises a CUDA error (the device is unusable: the process ends with status 3)
    crash        the process dies at once, status 9
"""
from __future__ import annotations

import os
import sys
import time

from server.bench_plan import main


def report(args: list[str], loaded) -> None:
    what = args[0]
    if what == "hang":
        time.sleep(600)
    elif what == "lose-device":
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    elif what == "crash":
        os._exit(9)
    elif what == "sleep":
        time.sleep(1.5)
    print("| FacePipeline, in-process | 8 | 100.00 | - | 80.0 | 80.0 | 81.0 | 81.0 |")


if __name__ == "__main__":
    sys.exit(main(report=report))
