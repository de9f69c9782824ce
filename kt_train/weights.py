"""Does a safetensors weights file fit a timm architecture? The check an operator's registration
runs (``kt admin register-model``), in a subprocess, since the API process never imports torch:

    python -m kt_train.weights mobilenetv2_100 w.safetensors --kwargs '{"pad_type": "same"}'

It builds the architecture with the card's ``create_model_kwargs`` (random init, nothing
downloaded) and compares tensor names and shapes with the file's header (no tensor is loaded).
The classifier, the keys timm names in ``pretrained_cfg["classifier"]`` (``fc`` for a ResNet,
``head`` for a ViT), may differ in shape or be absent: a teacher gets a new task head, so
weights trained for another number of classes are usable. Anything else that is missing,
unexpected or of another shape is a problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# At most this many keys of each kind are named in a problem (the count says how many there are).
MAX_LISTED = 5


def classifier_prefixes(net: Any) -> tuple[str, ...]:
    """``("fc.",)``-style prefixes of the classifier keys of a timm model (its ``pretrained_cfg``)."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{name}." for name in names if name)


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the file's header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def check_weights(arch: str, kwargs: dict[str, Any], path: str | Path) -> list[str]:
    """What keeps ``path`` from loading into ``timm.create_model(arch, **kwargs)``; [] when it fits
    (up to the classifier, see the module docstring)."""
    import timm

    if not timm.is_model(arch):
        return [f"timm has no architecture {arch!r}; name one that timm.list_models() lists"]
    try:
        net = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as err:
        return [
            f"timm.create_model({arch!r}, **{kwargs!r}) fails ({type(err).__name__}: {err}); "
            "fix create_model_kwargs in the card"
        ]
    own = {key: tuple(value.shape) for key, value in net.state_dict().items()}
    try:
        theirs = safetensors_shapes(path)
    except Exception as err:  # safetensors raises its own error types for a malformed file
        return [f"{path} is not a readable safetensors file ({type(err).__name__}: {err})"]
    head = classifier_prefixes(net)

    def body(key: str) -> bool:
        return not (head and key.startswith(head))

    missing = sorted(k for k in own if k not in theirs and body(k))
    unexpected = sorted(k for k in theirs if k not in own and body(k))
    mismatched = [
        f"{k} {list(theirs[k])} (the architecture has {list(own[k])})"
        for k in sorted(own)
        if k in theirs and theirs[k] != own[k] and body(k)
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of another shape: {_listed(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) of {arch} missing from the file: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) {arch} does not have: {_listed(unexpected)}")
    if problems:
        problems.append(
            f"the weights are not a {arch} built with {kwargs or 'default arguments'}: check the "
            "architecture and the card's create_model_kwargs (the classifier "
            f"{', '.join(p.rstrip('.') for p in head) or '(none)'} may differ)"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kt_train.weights",
        description="Check that a safetensors file fits a timm architecture.",
    )
    parser.add_argument("arch", help="timm architecture, e.g. mobilenetv2_100")
    parser.add_argument("path", type=Path, help="the .safetensors weights file")
    parser.add_argument("--kwargs", default="{}", help="timm.create_model keyword arguments as JSON")
    parser.add_argument("--json", action="store_true", help='print {"problems": [...]} instead of lines')
    args = parser.parse_args(argv)
    kwargs = json.loads(args.kwargs)
    if not isinstance(kwargs, dict):
        parser.error("--kwargs must be a JSON object")
    problems = check_weights(args.arch, kwargs, args.path)
    if args.json:
        print(json.dumps({"problems": problems}))
    else:
        print("\n".join(problems) if problems else f"ok: {args.path} fits {args.arch}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
