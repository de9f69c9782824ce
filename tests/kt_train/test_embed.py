"""The retrieval encoder: unit-norm rows, one transform for PIL images and batches, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kt_train.embed import Encoder, raw_forward_throughput
from kt_train.errors import ConfigError
from kt_train.models import create_teacher, save_checkpoint

from ._images import random_image


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.from_spec("timm:test_efficientnet", image_size=32, device="cpu", batch_size=3)


def test_encode_images_gives_unit_rows_and_matches_encode_batch(encoder: Encoder) -> None:
    images = [random_image(40 + i, 30, seed=i) for i in range(5)]
    vecs = encoder.encode_images(images)  # batch_size=3: two chunks
    assert vecs.shape == (5, encoder.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    batch = torch.stack([encoder.transform(im) for im in images])
    assert batch.dtype == torch.uint8 and batch.shape[-2:] == (32, 32)
    np.testing.assert_allclose(encoder.encode_batch(batch), vecs, atol=1e-5)
    # distinct images, distinct embeddings; the same image twice, the same row
    assert not np.allclose(vecs[0], vecs[1])
    np.testing.assert_allclose(encoder.encode_images([images[2]])[0], vecs[2], atol=1e-5)
    assert encoder.encode_images([]).shape == (0, encoder.dim)
    # batches of another size are resized by the model itself
    big = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    assert encoder.encode_batch(big).shape == (2, encoder.dim)


def test_describe_and_rebuild(encoder: Encoder) -> None:
    d = encoder.describe()
    assert d["spec"] == "timm:test_efficientnet" and d["dim"] == encoder.dim == 256
    assert d["image_size"] == 32 and d["crop_pct"] == 1.0 and len(d["mean"]) == 3
    again = Encoder.from_description(d, device="cpu")
    assert again.describe() == d
    with pytest.raises(ConfigError, match="no encoder spec"):
        Encoder.from_description({"spec": None, "dim": 256})


def test_from_checkpoint_uses_features_before_the_head(tmp_path: Path) -> None:
    teacher = create_teacher("timm:test_vit", num_classes=3, image_size=32)
    path = tmp_path / "teacher.ckpt"
    save_checkpoint(path, teacher)
    enc = Encoder.from_checkpoint(path, device="cpu")
    assert enc.dim == teacher.num_features and enc.checkpoint == str(path)
    img = random_image(32, 32, seed=3)
    x = enc.transform(img)[None]
    with torch.inference_mode():
        feats = teacher.eval().features(x)
    expected = torch.nn.functional.normalize(feats, dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_images([img]), expected, atol=1e-5)
    d = enc.describe()
    assert d["checkpoint"] == str(path)
    np.testing.assert_allclose(
        Encoder.from_description(d, device="cpu").encode_images([img]), expected, atol=1e-5
    )


def test_raw_forward_throughput(encoder: Encoder) -> None:
    assert raw_forward_throughput(encoder, n=8, batch_size=4, warmup=1) > 0


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="precision"):
        Encoder.from_spec("timm:test_efficientnet", image_size=32, device="cpu", precision="int3")
    with pytest.raises(ConfigError, match="device"):
        Encoder.from_spec("timm:test_efficientnet", image_size=32, device="tpu9")
