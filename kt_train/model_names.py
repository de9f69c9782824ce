"""The model names timm and open_clip know, as JSON, for the API (which cannot import them).

    python -m kt_train.model_names > service/model_names.json

``service/model_specs.py`` checks a request's model spec against the committed file: an
architecture must be one timm (or open_clip) builds, a pretrained tag one it lists for that
architecture. The file records the library versions it was made with;
``tests/kt_train/test_model_names.py`` fails when it no longer matches the installed ones.
"""

from __future__ import annotations

import json
import sys
from typing import Any

GENERATOR = "python -m kt_train.model_names > service/model_names.json"


def model_names() -> dict[str, Any]:
    """``{"versions", "timm": {"models", "pretrained"}, "open_clip": {"models", "pretrained"}}``;
    ``pretrained`` maps an architecture to its sorted tags. Deterministic (sorted throughout)."""
    import open_clip
    import timm

    timm_tags: dict[str, list[str]] = {}
    for full in timm.list_pretrained():
        arch, _, tag = str(full).partition(".")
        if tag:
            timm_tags.setdefault(arch, []).append(tag)
    clip_tags: dict[str, list[str]] = {}
    for arch, tag in open_clip.list_pretrained():
        clip_tags.setdefault(str(arch), []).append(str(tag))
    return {
        "generated_by": GENERATOR,
        "versions": {"timm": timm.__version__, "open_clip": open_clip.__version__},
        "timm": {
            "models": sorted(str(m) for m in timm.list_models()),
            "pretrained": {arch: sorted(set(tags)) for arch, tags in sorted(timm_tags.items())},
        },
        "open_clip": {
            "models": sorted(str(m) for m in open_clip.list_models()),
            "pretrained": {arch: sorted(set(tags)) for arch, tags in sorted(clip_tags.items())},
        },
    }


def dumps(names: dict[str, Any]) -> str:
    return json.dumps(names, indent=1, sort_keys=True) + "\n"


def main() -> None:
    sys.stdout.write(dumps(model_names()))


if __name__ == "__main__":
    main()
