"""Write full-size, random-valued checkpoints of every restorer the service loads, under their
published file names, for benchmarks on a machine that cannot download the real ones:

    python scripts/random_weights.py DIR
    gfpgan-bench --weights-dir DIR --model gfpgan-1.4,gfpgan-1,restoreformer,codeformer \\
        --enable-codeformer --no-download ...

The architectures and sizes are the published ones, so the time per face is the real
networks'; the faces they produce mean nothing. CodeFormer's comes from codeformer-pip (the
dev install's reference), built at the published sizes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    import torch

    from tests.checkpoints import (build_gfpgan_v1, build_restoreformer, make_checkpoint, make_gfpgan_checkpoint,
                                   make_parsenet_checkpoint, make_retinaface_checkpoint)
    from tests.codeformer_reference import original_codeformer

    out = args.directory
    out.mkdir(parents=True, exist_ok=True)
    make_gfpgan_checkpoint(out / "GFPGANv1.4.pth", narrow=1.0)
    make_retinaface_checkpoint(out / "detection_Resnet50_Final.pth")
    make_parsenet_checkpoint(out / "parsing_parsenet.pth")
    make_checkpoint(out / "GFPGANv1.pth", build_gfpgan_v1(narrow=1.0))
    make_checkpoint(out / "RestoreFormer.pth", build_restoreformer(ch=64, n_embed=1024, embed_dim=256,
                                                                   z_channels=256))
    torch.manual_seed(0)
    make_checkpoint(out / "codeformer.pth", original_codeformer()().eval())
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
