#!/opt/venv/bin/python
"""Fetch and SHA-256-check the weights into GFPGAN_WEIGHTS_DIR, then exit (Kubernetes init container).

Same files, URLs and checks as gfpgan-serve's first start (server.weights.ensure_weights).
"""
import os
import sys

from server.weights import WeightsError, ensure_weights, known_hash_warning, sha256_file


def main() -> int:
    weights_dir = os.environ.get("GFPGAN_WEIGHTS_DIR", "/weights")
    model = os.environ.get("GFPGAN_MODEL") or os.path.join(weights_dir, "GFPGANv1.4.pth")
    try:
        paths = ensure_weights(model, weights_dir)
    except WeightsError as error:
        print(f"gfpgan-fetch-weights: {error}", file=sys.stderr)
        return 1
    for path in (paths.gfpgan, paths.detection, paths.parsing):
        # Downloads were checked above; a file put in the volume by hand is only warned about,
        # as gfpgan-serve does (it may be a deliberate fine-tune under the same name).
        digest = sha256_file(path)
        warning = known_hash_warning(path, digest)
        if warning:
            print(f"gfpgan-fetch-weights: {warning}", file=sys.stderr)
        else:
            print(f"ready: {path} sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
