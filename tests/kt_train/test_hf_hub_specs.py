"""``timm:hf-hub:<org>/<name>[@revision]`` specs: parsed by kt_train, handed to ``timm.create_model``
as timm's own ``hf-hub:`` id (nothing is downloaded here: ``create_model`` is replaced), and
checked by the service (422 with a did-you-mean for near misses) without timm."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch.nn as nn

from kt_train import models
from kt_train.errors import ModelSpecError, WeightsNotFoundError
from kt_train.specs import ModelSpec
from service.model_specs import check_model_spec


def test_a_hub_spec_parses_to_its_repository_and_revision() -> None:
    spec = ModelSpec.parse("timm:hf-hub:timm/resnet18.a1_in1k")
    assert (spec.library, spec.hf_hub_id, spec.weights, spec.weights_path) == (
        "timm",
        "timm/resnet18.a1_in1k",
        None,
        None,
    )
    assert (
        spec.timm_name == "hf-hub:timm/resnet18.a1_in1k" and str(spec) == "timm:hf-hub:timm/resnet18.a1_in1k"
    )
    pinned = ModelSpec.parse("timm:hf_hub:acme/my-vit@v1.2")  # timm's older spelling, a revision
    assert pinned.hf_hub_id == "acme/my-vit" and pinned.timm_name == "hf-hub:acme/my-vit@v1.2"
    assert pinned.weights_path is None  # a revision, never a file
    assert ModelSpec.parse("timm:resnet18.a1_in1k").hf_hub_id is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("timm:hf-hub:", "names no repository"),
        ("timm:hf-hub:resnet18", "'timm:hf-hub:timm/resnet18'"),
        ("timm:hf-hub:a/b/c", "is not a Hugging Face repository id"),
        ("timm:hf-hub:../../etc", "is not a Hugging Face repository id"),
        ("timm:hf-hub:org/x@../w.pt", "is not a revision"),
        ("hf-hub:timm/resnet18", "did you mean 'timm:hf-hub:timm/resnet18'"),
        ("open_clip:hf-hub:org/x", "are for timm models"),
    ],
)
def test_malformed_hub_specs_are_refused_by_kt_train(spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=re.escape(message)):
        ModelSpec.parse(spec)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def __call__(self, name: str, **kwargs: Any) -> nn.Module:
        self.calls.append((name, kwargs))
        if self.fail:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.num_features = 8  # type: ignore[assignment]
        net.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}  # type: ignore[assignment]
        return net


def test_kt_train_hands_the_hub_id_to_timm_create_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    fake = Recorder()
    monkeypatch.setattr(timm, "create_model", fake)
    net, card = models._timm_net(
        ModelSpec.parse("timm:hf-hub:acme/tiny-net@main"), 5, {"drop_rate": None}, True
    )
    assert fake.calls == [("hf-hub:acme/tiny-net@main", {"pretrained": True, "num_classes": 5})]
    assert card == {} and isinstance(net, nn.Module)
    # rebuilt from a checkpoint: the architecture from the Hub config, no weights
    models._timm_net(ModelSpec.parse("timm:hf-hub:acme/tiny-net"), 0, {}, False)
    assert fake.calls[-1] == ("hf-hub:acme/tiny-net", {"pretrained": False, "num_classes": 0})


def test_a_hub_model_missing_offline_names_what_to_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    monkeypatch.setattr(timm, "create_model", Recorder(fail=True))
    with pytest.raises(
        WeightsNotFoundError, match=r"Hugging Face Hub or its local cache.*~/\.cache/huggingface"
    ):
        models._timm_net(ModelSpec.parse("timm:hf-hub:acme/tiny-net"), 5, {}, True)


# --- the service's check (no timm) -----------------------------------------------------------


@pytest.mark.parametrize("spec", ["timm:hf-hub:timm/resnet18.a1_in1k", "timm:hf_hub:acme/my-vit@v1.2"])
def test_the_service_accepts_hub_specs_for_teachers_and_students(spec: str) -> None:
    assert check_model_spec(spec, "teacher") == spec
    assert check_model_spec(spec, "student") == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf-hub:timm/resnet18", "did you mean 'timm:hf-hub:timm/resnet18'?"),
        ("timm:huggingface:acme/x", "did you mean 'timm:hf-hub:acme/x'?"),
        ("timm:hf-hub/acme/x", "did you mean 'timm:hf-hub:acme/x'?"),
        ("timm:hf-hub:resnet18", "e.g. 'timm:hf-hub:timm/resnet18'"),
        ("timm:hf-hub:a/b/c", "not a Hugging Face repository id"),
        ("timm:hf-hub:../x", "not a Hugging Face repository id"),
        ("timm:hf-hub:acme/x@../../etc/passwd", "is not a revision"),
        ("timm:hf-hub:acme/x@", "names no revision"),
        ("open_clip:hf-hub:acme/x", "are for timm models"),
    ],
)
def test_the_service_refuses_malformed_hub_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check_model_spec(spec, "teacher")
    assert message in str(err.value)


def test_the_api_answers_422_for_a_malformed_hub_spec_and_queues_a_good_one(tmp_path: Any) -> None:
    from tests.service.test_api import imagefolder_zip, make_settings, running_api, upload

    with running_api(make_settings(tmp_path / "data")) as api:
        key = api.key("acme")
        with api.client(key) as client:
            dataset = upload(client, imagefolder_zip({"cat": 2, "dog": 2})).json()
            body = {
                "dataset_id": dataset["id"],
                "teacher": "timm:test_vit",
                "export_formats": ["safetensors"],
            }
            bad = client.post("/v1/jobs", json={**body, "student": "hf-hub:timm/resnet18"})
            assert bad.status_code == 422
            assert "did you mean 'timm:hf-hub:timm/resnet18'?" in bad.text
            good = client.post("/v1/jobs", json={**body, "student": "timm:hf-hub:timm/resnet18.a1_in1k"})
            assert good.status_code == 202, good.text
            assert good.json()["request"]["student"] == "timm:hf-hub:timm/resnet18.a1_in1k"
