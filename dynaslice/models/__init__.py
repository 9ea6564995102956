"""Supernet families and the registry (``create_supernet``, ``list_supernets``)."""

from . import dsmbnet, mobilenet, resnet, vit  # noqa: F401  (register the families)
from .base import Supernet, create_supernet, list_supernets, load_pretrained, register_supernet

__all__ = ["Supernet", "create_supernet", "list_supernets", "load_pretrained", "register_supernet"]
