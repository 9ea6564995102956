"""Supernet families and the registry (``create_supernet``, ``list_supernets``)."""

from . import resnet  # noqa: F401  (registers the family)
from .base import Supernet, create_supernet, list_supernets, load_pretrained, register_supernet

__all__ = ["Supernet", "create_supernet", "list_supernets", "load_pretrained", "register_supernet"]
