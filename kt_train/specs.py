"""Model specs: one string names a model and where its weights come from, everywhere.

    timm:<name>[@<pretrained tag | path to .safetensors/.pt/.pth/.bin>]
    timm:hf-hub:<org>/<repo>[@<revision>]      a timm model on the Hugging Face Hub (timm's own
                                               ``hf-hub:`` ids; weights from the local HF cache offline)
    open_clip:<arch>[@<pretrained tag | path>]

Without ``@`` a timm name that carries a tag (``vit_small_patch14_dinov2.lvd142m``) means those
pretrained weights; a bare name means random init (what tests and from-scratch students use).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelSpecError

LIBRARIES = ("timm", "open_clip")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HF_HUB = "hf-hub:"
HF_HUB_ALIASES = ("hf-hub:", "hf_hub:")  # timm reads both (hf_hub: is its older spelling)
# a Hub repo id (``org/name``, each part at most 96 of letters, digits, ``.``, ``_``, ``-``) and a
# revision (a branch, tag or commit); neither may hold ``..`` or more slashes
HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
HF_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def hf_hub_problem(repo_id: str, revision: str | None) -> str | None:
    """What is wrong with a Hub id (``None``: nothing), in words that end a sentence."""
    if not repo_id:
        return "names no repository after 'hf-hub:'; write 'timm:hf-hub:<org>/<name>'"
    if "/" not in repo_id:
        return (
            f"needs the repository as <org>/<name>, e.g. 'timm:hf-hub:timm/{repo_id}' "
            "(timm's own weights are under the org 'timm')"
        )
    if not HF_REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        return (
            f"{repo_id!r} is not a Hugging Face repository id: one '/' between <org> and <name>, each of "
            "letters, digits, '.', '_' and '-' (no '..')"
        )
    if revision is not None and (not HF_REVISION.fullmatch(revision) or ".." in revision):
        return (
            f"{revision!r} is not a revision: after '@' give a branch, tag or commit of letters, digits, "
            "'.', '_' and '-' (not a file; the weights come from the Hub repository)"
        )
    return None


@dataclass(frozen=True)
class ModelSpec:
    library: str
    name: str
    weights: str | None = None  # a pretrained tag or a local file path

    @classmethod
    def parse(cls, spec: str | ModelSpec) -> ModelSpec:
        if isinstance(spec, ModelSpec):
            return spec
        if not isinstance(spec, str) or ":" not in spec:
            raise ModelSpecError(
                f"model spec {spec!r} has no library prefix; write 'timm:<name>[@tag|path]' "
                f"or 'open_clip:<arch>[@tag|path]', e.g. 'timm:resnet18' or 'open_clip:ViT-B-32@openai'"
            )
        library, rest = spec.split(":", 1)
        library = library.strip().lower().replace("-", "_")
        if library in ("hf_hub", "hf"):
            raise ModelSpecError(
                f"model spec {spec!r}: Hugging Face Hub models are timm models here; did you mean "
                f"'timm:hf-hub:{rest}'?"
            )
        if library not in LIBRARIES:
            raise ModelSpecError(
                f"model spec {spec!r}: unknown library {library!r}; use one of {', '.join(LIBRARIES)}"
            )
        name, _, tag_or_path = rest.partition("@")
        name = name.strip()
        if not name:
            raise ModelSpecError(f"model spec {spec!r} names no model after '{library}:'")
        weights = tag_or_path.strip() or None
        if name.lower().startswith(HF_HUB_ALIASES):
            if library != "timm":
                raise ModelSpecError(
                    f"model spec {spec!r}: 'hf-hub:' ids are for timm models; write 'timm:{name}'"
                )
            repo_id = name[len(HF_HUB) :]
            problem = hf_hub_problem(repo_id, weights)
            if problem is not None:
                raise ModelSpecError(f"model spec {spec!r}: {problem}")
            name = HF_HUB + repo_id
        return cls(library, name, weights)

    @property
    def hf_hub_id(self) -> str | None:
        """``org/name`` of a ``timm:hf-hub:org/name[@revision]`` spec (``weights`` is then the revision)."""
        return self.name[len(HF_HUB) :] if self.name.startswith(HF_HUB) else None

    @property
    def timm_name(self) -> str:
        """What ``timm.create_model`` takes for this spec's architecture and pretrained weights:
        ``hf-hub:org/name[@revision]``, ``name.tag`` or ``name``."""
        if self.hf_hub_id is not None:
            return self.name + (f"@{self.weights}" if self.weights else "")
        tag = self.pretrained_tag
        return f"{self.name}.{tag}" if tag else self.name

    @property
    def weights_path(self) -> Path | None:
        """The weights as a local file, when the part after '@' is a path rather than a tag."""
        if self.weights is None or self.hf_hub_id is not None:  # a Hub spec's @ is its revision
            return None
        w = self.weights
        if "/" in w or "\\" in w or w.endswith(WEIGHT_SUFFIXES) or w.startswith(("~", ".")):
            return Path(w).expanduser()
        return None

    @property
    def pretrained_tag(self) -> str | None:
        return self.weights if self.weights is not None and self.weights_path is None else None

    def __str__(self) -> str:
        return f"{self.library}:{self.name}" + (f"@{self.weights}" if self.weights else "")
