"""The model specs a request may name, checked without torch, timm or open_clip.

    timm:<name>                      a timm architecture, random init (``timm:resnet10t``)
    timm:<name>.<tag> / <name>@<tag> pretrained weights timm lists (``timm:resnet18.a1_in1k``)
    open_clip:<arch>[@<tag>]         an open_clip architecture and a tag it lists for it
    timm:<arch>@registered:<NAME>    weights an operator registered (``kt admin register-model``)
    timm:hf-hub:<org>/<name>[@<rev>] a timm model on the Hugging Face Hub (the worker fetches it,
                                     or finds it in its Hugging Face cache); only its form is checked

Names are checked against ``service/model_names.json`` (``python -m kt_train.model_names``
writes it from the installed libraries). Nothing after ``@`` is ever a path: a tag that looks
like one (``/``, ``\\``, ``..``, a file suffix) is refused with how to register the file instead.
A registered spec is only parsed here; ``service.registry`` resolves it for the caller's tenant.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from kt_train.specs import HF_HUB, HF_HUB_ALIASES, hf_hub_problem

NAMES_FILE = Path(__file__).with_name("model_names.json")
LIBRARIES = ("timm", "open_clip")
REGISTERED = "registered:"
REGISTERED_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*(\.[A-Za-z0-9][A-Za-z0-9_\-]*)?")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
# Suffixes of files (weights and otherwise) that a tag is mistaken for; no pretrained tag has a dot.
FILE_SUFFIXES = (
    ".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npz", ".npy", ".h5", ".onnx",
    ".tflite", ".gguf", ".json", ".yaml", ".yml", ".txt", ".csv", ".zip", ".tar", ".gz", ".cfg", ".conf",
    ".key", ".pem", ".env", ".db", ".py", ".sh",
)  # fmt: skip
REGISTER_HOWTO = (
    "to use your own weights, ask an operator to register the file (`kt admin register-model NAME PATH`) "
    "and name it as 'timm:<arch>@registered:NAME' (`GET /v1/registered-models` lists them)"
)

TIMM_FIX = "use an architecture that timm.list_models() lists"

Role = Literal["teacher", "student", "encoder"]


@dataclass(frozen=True)
class KnownNames:
    """What ``model_names.json`` lists: architectures and, per architecture, pretrained tags."""

    versions: dict[str, str]
    models: dict[str, tuple[str, ...]]  # library -> sorted architectures
    pretrained: dict[str, dict[str, tuple[str, ...]]]  # library -> architecture -> tags


@lru_cache(maxsize=1)
def known_names() -> KnownNames:
    doc = json.loads(NAMES_FILE.read_text())
    return KnownNames(
        versions=dict(doc["versions"]),
        models={lib: tuple(doc[lib]["models"]) for lib in LIBRARIES},
        pretrained={
            lib: {arch: tuple(tags) for arch, tags in doc[lib]["pretrained"].items()} for lib in LIBRARIES
        },
    )


@dataclass(frozen=True)
class RegisteredRef:
    """``timm:<arch>@registered:<name>``: a registered model, and the architecture the spec claims."""

    arch: str
    name: str


def registered_ref(spec: str) -> RegisteredRef | None:
    """The registered model a (valid) spec names, or None for any other spec."""
    library, _, rest = spec.partition(":")
    arch, _, tag = rest.partition("@")
    if library != "timm" or not tag.startswith(REGISTERED):
        return None
    return RegisteredRef(arch=arch, name=tag[len(REGISTERED) :])


def looks_like_path(text: str) -> bool:
    """A tag or name that is a path or a file name, not a pretrained tag."""
    lowered = text.lower()
    return (
        "/" in text
        or "\\" in text
        or ".." in text
        or text.startswith(("~", "."))
        or lowered.endswith(FILE_SUFFIXES)
    )


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str], fix: str) -> str:
    """ "; did you mean a (or b, c)? <fix>" with the closest of ``choices``, else "; <fix>"."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not close:
        return f"; {fix}"
    others = f" (or {', '.join(close[1:])})" if len(close) > 1 else ""
    return f"; did you mean {close[0]}{others}? Else {fix}"


def _path_refusal(spec: str, part: str) -> ValueError:
    return ValueError(
        f"model spec {spec!r}: {part!r} looks like a file path, and the service never opens a path named "
        f"in a request; use a pretrained tag (e.g. 'timm:resnet18.a1_in1k', 'open_clip:ViT-B-32@openai'), "
        f"or, {REGISTER_HOWTO}"
    )


def _tag_list(tags: tuple[str, ...]) -> str:
    shown = ", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "")
    if not tags:
        return "it has no pretrained tags: remove the tag for random init"
    return f"use one of its tags ({shown}), or remove the tag for random init"


def _check_timm(spec: str, name: str, tag: str | None) -> None:
    names = known_names()
    base, _, inner = name.partition(".")
    if inner and tag is not None:
        raise ValueError(
            f"model spec {spec!r} gives two pretrained tags ({inner!r} and {tag!r}); "
            f"write 'timm:{base}.{inner}' or 'timm:{base}@{tag}'"
        )
    if base not in names.models["timm"]:
        if inner and looks_like_path(name):
            raise _path_refusal(spec, name)
        hint = _did_you_mean(base, names.models["timm"], TIMM_FIX)
        raise ValueError(f"model spec {spec!r}: timm has no architecture {base!r}{hint}")
    tag = inner or tag
    if tag is None:
        return  # an architecture alone: random init
    tags = names.pretrained["timm"].get(base, ())
    if tag not in tags:
        if looks_like_path(tag):
            raise _path_refusal(spec, tag)
        hint = _did_you_mean(tag, tags, _tag_list(tags))
        raise ValueError(f"model spec {spec!r}: timm lists no pretrained tag {tag!r} for {base}{hint}")


