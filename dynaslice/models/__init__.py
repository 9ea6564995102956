"""Supernet families and the registry (``create_supernet``, ``list_supernets``)."""

from . import dsmbnet, mobilenet, resnet, vit  # noqa: F401  (register the families)
from .base import Supernet, list_supernets, load_pretrained, register_supernet
from .converted import ConvertedSupernet, make_supernet
from .named import create_supernet

__all__ = [
    "ConvertedSupernet",
    "Supernet",
    "create_supernet",
    "list_supernets",
    "load_pretrained",
    "make_supernet",
    "register_supernet",
]
