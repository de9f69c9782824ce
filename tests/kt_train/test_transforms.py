from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kt_train.errors import ConfigError
from kt_train.transforms import EvalTransform, TrainAugment, to_float, to_rgb

from ._images import random_image


def test_train_augment_shape_dtype_and_randomness() -> None:
    aug = TrainAugment(16, color_jitter=0.4, vflip=True)
    img = random_image(40, 30)
    torch.manual_seed(0)
    outs = [aug(img) for _ in range(4)]
    for x in outs:
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 16, 16)
    assert not all(torch.equal(outs[0], x) for x in outs[1:])


def test_train_augment_replay() -> None:
    aug = TrainAugment(12, scale=(0.2, 0.6), color_jitter=0.3, vflip=True)
    img = random_image(33, 27, seed=5)
    params = aug.sample_params(img.width, img.height, torch.Generator().manual_seed(7))
    assert {"top", "left", "h", "w", "hflip", "vflip", "brightness", "contrast", "saturation"} <= set(params)
    params = json.loads(json.dumps(params))  # views are stored as JSON
    a, b = aug.apply(img, params), aug.apply(img.copy(), params)
    assert torch.equal(a, b) and tuple(a.shape) == (3, 12, 12)
    again = aug.sample_params(img.width, img.height, torch.Generator().manual_seed(7))
    assert again == params
    assert params["top"] >= 0 and params["top"] + params["h"] <= 27
    assert params["left"] >= 0 and params["left"] + params["w"] <= 33


def test_flip_params_flip_pixels() -> None:
    aug = TrainAugment(10, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    img = random_image(10, 10)
    base = {"top": 0, "left": 0, "h": 10, "w": 10, "hflip": False, "vflip": False}
    plain = aug.apply(img, base)
    assert torch.equal(plain, torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert torch.equal(aug.apply(img, {**base, "hflip": True}), plain.flip(-1))
    assert torch.equal(aug.apply(img, {**base, "vflip": True}), plain.flip(-2))


def test_no_jitter_keys_when_disabled_and_fallback_crop() -> None:
    aug = TrainAugment(8, scale=(0.9, 1.0), ratio=(3.0, 4.0), hflip=False)
    p = aug.sample_params(10, 40, torch.Generator().manual_seed(0))  # tall image, wide ratios: fallback
    assert "brightness" not in p and p["hflip"] is False
    assert p["w"] == 10 and p["h"] == 3 and p["left"] == 0


def test_eval_transform() -> None:
    t = EvalTransform(16, crop_pct=0.875)
    assert t.resize_to == 18
    for w, h in ((40, 20), (17, 50), (16, 16), (5, 7)):
        x = t(random_image(w, h))
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 16, 16)
    assert tuple(EvalTransform(12)(Image.new("L", (30, 20), 9)).shape) == (3, 12, 12)


def test_rgb_conversion_and_to_float() -> None:
    assert to_rgb(Image.new("LA", (3, 3), (5, 255))).getpixel((0, 0)) == (5, 5, 5)
    i16 = Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16))
    assert to_rgb(i16).getpixel((0, 0)) == (100, 100, 100)
    pal = Image.new("P", (4, 4), 0)
    pal.info["transparency"] = 0
    assert to_rgb(pal).mode == "RGB"
    x = TrainAugment(8)(Image.new("RGBA", (20, 20), (255, 0, 0, 0)))
    f = to_float(x[None])
    assert f.dtype == torch.float32 and float(f.max()) == 1.0 and float(f.min()) == 0.0
    assert to_float(f) is f


def test_invalid_config() -> None:
    with pytest.raises(ConfigError):
        TrainAugment(0)
    with pytest.raises(ConfigError):
        TrainAugment(8, scale=(0.5, 0.2))
    with pytest.raises(ConfigError):
        EvalTransform(8, crop_pct=1.5)
