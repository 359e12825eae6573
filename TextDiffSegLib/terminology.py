"""Anatomical structures the engine knows, and free-text prompts resolved to them.

The table lives in ``Resources/Terminology/structures.json``. Each entry gives a canonical ``name``
(the label name BTCV, CHAOS and TotalSegmentator use, e.g. ``"kidney_left"``), a ``display_name``
(``"left kidney"``), synonyms and abbreviations, a recommended colour, the SNOMED CT codes Slicer's
terminologies use (category, type, and laterality as the type modifier), and the terminology context
(list of codes) that holds those codes: Slicer's General Anatomy list for most organs, its DICOM
master list for some vessels and the sacrum, and TextDiffSeg's own list
(``Resources/Terminology/SegmentationCategoryTypeModifier-TextDiffSeg.term.json``, which the Slicer
module loads into Slicer) for the structures no Slicer list has.

Public functions:

- ``structures()``: every known structure, in table order.
- ``get_structure(name)``: one structure by canonical name.
- ``resolve_prompt(text)``: free text (``"Segment the left kidney in this CT"``) to one structure.
- ``resolve_prompts(prompts)``: several prompts to as many different structures.
- ``split_prompts(text)``: ``"liver; spleen"`` to ``["liver", "spleen"]``.
- ``terminology_entry(structure)``: the ``TerminologyEntry`` tag Slicer stores on a segment.
- ``completions(prefix, limit)``: display names and synonyms for a prompt box.
- ``load_table(path)``: read and validate a table file (``structures()`` uses the bundled one).

Every error a user can cause is a ``PromptError`` whose message says what to do.
This module imports neither torch nor slicer nor qt: Slicer imports it in its GUI process.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PromptError
from .resources import resources_dir


#: The Slicer terminology context that holds most organs.
GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"


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
    context: str = GENERAL_ANATOMY  # the terminology context (list) holding the codes


#: Where the bundled table lives, relative to ``resources_dir()``.
TABLE_RELATIVE_PATH = Path("Terminology") / "structures.json"

#: TextDiffSeg's terminology context, in Slicer's format, relative to ``resources_dir()``.
CONTEXT_RELATIVE_PATH = Path("Terminology") / "SegmentationCategoryTypeModifier-TextDiffSeg.term.json"

#: Printed at the end of "unknown structure" messages.
_MODELS_HINT = "Run `textdiffseg models` to list the structures the installed models can segment."

#: SNOMED CT laterality codes (type modifiers) and the side each stands for.
_SIDE_OF_MODIFIER = {("SCT", "7771000"): "left", ("SCT", "24028007"): "right"}

#: Laterality words and abbreviations, as they may appear in a prompt, to the side they name.
_SIDE_WORDS = {
    "left": "left", "l": "left", "lt": "left", "lft": "left",
    "right": "right", "r": "right", "rt": "right", "rgt": "right",
}

#: Words of task phrasing that a prompt may contain around the structure ("segment the ... in this CT scan").
_STOPWORDS = frozenset(
    """
    a an the this that these those my our its his her their it is are there here now
    please pls kindly can could would will you me i we want need like to
    segment segments segmented segmenting segmentation seg outline delineate contour contours mask masks
    label labels extract find locate identify highlight show draw mark get give make create generate
    in on of from for at with within inside using and only just
    whole entire complete full organ structure region area side sided one s
    ct cta cect mr mri mra pet scan scans image images imaging volume volumes series study exam examination
    slice slices dataset case patient patients abdominal abdomen pelvic pelvis
    t1 t2 t1w t2w weighted spir contrast enhanced axial 3d
    """.split()
)

_ALLOWED_KEYS = {"name", "display_name", "synonyms", "color", "category", "type", "type_modifier", "context"}
_REQUIRED_KEYS = _ALLOWED_KEYS - {"type_modifier"}
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*$")
_LABEL_ALIAS_PATTERN = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)+$")
_FORBIDDEN_CODE_CHARACTERS = ("~", "^", "|")


@dataclass(frozen=True)
class _Table:
    """A validated table and the lookups built from it."""

    structures: tuple[Structure, ...]
    anatomic_context_name: str
    by_name: dict[str, Structure]
    by_label_alias: dict[str, Structure]  # dataset label names listed as synonyms, e.g. "portal_and_splenic_vein"
    phrases: dict[tuple[str, ...], str]  # normalised phrase -> canonical name
    base_phrases: dict[tuple[str, ...], tuple[str, ...]]  # phrase without laterality -> names of the sided structures
    max_phrase_length: int
    completion_candidates: tuple[str, ...]


def _tokens(text: str) -> tuple[str, ...]:
    """Lower-case words of ``text``; punctuation and underscores split words; laterality abbreviations become left/right."""
    text = re.sub(r"[\W_]+", " ", text.lower())
    return tuple(_SIDE_WORDS.get(token, token) for token in text.split())


def _side(structure: Structure) -> str | None:
    """``"left"``, ``"right"``, or ``None`` where the type modifier is no laterality."""
    if structure.type_modifier is None:
        return None
    return _SIDE_OF_MODIFIER.get((structure.type_modifier[0], structure.type_modifier[1]))


def _table_error(path: Path, problem: str) -> PromptError:
    return PromptError(
        f"The terminology table {path} is invalid: {problem}. Fix that entry, or restore the file from the "
        "TextDiffSeg repository (reinstalling the extension or package restores it too)."
    )


def _code(path: Path, where: str, value: object) -> tuple[str, str, str]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) and v.strip() for v in value)):
        raise _table_error(
            path, f"{where} must be [coding scheme, code value, code meaning], three non-empty strings, not {value!r}"
        )
    for part in value:
        if any(character in part for character in _FORBIDDEN_CODE_CHARACTERS):
            forbidden = " ".join(_FORBIDDEN_CODE_CHARACTERS)
            raise _table_error(
                path, f"{where} {value!r} contains one of {forbidden}, which Slicer's TerminologyEntry tag cannot hold"
            )
    return (value[0], value[1], value[2])


def _structure(path: Path, position: int, entry: object) -> Structure:
    if not isinstance(entry, dict):
        raise _table_error(path, f"structure #{position + 1} must be an object, not {type(entry).__name__}")
    name = entry.get("name")
    where = f"structure {name!r}" if isinstance(name, str) else f"structure #{position + 1}"
    missing = sorted(_REQUIRED_KEYS - entry.keys())
    if missing:
        raise _table_error(path, f"{where} lacks {', '.join(missing)}")
    unknown = sorted(entry.keys() - _ALLOWED_KEYS)
    if unknown:
        allowed = ", ".join(sorted(_ALLOWED_KEYS))
        raise _table_error(path, f"{where} has unknown field(s) {', '.join(unknown)} (allowed: {allowed})")
    if not (isinstance(name, str) and _NAME_PATTERN.match(name)):
        raise _table_error(path, f"{where}: name must be snake_case letters and digits, like 'kidney_left'")
    display_name = entry["display_name"]
    if not (isinstance(display_name, str) and display_name.strip()):
        raise _table_error(path, f"{where}: display_name must be a non-empty string")
    synonyms = entry["synonyms"]
    if not (isinstance(synonyms, list) and all(isinstance(s, str) and s.strip() for s in synonyms)):
        raise _table_error(path, f"{where}: synonyms must be a list of non-empty strings")
    color = entry["color"]
    if not (
        isinstance(color, list)
        and len(color) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise _table_error(path, f"{where}: color must be three integers from 0 to 255 (RGB), not {color!r}")
    context = entry["context"]
    if not (isinstance(context, str) and context.strip()) or any(c in context for c in _FORBIDDEN_CODE_CHARACTERS):
        raise _table_error(path, f"{where}: context must be the name of a terminology context, without ~ ^ |")
    modifier = entry.get("type_modifier")
    return Structure(
        name=name,
        display_name=display_name.strip(),
        synonyms=tuple(s.strip() for s in synonyms),
        color=(color[0], color[1], color[2]),
        category=_code(path, f"{where}: category", entry["category"]),
        type=_code(path, f"{where}: type", entry["type"]),
        type_modifier=None if modifier is None else _code(path, f"{where}: type_modifier", modifier),
        context=context,
    )


def _build_table(path: Path) -> _Table:
    """Read ``path``, validate it, and build the lookups; raises ``PromptError`` naming the first problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptError(
            f"The terminology table {path} does not exist. Restore it from the TextDiffSeg repository, or reinstall TextDiffSeg."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _table_error(path, f"it cannot be read as JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("structures"), list) or not data["structures"]:
        raise _table_error(path, "it must be an object with a non-empty 'structures' list")
    anatomic_context_name = data.get("anatomic_context_name")
    if not (isinstance(anatomic_context_name, str) and anatomic_context_name.strip()) or any(
        c in anatomic_context_name for c in _FORBIDDEN_CODE_CHARACTERS
    ):
        raise _table_error(path, "'anatomic_context_name' must be a non-empty string without ~ ^ |")

    table = tuple(_structure(path, position, entry) for position, entry in enumerate(data["structures"]))

    by_name: dict[str, Structure] = {}
    for structure in table:
        if structure.name in by_name:
            raise _table_error(path, f"the name {structure.name!r} appears twice; names must be unique")
        by_name[structure.name] = structure

    by_label_alias: dict[str, Structure] = {}
    phrases: dict[tuple[str, ...], str] = {}
    base_members: dict[tuple[str, ...], dict[str, str]] = {}
    for structure in table:
        side = _side(structure)
        texts = [(structure.name, False), (structure.display_name, False)] + [(s, True) for s in structure.synonyms]
        for text, is_synonym in texts:
            phrase = _tokens(text)
            if not phrase:
                raise _table_error(path, f"structure {structure.name!r}: synonym {text!r} has no words")
            owner = phrases.setdefault(phrase, structure.name)
            if owner != structure.name:
                raise _table_error(
                    path, f"{text!r} (read as {' '.join(phrase)!r}) is a synonym of both {owner!r} and {structure.name!r}"
                )
            if is_synonym and _LABEL_ALIAS_PATTERN.match(text):
                if text in by_name:
                    raise _table_error(path, f"synonym {text!r} of {structure.name!r} is the name of another structure")
                by_label_alias[text] = structure
            sides_named = {token for token in phrase if token in ("left", "right")}
            if side is None:
                continue
            if sides_named - {side}:
                raise _table_error(path, f"{text!r} names the wrong side for {structure.name!r} (type modifier {side})")
            if sides_named:
                base = tuple(token for token in phrase if token not in ("left", "right"))
                if not base:
                    raise _table_error(path, f"synonym {text!r} of {structure.name!r} is only a side")
                members = base_members.setdefault(base, {})
                if members.setdefault(side, structure.name) != structure.name:
                    raise _table_error(
                        path,
                        f"{' '.join(base)!r} with side {side!r} would mean both {members[side]!r} and {structure.name!r}",
                    )

    base_phrases = {
        base: tuple(members[s] for s in ("left", "right") if s in members) for base, members in base_members.items()
    }
    candidates: list[str] = []
    seen: set[str] = set()
    for text in [s.display_name for s in table] + [synonym for s in table for synonym in s.synonyms]:
        if text.lower() not in seen:
            seen.add(text.lower())
            candidates.append(text)
    return _Table(
        structures=table,
        anatomic_context_name=anatomic_context_name,
        by_name=by_name,
        by_label_alias=by_label_alias,
        phrases=phrases,
        base_phrases=base_phrases,
        max_phrase_length=max(len(p) for p in [*phrases, *base_phrases]),
        completion_candidates=tuple(candidates),
    )


@functools.lru_cache(maxsize=1)
def _bundled_table() -> _Table:
    try:
        folder = resources_dir()
    except FileNotFoundError as error:
        raise PromptError(f"{error} The terminology table Terminology/structures.json is part of those resources.") from None
    return _build_table(folder / TABLE_RELATIVE_PATH)


def load_table(path: str | Path) -> list[Structure]:
    """Read and validate a terminology table file; return its structures in file order.

    Validation: required fields present and no unknown ones; names unique and snake_case; colours
    three integers in 0-255; codes three non-empty strings and context names without ``~ ^ |``; no synonym (after
    lower-casing, dropping punctuation and reading "L"/"lt" as "left" etc.) belongs to two structures;
    a sided structure's synonyms name only its own side. Raises ``PromptError`` naming the problem.
    ``structures()`` uses this on the bundled table, once.
    """
    return list(_build_table(Path(path)).structures)


def structures() -> list[Structure]:
    """Every structure in the bundled table, in table order (a new list each call)."""
    return list(_bundled_table().structures)


def _close(query: str, choices: dict[str, str], n: int = 5, cutoff: float = 0.6) -> list[str]:
    """Values of ``choices`` whose keys are closest to ``query`` (difflib), best first, without repeats."""
    found: list[str] = []
    for key in difflib.get_close_matches(query.lower(), list(choices), n=n * 3, cutoff=cutoff):
        if choices[key] not in found:
            found.append(choices[key])
    return found[:n]


def get_structure(name: str) -> Structure:
    """The structure whose canonical name is ``name`` (e.g. ``"kidney_left"``).

    A dataset label name the table lists as a synonym is accepted too (BTCV's
    ``"portal_and_splenic_vein"`` gives ``"portal_vein_and_splenic_vein"``). Raises ``PromptError``
    listing close names when ``name`` is unknown.
    """
    if not isinstance(name, str) or not name.strip():
        raise PromptError(
            f"Structure name must be non-empty text, not {name!r}; use a canonical name such as 'liver' or 'kidney_left'."
        )
    table = _bundled_table()
    structure = table.by_name.get(name) or table.by_label_alias.get(name)
    if structure is not None:
        return structure
    choices = {text.lower(): s.name for s in table.structures for text in (s.display_name, *s.synonyms)}
    choices.update({n.lower(): n for n in table.by_name})
    close = _close(name, choices)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise PromptError(
        f"Unknown structure name {name!r}.{hint} Canonical names are BTCV/CHAOS/TotalSegmentator label names "
        f"such as 'liver' or 'kidney_left'. {_MODELS_HINT}"
    )


def _suggestions(table: _Table, shown: str, unknown: list[str], matched: list[str]) -> list[str]:
    """Display names to offer for an unrecognised prompt: structures it did match first, then difflib's nearest."""
    choices = {" ".join(phrase): table.by_name[name].display_name for phrase, name in table.phrases.items()}
    found = [table.by_name[name].display_name for name in matched]
    for query, cutoff in [(shown, 0.6)] + [(word, 0.75) for word in unknown]:
        for display_name in _close(query, choices, cutoff=cutoff):
            if display_name not in found:
                found.append(display_name)
    return found[:5]


def resolve_prompt(text: str) -> Structure:
    """The one structure a free-text prompt names.

    Case, punctuation and task phrasing ("segment", "the", "please", "in this CT/MR scan", ...) are
    ignored; the longest synonym in the table wins ("left adrenal gland" over "adrenal"); laterality
    words (left/right, L/R, lt/rt) pick the side of paired structures, before or after the organ
    ("L kidney", "kidney left", "kidney_left"). Canonical names work as prompts too.

    Raises ``PromptError`` when the prompt is empty; names no known structure or has words left
    over that are neither a structure nor task phrasing (with the nearest known structures);
    names a paired structure without a side ("kidney": say "left kidney" or "right kidney");
    names a side a structure does not have; or names several structures (use ``split_prompts``).
    """
    if not isinstance(text, str):
        raise PromptError(
            f"The prompt must be text, not {type(text).__name__}; type a structure such as 'liver' or 'left kidney'."
        )
    tokens = _tokens(text)
    if not tokens:
        raise PromptError("empty prompt: type the structure to segment, such as 'liver' or 'left kidney'.")
    table = _bundled_table()

    direct: list[str] = []  # canonical names matched by a whole synonym
    based: list[tuple[tuple[str, ...], tuple[str, ...]]] = []  # (phrase, sided names) matched without a side
    sides: list[str] = []  # laterality words outside any matched synonym
    unknown: list[str] = []
    shown_words: list[str] = []  # what the prompt says once task phrasing is dropped
    i = 0
    while i < len(tokens):
        for length in range(min(table.max_phrase_length, len(tokens) - i), 0, -1):
            phrase = tokens[i : i + length]
            if phrase in table.phrases:
                direct.append(table.phrases[phrase])
                break
            if phrase in table.base_phrases:
                based.append((phrase, table.base_phrases[phrase]))
                break
        else:
            token = tokens[i]
            if token in ("left", "right"):
                sides.append(token)
                shown_words.append(token)
            elif token not in _STOPWORDS:
                unknown.append(token)
                shown_words.append(token)
            i += 1
            continue
        shown_words.extend(phrase)
        i += len(phrase)

    shown = " ".join(shown_words)
    if not unknown and not (direct or based) and sides:
        raise PromptError(
            f"The prompt {text.strip()!r} names a side but no structure; add the structure, such as "
            f"'{sides[0]} kidney'. {_MODELS_HINT}"
        )
    if unknown or not (direct or based):
        if not shown:
            raise PromptError(
                f"The prompt {text.strip()!r} names no structure, only task words; type the structure to segment, "
                f"such as 'liver' or 'left kidney'. {_MODELS_HINT}"
            )
        close = _suggestions(table, shown, unknown, direct + [n for _, names in based for n in names])
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise PromptError(f"Unknown structure {shown!r}.{hint} {_MODELS_HINT}")

    named = list(dict.fromkeys(direct)) + [names for names in dict.fromkeys(names for _, names in based)]
    if len(named) > 1:
        listed = ", ".join(
            table.by_name[item].display_name if isinstance(item, str) else " or ".join(table.by_name[n].display_name for n in item)
            for item in named
        )
        raise PromptError(
            f"The prompt {text.strip()!r} names several structures ({listed}); give one structure per prompt, "
            "separated by ';' (e.g. 'liver; spleen')."
        )
    named_sides = (set(sides) | {_side(table.by_name[name]) for name in direct}) - {None}
    if len(named_sides) > 1:
        raise PromptError(
            f"The prompt {text.strip()!r} names both left and right; give each side as its own prompt, "
            "separated by ';' (e.g. 'left kidney; right kidney')."
        )
    side = sides[0] if sides else None

    if direct:
        structure = table.by_name[direct[0]]
        if side is not None and _side(structure) is None:
            raise PromptError(
                f"The prompt {text.strip()!r} says {side!r}, but {structure.display_name!r} has no left or right; "
                f"remove {side!r} (or name a sided structure such as 'left kidney')."
            )
        return structure

    phrase, names = based[0]
    if side is None:
        options = " or ".join(repr(table.by_name[n].display_name) for n in names)
        raise PromptError(f"{' '.join(phrase)!r} is ambiguous: say which side, {options}.")
    for name in names:
        if _side(table.by_name[name]) == side:
            return table.by_name[name]
    known = " or ".join(repr(table.by_name[n].display_name) for n in names)
    raise PromptError(f"There is no {side} {' '.join(phrase)!r} in the terminology; known: {known}.")


def resolve_prompts(prompts: list[str]) -> list[Structure]:
    """The structures several prompts name, one per prompt; ``PromptError`` if two name the same one."""
    structures = []
    for prompt in prompts:
        structure = resolve_prompt(prompt)
        if structure in structures:
            first = prompts[structures.index(structure)]
            raise PromptError(f"the prompts {first!r} and {prompt!r} both name {structure.display_name}; "
                              "give each structure once")
        structures.append(structure)
    return structures


def split_prompts(text: str) -> list[str]:
    """Split several prompts given at once: separated by ``;``, ``,`` or new lines; blanks are skipped.

    ``"liver; spleen"``, ``"liver, spleen"`` and ``"liver\\nspleen"`` all give ``["liver", "spleen"]``.
    """
    if not isinstance(text, str):
        raise PromptError(f"The prompts must be text, not {type(text).__name__}; separate several with ';'.")
    return [part.strip() for part in re.split(r"[;,\r\n]+", text) if part.strip()]


def terminology_entry(structure: Structure | str) -> str:
    """The string Slicer stores in a segment's ``TerminologyEntry`` tag for ``structure``.

    Format (7 fields separated by ``~``, codes as ``scheme^value^meaning``): the structure's
    terminology context name, category, type, type modifier (``^^`` if none), anatomic context name,
    anatomic region (``^^``), anatomic region modifier (``^^``), e.g.
    ``Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^``.
    ``structure`` may be a ``Structure`` or a canonical name.
    """
    if isinstance(structure, str):
        structure = get_structure(structure)
    if not isinstance(structure, Structure):
        raise PromptError(f"terminology_entry needs a Structure or a structure name, not {type(structure).__name__}.")
    table = _bundled_table()
    codes = [structure.category, structure.type] + ([structure.type_modifier] if structure.type_modifier else [])
    for code in codes:
        parts_ok = all(isinstance(part, str) and not any(c in part for c in _FORBIDDEN_CODE_CHARACTERS) for part in code)
        if len(code) != 3 or not parts_ok:
            raise PromptError(
                f"Structure {structure.name!r} has code {code!r}, which a TerminologyEntry cannot hold "
                "(three strings without ~ ^ |); use a structure from the terminology table."
            )
    if any(c in structure.context for c in _FORBIDDEN_CODE_CHARACTERS):
        raise PromptError(
            f"Structure {structure.name!r} has the context {structure.context!r}, which a TerminologyEntry cannot "
            "hold (a name without ~ ^ |); use a structure from the terminology table."
        )
    modifier = "^".join(structure.type_modifier) if structure.type_modifier else "^^"
    return "~".join(
        [
            structure.context,
            "^".join(structure.category),
            "^".join(structure.type),
            modifier,
            table.anatomic_context_name,
            "^^",
            "^^",
        ]
    )


def completions(prefix: str, limit: int = 10) -> list[str]:
    """Display names and synonyms for a prompt box: those starting with ``prefix``, then those containing it.

    Case-insensitive; display names come before synonyms within each group, in table order; at most
    ``limit`` strings (none if ``limit`` < 1). An empty prefix lists display names first.
    """
    if not isinstance(prefix, str):
        raise PromptError(f"The completion prefix must be text, not {type(prefix).__name__}.")
    if limit < 1:
        return []
    wanted = prefix.strip().lower()
    candidates = _bundled_table().completion_candidates
    starting = [c for c in candidates if c.lower().startswith(wanted)]
    containing = [c for c in candidates if wanted in c.lower() and not c.lower().startswith(wanted)]
    return (starting + containing)[:limit]
