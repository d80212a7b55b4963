"""Backbones and the exported-backbone format."""

from ssl.models.backbones import BACKBONES, build_backbone
from ssl.models.export import load_backbone, load_export, save_export

__all__ = ["BACKBONES", "build_backbone", "load_backbone", "load_export", "save_export"]
