"""The real pipeline and batcher in a process whose memory is capped (Linux): a child of
tests/test_out_of_memory.py, since a cap on the address space holds for the whole process.

    python -m tests.capped_memory WEIGHTS_DIR  ->  one line of JSON on stdout

Two faces each run alone, and then together, unconstrained, give what one face and two faces
take at their peak (VmPeak, the address space's high-water mark); the address space is then
capped halfway between, and the batcher is given both faces at once. The batch of two runs out
of memory in the CPU allocator, wherever in the pass it happens to; the faces must come back
as each came alone.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

from contract.types import EnhanceOptions
from server.jobs import Job
from server.pipeline import FacePipeline
from tests.faces import make_faces
from tests.helpers import enhance_through_batcher
from tests.test_pipeline import load_nets


def _vm(key: str) -> int:
    """/proc/self/status's VmSize (the address space now) or VmPeak (its high-water mark), bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def main() -> None:
    gfpgan, detector, parser = load_nets(Path(sys.argv[1]))
    pipeline = FacePipeline(gfpgan, detector, parser, device=torch.device("cpu"), dtype=torch.float32)
    faces, options = make_faces(2, seed=1), EnhanceOptions()
    before = _vm("VmSize")
    alone = [pipeline.enhance([Job(faces[i:i + 1], options)])[0] for i in range(2)]
    one = _vm("VmPeak") - before
    before = _vm("VmSize")
    pipeline.enhance([Job(faces, options)])
    two = _vm("VmPeak") - before
    cap = _vm("VmSize") + (one + two) // 2
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))

    result, ceiling = enhance_through_batcher(pipeline, faces, options, max_batch_faces=2)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps({
        "one_face_mb": one >> 20, "two_faces_mb": two >> 20, "ceiling": ceiling,
        "status": [int(s) for s in result.status],
        "expected_status": [int(s) for a in alone for s in a.status],
        "max_difference": int(np.abs(result.faces.astype(int)
                                     - np.concatenate([a.faces for a in alone])).max()),
    }))


if __name__ == "__main__":
    main()
