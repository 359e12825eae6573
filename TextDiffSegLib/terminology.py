"""Anatomical structures the engine knows, and free-text prompts resolved to them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Structure:
    """One segmentable structure, as Slicer's terminology describes it.

    ``name`` is the canonical id, the label name used by BTCV, CHAOS and TotalSegmentator
    (``"kidney_left"``); ``display_name`` is what a person reads (``"left kidney"``).
    """

    name: str
    display_name: str
    synonyms: tuple[str, ...]
    color: tuple[int, int, int]
    category: tuple[str, str, str]  # (coding scheme, code value, code meaning), e.g. ("SCT", "123037004", "Anatomical Structure")
    type: tuple[str, str, str]  # e.g. ("SCT", "10200004", "Liver")
    type_modifier: tuple[str, str, str] | None = None  # laterality, e.g. ("SCT", "7771000", "Left")
