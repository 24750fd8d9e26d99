"""Models for enn-neuro: the registry, the ResNet family, local heads and block splitting."""

from enn_neuro.models.layers import LayerKind, LayerSpec, NormKind, init_weights_
from enn_neuro.models.local import HeadKind, LocalBlock, LocalHead, Unit, cut_points, split_model
from enn_neuro.models.registry import create_model, list_models, register_model, structure_twin
from enn_neuro.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "HeadKind",
    "LayerKind",
    "LayerSpec",
    "LocalBlock",
    "LocalHead",
    "NormKind",
    "ResNet",
    "Unit",
    "create_model",
    "cut_points",
    "init_weights_",
    "list_models",
    "register_model",
    "split_model",
    "structure_twin",
]
