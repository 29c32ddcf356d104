#!/opt/venv/bin/python
"""Fetch and SHA-256-check the weights into GFPGAN_WEIGHTS_DIR, then exit (Kubernetes init container).

Same files, URLs and checks as gfpgan-serve's first start (server.weights.ensure_weights), read
from the same GFPGAN_* variables: the default restorer (GFPGAN_MODEL), the other resident ones
(GFPGAN_MODELS) and the background upsampler (GFPGAN_BG_UPSAMPLER).
"""
import os
import sys

from server.settings import Settings
from server.weights import WeightsError, ensure_weights, known_hash_warning, sha256_file


def main() -> int:
    environ = {"GFPGAN_WEIGHTS_DIR": "/weights", **os.environ}
    settings = Settings.from_args([], environ)
    extra = [m for m in settings.models.split(",") if m] + ([settings.bg_upsampler] if settings.bg_upsampler else [])
    try:
        paths = ensure_weights(settings.model, settings.weights_dir, extra_models=extra)
    except WeightsError as error:
        print(f"gfpgan-fetch-weights: {error}", file=sys.stderr)
        return 1
    for path in (paths.gfpgan, paths.detection, paths.parsing, *paths.extra_models):
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