def _clip_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # how open_clip itself matches a tag


def _check_open_clip(spec: str, arch: str, tag: str | None) -> None:
    names = known_names()
    if arch not in names.models["open_clip"]:
        if looks_like_path(arch):
            raise _path_refusal(spec, arch)
        hint = _did_you_mean(
            arch, names.models["open_clip"], "use an architecture that open_clip.list_models() lists"
        )
        raise ValueError(f"model spec {spec!r}: open_clip has no architecture {arch!r}{hint}")
    if tag is None:
        return
    tags = names.pretrained["open_clip"].get(arch, ())
    if _clip_tag(tag) not in {_clip_tag(t) for t in tags}:
        hint = _did_you_mean(tag, tags, _tag_list(tags))
        raise ValueError(f"model spec {spec!r}: open_clip lists no pretrained tag {tag!r} for {arch}{hint}")


def check_model_spec(spec: str, role: Role) -> str:
    """``spec`` if a ``role`` model may be named by it, else ``ValueError`` saying what to write.
    Students are timm models with a pretrained tag or none; teachers and gallery encoders may
    also be open_clip models or registered ones."""
    forms = (
        "'timm:<name>[@tag]' (e.g. 'timm:resnet18')"
        if role == "student"
        else "'timm:<name>[@tag]' or 'open_clip:<arch>[@tag]' "
        "(e.g. 'timm:vit_small_patch14_dinov2.lvd142m', 'open_clip:ViT-B-32@openai')"
    )
    label = "student spec" if role == "student" else "model spec"
    library, colon, rest = spec.partition(":")
    hub_like = _hub_misspelling(library, rest)
    if hub_like is not None:
        raise ValueError(
            f"{label} {spec!r}: did you mean {hub_like!r}? Use 'timm:hf-hub:<org>/<name>' for Hub models"
        )
    if not colon or library not in LIBRARIES or (role == "student" and library != "timm"):
        raise ValueError(f"{label} {spec!r} is not of the form {forms}")
    name, at, tag = rest.partition("@")
    if name.lower().startswith(HF_HUB_ALIASES):
        if library != "timm":
            raise ValueError(f"{label} {spec!r}: 'hf-hub:' ids are for timm models; write 'timm:{rest}'")
        if at and not tag:
            raise ValueError(
                f"{label} {spec!r} names no revision after '@'; drop the '@' (the default branch)"
            )
        problem = hf_hub_problem(name[len(HF_HUB) :], tag or None)
        if problem is not None:
            raise ValueError(f"{label} {spec!r}: {problem}")
        return spec
    if at and not tag:
        raise ValueError(
            f"model spec {spec!r} names no tag after '@'; drop the '@' (random init) or add a pretrained tag"
        )
    if tag.startswith(REGISTERED):
        _check_registered(spec, role, library, name, tag[len(REGISTERED) :])
        return spec
    for part in (name, tag):
        if part and looks_like_path(part) and not _NAME.fullmatch(part):
            raise _path_refusal(spec, part)
    if not _NAME.fullmatch(name) or (at and not _TAG.fullmatch(tag)):
        if at and looks_like_path(tag):
            raise _path_refusal(spec, tag)
        raise ValueError(
            f"{label} {spec!r} is not of the form {forms}: names and tags are letters, digits, '_' and '-'"
        )
    if library == "timm":
        _check_timm(spec, name, tag or None)
    else:
        _check_open_clip(spec, name, tag or None)
    return spec


_HUB_MISSPELLINGS = ("hf", "hf_hub", "hf-hub", "hub", "huggingface", "hugging_face", "hugging-face")


def _hub_misspelling(library: str, rest: str) -> str | None:
    """The ``timm:hf-hub:...`` spec a near miss meant (``hf-hub:org/x``, ``timm:huggingface:org/x``,
    ``timm:hf-hub/org/x``), or None."""
    if library.lower() in _HUB_MISSPELLINGS and "/" in rest:
        return f"timm:{HF_HUB}{rest.removeprefix('//')}"
    if library == "timm":
        prefix, sep, repo = rest.partition(":")
        if sep and prefix.lower() in _HUB_MISSPELLINGS and f"{prefix}:" not in HF_HUB_ALIASES:
            return f"timm:{HF_HUB}{repo.removeprefix('//')}"
        for miss in ("hf-hub/", "hf_hub/", "huggingface/", "hf/"):
            if rest.lower().startswith(miss) and rest.count("/") >= 2:
                return f"timm:{HF_HUB}{rest[len(miss) :]}"
    return None


def _check_registered(spec: str, role: Role, library: str, arch: str, name: str) -> None:
    if role == "student":
        raise ValueError(
            f"student spec {spec!r}: registered models can be teachers and gallery encoders only; "
            "name a timm architecture for the student (e.g. 'timm:resnet18')"
        )
    if library != "timm":
        raise ValueError(
            f"model spec {spec!r}: registered models are timm architectures; write 'timm:<arch>@registered:{name}'"
        )
    if not re.fullmatch(REGISTERED_NAME_PATTERN, name):
        raise ValueError(
            f"model spec {spec!r}: {name!r} is not a registered model name (lowercase letters, digits, "
            "'.', '_', '-', at most 64); `GET /v1/registered-models` lists the ones you may use"
        )
    if arch not in known_names().models["timm"]:
        hint = _did_you_mean(arch, known_names().models["timm"], TIMM_FIX)
        raise ValueError(f"model spec {spec!r}: timm has no architecture {arch!r}{hint}")
