"""Completion for the prompt box, where several structures can be typed at once ("liver; spl")."""

from __future__ import annotations

import re

from TextDiffSegLib import terminology


def promptCompletions(text: str, limit: int = 10) -> list[str]:
    """Whole-text completions that complete the last prompt: ``"liver; spl"`` gives ``["liver; spleen", ...]``.

    Prompts are separated as ``terminology.split_prompts`` separates them (``;``, ``,``, new line).
    """
    head, last = re.match(r"(.*[;,\r\n]\s*)?(.*)\Z", text, re.S).groups()
    return [(head or "") + completion for completion in terminology.completions(last.strip(), limit)]
