"""Labelers by modality key: configs name implementations by these keys. Never mutated at run time."""

from __future__ import annotations

from types import MappingProxyType

from four_m.labelers.base import Labeler
from four_m.labelers.caption import CaptionLabeler
from four_m.labelers.clip import ClipLabeler
from four_m.labelers.depth import DepthLabeler
from four_m.labelers.det import DetLabeler
from four_m.labelers.normal import NormalLabeler
from four_m.labelers.semseg import SemsegLabeler

LABELERS: MappingProxyType[str, type[Labeler]] = MappingProxyType(
    {cls.name: cls for cls in (DepthLabeler, NormalLabeler, SemsegLabeler, DetLabeler, CaptionLabeler, ClipLabeler)}
)
