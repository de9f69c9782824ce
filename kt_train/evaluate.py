"""Accuracy, per-class accuracy and the confusion matrix of a classifier on a labeled set."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data import ImageDataset
from .models import ImageClassifier, preprocessing
from .transforms import EvalTransform


@torch.inference_mode()
def predict(
    model: ImageClassifier,
    ds: ImageDataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every image, preprocessed as ``preprocessing(model)`` (the model card) says."""
    view = copy.copy(ds)
    view.transform = EvalTransform.from_preprocessing(preprocessing(model))
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y, _ in DataLoader(view, batch_size=batch_size, num_workers=num_workers):
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        logits.append(model(x).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def metrics_from_predictions(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    k = len(classes)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class_n = confusion.sum(1)
    per_class = (confusion.diag().float() / per_class_n.clamp(min=1) * 100).tolist()
    return {
        "top1": round(float((pred == labels).float().mean() * 100), 3),
        "n": len(labels),
        "per_class": {c: round(a, 3) for c, a in zip(classes, per_class, strict=True)},
        "confusion": confusion.tolist(),
        "classes": classes,
    }


def evaluate_model(
    model: ImageClassifier,
    ds: ImageDataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    logits, labels = predict(model, ds, device=device, batch_size=batch_size)
    return metrics_from_predictions(logits.argmax(-1), labels, classes or list(ds.classes or []))
