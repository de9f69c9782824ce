"""Model specs: one string names a model and where its weights come from, everywhere.

    timm:<name>[@<pretrained tag | path to .safetensors/.pt/.pth/.bin>]
    open_clip:<arch>[@<pretrained tag | path>]

Without ``@`` a timm name that carries a tag (``vit_small_patch14_dinov2.lvd142m``) means those
pretrained weights; a bare name means random init (what tests and from-scratch students use).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelSpecError

LIBRARIES = ("timm", "open_clip")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


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
        if library not in LIBRARIES:
            raise ModelSpecError(
                f"model spec {spec!r}: unknown library {library!r}; use one of {', '.join(LIBRARIES)}"
            )
        name, _, tag_or_path = rest.partition("@")
        name = name.strip()
        if not name:
            raise ModelSpecError(f"model spec {spec!r} names no model after '{library}:'")
        return cls(library, name, tag_or_path.strip() or None)

    @property
    def weights_path(self) -> Path | None:
        """The weights as a local file, when the part after '@' is a path rather than a tag."""
        if self.weights is None:
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
