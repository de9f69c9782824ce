"""Teachers and students from specs: preprocessing, weights from files and cards, errors, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from kt_train.errors import ModelSpecError, WeightsNotFoundError
from kt_train.models import (
    DataConfig,
    Preprocess,
    create_backbone,
    create_student,
    create_teacher,
    load_checkpoint,
    save_checkpoint,
    set_norm_eval,
)

from ..conftest import STUDENT, TEACHER

NC = 3


def _pixels(n: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _save_random(name: str, path: Path, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = timm.create_model(name, **kwargs)
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(path))
    return sd


# --------------------------------------------------------------------------- building and preprocessing


@pytest.mark.parametrize("spec", [TEACHER, STUDENT])
def test_teacher_logits_from_any_size_and_uint8(spec: str) -> None:
    teacher = create_teacher(spec, NC, image_size=32).eval()
    x = _pixels(2, 40, 48)
    with torch.no_grad():
        assert teacher(x).shape == (2, NC)
        assert teacher(_pixels(3, 17, 23)).shape == (3, NC)
        u8 = (x * 255).round().to(torch.uint8)
        out_u8 = teacher(u8)
        out_f = teacher(u8.float() / 255)
    assert out_u8.shape == (2, NC)
    assert torch.allclose(out_u8, out_f, atol=1e-5)  # uint8 means [0, 255] -> [0, 1]


def test_student_logits_from_any_size_and_uint8() -> None:
    student = create_student(STUDENT, NC, image_size=32).eval()
    with torch.no_grad():
        assert student(_pixels(2, 40, 48)).shape == (2, NC)
        assert student((_pixels(2, 64, 20) * 255).to(torch.uint8)).shape == (2, NC)
    assert student.head is None  # a student is one plain timm classifier
    assert student.net.num_classes == NC


def test_default_input_size_comes_from_the_model() -> None:
    teacher = create_teacher(TEACHER, NC)
    assert (
        teacher.data_config.input_size
        == timm.data.resolve_data_config({}, model=teacher.net)["input_size"][-1]
    )
    assert teacher.preprocess.size == teacher.data_config.input_size


def test_preprocess_resizes_and_normalizes_per_model() -> None:
    teacher = create_teacher(TEACHER, NC, image_size=32)
    student = create_student(STUDENT, NC, image_size=24)
    t_cfg, s_cfg = teacher.data_config, student.data_config
    assert t_cfg.mean != s_cfg.mean  # test_vit: 0.5; test_efficientnet: ImageNet statistics
    x = _pixels(2, 32, 32)
    t_in = teacher.preprocess(x)
    s_in = student.preprocess(x)
    assert t_in.shape == (2, 3, 32, 32)
    assert s_in.shape == (2, 3, 24, 24)  # resized to the student's own input size
    mean, std = torch.tensor(t_cfg.mean).view(1, 3, 1, 1), torch.tensor(t_cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(t_in, (x - mean) / std, atol=1e-6)  # no resize at the model's own size
    # The same pixels at the same size, normalized with each model's own statistics.
    s32 = Preprocess(DataConfig(32, s_cfg.mean, s_cfg.std))(x)
    s_mean, s_std = torch.tensor(s_cfg.mean).view(1, 3, 1, 1), torch.tensor(s_cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(s32, (x - s_mean) / s_std, atol=1e-6)
    assert not torch.allclose(s32, t_in, atol=1e-3)


def test_preprocess_uint8_equals_float() -> None:
    pre = Preprocess(DataConfig(16, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)))
    u8 = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8)
    assert torch.allclose(pre(u8), pre(u8.float() / 255), atol=1e-6)
    assert pre(u8).shape == (2, 3, 16, 16)


def test_mlp_head_and_backbone() -> None:
    teacher = create_teacher(TEACHER, NC, head="mlp", image_size=32).eval()
    assert isinstance(teacher.head, nn.Sequential)
    with torch.no_grad():
        assert teacher(_pixels()).shape == (2, NC)
    backbone = create_backbone(TEACHER, image_size=32).eval()
    with torch.no_grad():
        feats = backbone(_pixels())
    assert feats.shape == (2, backbone.num_features) == (2, 64)


def test_unknown_head_is_an_error() -> None:
    with pytest.raises(ModelSpecError, match="unknown head"):
        create_teacher(TEACHER, NC, head="transformer")


def test_unknown_timm_name_suggests_close_names() -> None:
    with pytest.raises(ModelSpecError) as ei:
        create_student("timm:resnet181", NC)
    msg = str(ei.value)
    assert "'resnet181'" in msg
    assert "did you mean" in msg
    assert "resnet18" in msg.split("did you mean", 1)[1]


def test_unknown_timm_name_with_tag_is_a_spec_error_not_a_download() -> None:
    with pytest.raises(ModelSpecError, match="did you mean"):
        create_teacher("timm:test_vitt@r160_in1k", NC)


def test_open_clip_student_is_rejected() -> None:
    with pytest.raises(ModelSpecError, match="teachers only"):
        create_student("open_clip:ViT-B-32", NC)


def test_unknown_open_clip_arch_suggests_close_names() -> None:
    with pytest.raises(ModelSpecError) as ei:
        create_teacher("open_clip:ViT-B-33", NC)
    assert "did you mean" in str(ei.value)
    assert "ViT-B-32" in str(ei.value)


# --------------------------------------------------------------------------- weights


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError) as ei:
        create_student(f"timm:test_efficientnet@{missing}", NC)
    assert str(missing) in str(ei.value)


def test_a_registered_spec_outside_the_server_says_to_pass_the_file() -> None:
    # `kt gallery build --encoder timm:mobilenetv2_100@registered:proxy` (the spec a job takes) had
    # said the weights were "not available offline" and to fetch 'mobilenetv2_100.registered:proxy'
    with pytest.raises(WeightsNotFoundError) as ei:
        create_teacher("timm:test_efficientnet@registered:proxy", NC)
    text = str(ei.value)
    assert "kt admin register-model" in text and "timm:test_efficientnet@/path/to/weights.safetensors" in text
    assert "registry/proxy/" in text and "offline" not in text


def test_missing_open_clip_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_teacher(f"open_clip:ViT-B-32@{tmp_path / 'clip.safetensors'}", NC)


def test_student_weights_from_local_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "eff.safetensors"
    sd = _save_random("test_efficientnet", path, seed=1, num_classes=NC)
    torch.manual_seed(2)  # a different random init, so equality proves loading
    student = create_student(f"timm:test_efficientnet@{path}", NC)
    own = student.net.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k


def test_teacher_weights_from_local_file_skip_the_classifier(tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.manual_seed(3)
    src = timm.create_model("test_vit", num_classes=1000)
    torch.save({"state_dict": src.state_dict()}, path)  # a training checkpoint wrapping the state dict
    teacher = create_teacher(f"timm:test_vit@{path}", NC, image_size=32)
    own = teacher.net.state_dict()
    assert not any(k.startswith("head.") for k in own)  # the task head is separate
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(own[k], v), k
    assert teacher.head is not None and teacher.head.out_features == NC


def test_weights_that_do_not_fit_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    _save_random("test_vit", path, embed_dim=32, num_heads=2)
    with pytest.raises(WeightsNotFoundError, match="do not fit"):
        create_teacher(f"timm:test_vit@{path}", NC)


def test_card_beside_weights_sets_create_model_kwargs_and_preprocessing(tmp_path: Path) -> None:
    path = tmp_path / "vit2blocks.safetensors"
    sd = _save_random("test_vit", path, seed=4, depth=2, num_classes=0)
    # Without the card the file misses blocks 2..5 of the default test_vit: a clear error.
    with pytest.raises(WeightsNotFoundError, match="miss"):
        create_teacher(f"timm:test_vit@{path}", NC)
    card = {
        "create_model_kwargs": {"depth": 2, "num_classes": 77},  # num_classes is the task's, never the card's
        "input_size": [3, 48, 48],
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
    }
    (tmp_path / "vit2blocks.card.json").write_text(json.dumps(card))
    teacher = create_teacher(f"timm:test_vit@{path}", NC)
    assert len(teacher.net.blocks) == 2
    assert teacher.recipe.model_kwargs == {"depth": 2}
    own = teacher.net.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    dc = teacher.data_config
    assert dc.input_size == 48
    assert dc.mean == (0.1, 0.2, 0.3) and dc.std == (0.4, 0.5, 0.6)
    with torch.no_grad():
        assert teacher.eval()(_pixels()).shape == (2, NC)
    # The recipe rebuilds the model without the card (e.g. from a checkpoint on another machine).
    save_checkpoint(tmp_path / "t.pt", teacher)
    path.unlink()
    (tmp_path / "vit2blocks.card.json").unlink()
    again, _ = load_checkpoint(tmp_path / "t.pt")
    assert len(again.net.blocks) == 2
    assert again.data_config == dc


@pytest.mark.timeout(60)
def test_pretrained_tag_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads the environment at import; patch the live constants too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsNotFoundError) as ei:
        create_teacher("timm:test_vit@r160_in1k", NC)
    msg = str(ei.value)
    assert "timm:test_vit@r160_in1k" in msg
    assert "timm.create_model('test_vit.r160_in1k', pretrained=True)" in msg  # what to fetch
    assert "timm:test_vit@/path/to/weights.safetensors" in msg  # or a local file


# --------------------------------------------------------------------------- checkpoints and modes


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_checkpoint_round_trip_gives_identical_logits(role: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if role == "teacher":
        model = create_teacher(TEACHER, NC, head="mlp", image_size=32)
    else:
        model = create_student(STUDENT, NC, image_size=40)
    model.eval()
    x = _pixels(3, 36, 36)
    with torch.no_grad():
        ref = model(x)
    save_checkpoint(tmp_path / "m.pt", model, classes=["a", "b", "c"], metrics={"val_acc": 1.0})
    torch.manual_seed(123)  # a rebuild must not depend on the global seed
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    loaded.eval()
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, ref)
    assert ckpt["classes"] == ["a", "b", "c"] and ckpt["metrics"] == {"val_acc": 1.0}
    assert loaded.recipe.to_dict() == model.recipe.to_dict()
    assert loaded.data_config.input_size == (32 if role == "teacher" else 40)
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def _train_step(model: nn.Module) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = _pixels(4, 32, 32, seed=5) * 3  # far from the init statistics, so stats would move
    loss = model(x).logsumexp(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_set_norm_eval_freezes_bn_statistics_not_weights() -> None:
    torch.manual_seed(0)
    model = create_student(STUDENT, NC, image_size=32)
    assert _bn_stats(model)
    model.train()
    set_norm_eval(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not m.training for m in bns)
    assert model.training and model.net.training  # the rest stays in train mode
    stats = _bn_stats(model)
    bn_weight = bns[0].weight.detach().clone()
    _train_step(model)
    for k, v in _bn_stats(model).items():
        assert torch.equal(v, stats[k]), k
    assert not torch.equal(bns[0].weight, bn_weight)  # affine parameters still train


def test_without_norm_eval_bn_statistics_move() -> None:
    """Control for the test above: the same step in plain train mode changes the statistics."""
    torch.manual_seed(0)
    model = create_student(STUDENT, NC, image_size=32).train()
    stats = _bn_stats(model)
    _train_step(model)
    changed = [k for k, v in _bn_stats(model).items() if not torch.equal(v, stats[k])]
    assert changed


# --------------------------------------------------------------------------- open_clip


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_open_clip(monkeypatch: pytest.MonkeyPatch) -> str:
    from open_clip import factory

    monkeypatch.setitem(factory._MODEL_CONFIGS, "kt-tiny", TINY_CLIP)
    return "kt-tiny"


def test_open_clip_teacher(tiny_open_clip: str, tmp_path: Path) -> None:
    import open_clip

    teacher = create_teacher(f"open_clip:{tiny_open_clip}", NC).eval()
    assert teacher.num_features == 16  # the image embedding
    dc = teacher.data_config
    assert dc.input_size == 32
    assert dc.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    with torch.no_grad():
        logits = teacher(_pixels(2, 50, 44))
        assert logits.shape == (2, NC)
        assert teacher.features(_pixels(2, 50, 44)).shape == (2, 16)
    save_checkpoint(tmp_path / "clip.pt", teacher, classes=["a", "b", "c"])
    loaded, _ = load_checkpoint(tmp_path / "clip.pt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_pixels(2, 50, 44)), logits)


@pytest.mark.timeout(60)
def test_open_clip_unknown_tag_is_weights_error(tiny_open_clip: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError) as ei:
        create_teacher(f"open_clip:{tiny_open_clip}@openai", NC)
    assert f"open_clip:{tiny_open_clip}@openai" in str(ei.value)


def test_num_classes_in_model_kwargs_is_a_config_error() -> None:
    from kt_train.errors import ConfigError
    from kt_train.models import create_student

    with pytest.raises(ConfigError, match="comes from the labeled data"):
        create_student("timm:resnet10t", 4, model_kwargs={"num_classes": 4})
