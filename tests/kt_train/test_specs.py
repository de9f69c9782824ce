"""Model spec strings: library, name, and whether the part after '@' is a pretrained tag or a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kt_train.errors import KTError, ModelSpecError
from kt_train.specs import ModelSpec


def test_bare_timm_name_is_random_init() -> None:
    s = ModelSpec.parse("timm:resnet18")
    assert (s.library, s.name, s.weights) == ("timm", "resnet18", None)
    assert s.weights_path is None
    assert s.pretrained_tag is None


def test_timm_name_with_tag() -> None:
    s = ModelSpec.parse("timm:vit_small_patch14_dinov2@lvd142m")
    assert (s.library, s.name, s.weights) == ("timm", "vit_small_patch14_dinov2", "lvd142m")
    assert s.pretrained_tag == "lvd142m"
    assert s.weights_path is None


def test_timm_name_with_dotted_tag_in_name_keeps_it() -> None:
    s = ModelSpec.parse("timm:vit_small_patch14_dinov2.lvd142m")
    assert s.name == "vit_small_patch14_dinov2.lvd142m"
    assert s.weights is None


@pytest.mark.parametrize(
    "weights",
    [
        "/models/w.safetensors",
        "w.safetensors",  # a bare file name: recognized by its suffix
        "w.pth",
        "w.bin",
        "model.ckpt",
        "./w",
        "../weights/w",
        "~/w.pt",
        "dir/w",
        "C:\\models\\w",
    ],
)
def test_weights_path_vs_tag(weights: str) -> None:
    s = ModelSpec.parse(f"timm:resnet18@{weights}")
    assert s.weights == weights
    assert s.pretrained_tag is None
    assert isinstance(s.weights_path, Path)
    if weights.startswith("~"):
        assert s.weights_path == Path(weights).expanduser()
        assert "~" not in str(s.weights_path)
    else:
        assert s.weights_path == Path(weights)


@pytest.mark.parametrize("tag", ["openai", "laion2b_s34b_b79k", "in1k", "a1_in1k"])
def test_plain_words_are_tags(tag: str) -> None:
    s = ModelSpec.parse(f"timm:resnet50@{tag}")
    assert s.pretrained_tag == tag
    assert s.weights_path is None


def test_open_clip_with_tag() -> None:
    s = ModelSpec.parse("open_clip:ViT-B-32@openai")
    assert (s.library, s.name, s.pretrained_tag, s.weights_path) == ("open_clip", "ViT-B-32", "openai", None)


def test_library_spelling_is_normalized() -> None:
    assert ModelSpec.parse("open-clip:ViT-B-32").library == "open_clip"
    assert ModelSpec.parse("TIMM:resnet18").library == "timm"


def test_whitespace_around_parts_is_dropped() -> None:
    s = ModelSpec.parse("timm: resnet18 @ a1_in1k ")
    assert (s.name, s.weights) == ("resnet18", "a1_in1k")


def test_empty_weights_after_at_means_none() -> None:
    assert ModelSpec.parse("timm:resnet18@").weights is None


def test_parse_passes_a_spec_through() -> None:
    s = ModelSpec("timm", "resnet18", "x.pt")
    assert ModelSpec.parse(s) is s


@pytest.mark.parametrize(
    "text",
    [
        "timm:resnet18",
        "timm:vit_small_patch14_dinov2@lvd142m",
        "timm:resnet18@/tmp/w.safetensors",
        "open_clip:ViT-B-32@openai",
        "open_clip:ViT-B-32",
    ],
)
def test_str_round_trip(text: str) -> None:
    s = ModelSpec.parse(text)
    assert str(s) == text
    assert ModelSpec.parse(str(s)) == s


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("resnet18", ["no library prefix", "timm:", "open_clip:"]),
        ("", ["no library prefix"]),
        ("torchvision:resnet18", ["unknown library 'torchvision'", "timm", "open_clip"]),
        ("timm:", ["names no model"]),
        ("timm:@openai", ["names no model"]),
        ("open_clip:  ", ["names no model"]),
    ],
)
def test_bad_specs_raise_helpful_errors(text: str, fragments: list[str]) -> None:
    with pytest.raises(ModelSpecError) as ei:
        ModelSpec.parse(text)
    msg = str(ei.value)
    assert repr(text) in msg  # the message quotes what the user wrote
    for f in fragments:
        assert f in msg
    assert isinstance(ei.value, KTError)


def test_non_string_spec_is_rejected() -> None:
    with pytest.raises(ModelSpecError, match="no library prefix"):
        ModelSpec.parse(None)  # type: ignore[arg-type]
