"""Terminology table and prompt resolution: the bundled table covers BTCV, CHAOS and the abdominal
TotalSegmentator classes with valid codes and colours; prompts resolve to exactly one structure
or fail with a PromptError that says what to do; TerminologyEntry strings parse in slicerio."""

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import slicerio

from TextDiffSegLib.errors import PromptError
from TextDiffSegLib.resources import resources_dir
from TextDiffSegLib.terminology import (
    GENERAL_ANATOMY,
    Structure,
    completions,
    get_structure,
    load_table,
    resolve_prompt,
    resolve_prompts,
    split_prompts,
    structures,
    terminology_entry,
)

REPO = Path(__file__).resolve().parents[2]
TABLE = resources_dir() / "Terminology" / "structures.json"

ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")

#: TotalSegmentator classes of the abdomen and pelvis the table includes (organs, vessels, lumbar spine).
TOTALSEG_ABDOMINAL = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "esophagus", "small_bowel", "duodenum", "colon",
    "urinary_bladder", "prostate", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
    "sacrum", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4", "vertebrae_L5",
]


def dataset_labels(shared_data, folder):
    """Label names of an MSD-style dataset.json, without background."""
    labels = json.loads((shared_data / folder / "dataset.json").read_text())["labels"]
    return [name for value, name in labels.items() if value != "0"]


def totalseg_labels(shared_data):
    """Every label name in TotalSegmentator's example label maps."""
    maps = json.loads((shared_data / "totalseg_examples" / "label_maps.json").read_text())
    return {name for label_map in maps.values() for name in label_map.values()}


def error_of(function, *args):
    """The PromptError message ``function(*args)`` raises."""
    with pytest.raises(PromptError) as caught:
        function(*args)
    return str(caught.value)


def write_table(tmp_path, entries):
    """A table file holding ``entries`` with the bundled anatomic context name."""
    path = tmp_path / "structures.json"
    path.write_text(json.dumps({"anatomic_context_name": "Anatomic codes - DICOM master list", "structures": entries}))
    return path


def entry(name, display_name, synonyms=(), color=(10, 20, 30), modifier=None, code="10200004", meaning="Liver"):
    return {
        "name": name,
        "display_name": display_name,
        "synonyms": list(synonyms),
        "color": list(color),
        "context": GENERAL_ANATOMY,
        "category": list(ANATOMICAL_STRUCTURE),
        "type": ["SCT", code, meaning],
        "type_modifier": None if modifier is None else list(modifier),
    }


# --- the bundled table -------------------------------------------------------------------------


def test_structure_dataclass_is_unchanged():
    assert [f.name for f in dataclasses.fields(Structure)] == [
        "name", "display_name", "synonyms", "color", "category", "type", "type_modifier", "context",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_structure("liver").name = "spleen"


def test_table_size_and_types():
    table = structures()
    assert len(table) == 28
    assert len({s.name for s in table}) == len(table)
    for s in table:
        assert isinstance(s, Structure)
        assert isinstance(s.synonyms, tuple) and all(isinstance(x, str) for x in s.synonyms)
        assert isinstance(s.color, tuple) and len(s.color) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in s.color)
        assert s.category == ANATOMICAL_STRUCTURE
        assert s.type[0] == "SCT" and s.type[1].isdigit()
        assert s.type_modifier in (None, LEFT, RIGHT)
        # laterality in the modifier matches the name and the display name
        if s.type_modifier == LEFT:
            assert "left" in s.name and s.display_name.startswith("left ")
        elif s.type_modifier == RIGHT:
            assert "right" in s.name and s.display_name.startswith("right ")
        else:
            assert "left" not in s.name and "right" not in s.name


def test_structures_returns_a_copy():
    first = structures()
    first.clear()
    assert len(structures()) == 28


def test_table_covers_btcv_and_chaos(shared_data):
    btcv = dataset_labels(shared_data, "btcv")
    chaos = dataset_labels(shared_data, "chaos_t2")
    assert len(btcv) == 13 and len(chaos) == 4
    for label in btcv + chaos:
        structure = get_structure(label)
        assert label == structure.name or label in structure.synonyms
        assert resolve_prompt(label) == structure
    # BTCV and TotalSegmentator name the portal/splenic vein differently: one canonical, the other a synonym
    assert get_structure("portal_and_splenic_vein").name == "portal_vein_and_splenic_vein"
    assert "portal_and_splenic_vein" in get_structure("portal_vein_and_splenic_vein").synonyms


def test_table_covers_totalsegmentator_abdominal_classes(shared_data):
    totalseg = totalseg_labels(shared_data)
    for name in TOTALSEG_ABDOMINAL:
        assert name in totalseg, f"{name} is not a TotalSegmentator label name"
        assert get_structure(name).name == name


def test_every_canonical_name_is_a_dataset_label_name(shared_data):
    known = set(dataset_labels(shared_data, "btcv")) | set(dataset_labels(shared_data, "chaos_t2")) | totalseg_labels(shared_data)
    assert {s.name for s in structures()} <= known


def test_codes_and_colours_of_known_organs():
    # SNOMED CT codes and colours as in Slicer's General Anatomy list / SlicerTotalSegmentator
    expected = {
        "liver": (("SCT", "10200004", "Liver"), None, (221, 130, 101)),
        "spleen": (("SCT", "78961009", "Spleen"), None, (157, 108, 162)),
        "kidney_left": (("SCT", "64033007", "Kidney"), LEFT, (185, 102, 83)),
        "kidney_right": (("SCT", "64033007", "Kidney"), RIGHT, (185, 102, 83)),
        "adrenal_gland_right": (("SCT", "23451007", "Adrenal gland"), RIGHT, (249, 186, 150)),
        "gallbladder": (("SCT", "28231008", "Gallbladder"), None, (139, 150, 98)),
        "aorta": (("SCT", "15825003", "Aorta"), None, (224, 97, 76)),
        "inferior_vena_cava": (("SCT", "64131007", "Inferior vena cava"), None, (0, 151, 206)),
        "portal_vein_and_splenic_vein": (("SCT", "110765007", "Portal vein and splenic vein"), None, (0, 151, 206)),
        "pancreas": (("SCT", "15776009", "Pancreas"), None, (249, 180, 111)),
        "iliac_artery_left": (("SCT", "73634005", "Common iliac artery"), LEFT, (216, 101, 79)),
    }
    for name, (type_code, modifier, color) in expected.items():
        s = get_structure(name)
        assert (s.type, s.type_modifier, s.color) == (type_code, modifier, color), name


def test_every_name_display_name_and_synonym_resolves_to_its_structure():
    for s in structures():
        for text in (s.name, s.display_name, *s.synonyms):
            assert resolve_prompt(text).name == s.name, text
            assert resolve_prompt(f"Segment the {text} in this CT scan, please.").name == s.name, text


def test_table_file_is_the_bundled_one():
    assert TABLE == REPO / "Resources" / "Terminology" / "structures.json"
    assert [s.name for s in load_table(TABLE)] == [s.name for s in structures()]


# --- get_structure -----------------------------------------------------------------------------


def test_get_structure_by_canonical_name():
    s = get_structure("kidney_left")
    assert s.display_name == "left kidney"
    assert s.type_modifier == LEFT
    assert get_structure("liver").type == ("SCT", "10200004", "Liver")


@pytest.mark.parametrize(
    "bad, close",
    [("kidney_lft", "kidney_left"), ("Liver", "liver"), ("left kidney", "kidney_left"), ("IVC", "inferior_vena_cava")],
)
def test_get_structure_unknown_lists_close_names(bad, close):
    message = error_of(get_structure, bad)
    assert message.startswith(f"Unknown structure name {bad!r}. Did you mean: {close}")
    assert "textdiffseg models" in message


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_get_structure_empty(bad):
    assert "non-empty" in error_of(get_structure, bad)


# --- resolve_prompt ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, name",
    [
        ("liver", "liver"),
        ("LIVER", "liver"),
        ("Segment the left kidney in this CT", "kidney_left"),
        ("L kidney", "kidney_left"),
        ("lt kidney", "kidney_left"),
        ("left renal", "kidney_left"),
        ("LK", "kidney_left"),
        ("kidney left", "kidney_left"),
        ("kidney (left)", "kidney_left"),
        ("R kidney", "kidney_right"),
        ("rt. kidney", "kidney_right"),
        ("the right-sided kidney", "kidney_right"),
        ("segment the liver in this CT scan", "liver"),
        ("Please segment the spleen in this MR scan.", "spleen"),
        ("right adrenal", "adrenal_gland_right"),
        ("adrenal gland, left", "adrenal_gland_left"),
        ("IVC", "inferior_vena_cava"),
        ("Spleen.", "spleen"),
        ("kidney_left", "kidney_left"),
        ("adrenal_gland_right", "adrenal_gland_right"),
        ("GB", "gallbladder"),
        ("gall bladder", "gallbladder"),
        ("bladder", "urinary_bladder"),
        ("portal vein", "portal_vein_and_splenic_vein"),
        ("portal_and_splenic_vein", "portal_vein_and_splenic_vein"),
        ("left common iliac vein", "iliac_vena_left"),
        ("R iliac artery", "iliac_artery_right"),
        ("oesophagus", "esophagus"),
        ("small intestine", "small_bowel"),
        ("L1", "vertebrae_L1"),
        ("  segment L5 please ", "vertebrae_L5"),
    ],
)
def test_resolve_prompt(prompt, name):
    assert resolve_prompt(prompt).name == name


def test_resolve_prompt_returns_the_table_structure():
    assert resolve_prompt("L kidney") == get_structure("kidney_left")


@pytest.mark.parametrize("prompt", ["kidney", "Segment the kidney", "KIDNEY."])
def test_side_is_required_for_paired_structures(prompt):
    message = error_of(resolve_prompt, prompt)
    assert "ambiguous" in message
    assert "'left kidney'" in message and "'right kidney'" in message


def test_adrenal_without_side_is_ambiguous():
    message = error_of(resolve_prompt, "adrenal")
    assert "'left adrenal gland'" in message and "'right adrenal gland'" in message


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", "?!."])
def test_empty_prompt(prompt):
    assert error_of(resolve_prompt, prompt).startswith("empty prompt")


def test_misspelt_prompt_suggests_nearest():
    message = error_of(resolve_prompt, "gallblader")
    assert message.startswith("Unknown structure 'gallblader'. Did you mean: gallbladder")
    assert "Run `textdiffseg models`" in message


def test_misspelt_sided_prompt_suggests_that_side():
    message = error_of(resolve_prompt, "segment the left kidny")
    assert "Unknown structure 'left kidny'" in message
    assert "Did you mean: left kidney" in message


def test_extra_words_are_not_silently_dropped():
    message = error_of(resolve_prompt, "liver tumour")
    assert "Unknown structure 'liver tumour'" in message
    assert "Did you mean: liver" in message


def test_several_structures_in_one_prompt():
    message = error_of(resolve_prompt, "liver and spleen")
    assert "several structures (liver, spleen)" in message
    assert "';'" in message


@pytest.mark.parametrize("prompt", ["left and right kidney", "left kidney right"])
def test_both_sides(prompt):
    assert "both left and right" in error_of(resolve_prompt, prompt)


def test_side_on_unpaired_structure():
    message = error_of(resolve_prompt, "left liver")
    assert "'liver' has no left or right" in message and "remove 'left'" in message


def test_side_without_structure():
    assert "names a side but no structure" in error_of(resolve_prompt, "the left one")
    assert "names no structure" in error_of(resolve_prompt, "segment this CT scan")


def test_prompt_must_be_text():
    assert "must be text" in error_of(resolve_prompt, 3)


# --- split_prompts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("liver; spleen", ["liver", "spleen"]),
        ("liver, spleen", ["liver", "spleen"]),
        ("liver\nspleen", ["liver", "spleen"]),
        ("liver\r\n\r\n spleen ;; left kidney,", ["liver", "spleen", "left kidney"]),
        ("Segment the left kidney in this CT", ["Segment the left kidney in this CT"]),
        ("", []),
        (" ;\n, ", []),
    ],
)
def test_split_prompts(text, expected):
    assert split_prompts(text) == expected


def test_split_then_resolve():
    names = [s.name for s in resolve_prompts(split_prompts("liver; L kidney\nIVC"))]
    assert names == ["liver", "kidney_left", "inferior_vena_cava"]


def test_two_prompts_naming_one_structure_are_refused():
    with pytest.raises(PromptError, match="'liver' and 'HEPAR' both name liver; give each structure once"):
        resolve_prompts(["liver", "spleen", "HEPAR"])


# --- terminology_entry -------------------------------------------------------------------------


def test_terminology_entry_exact_strings():
    assert terminology_entry(get_structure("liver")) == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert terminology_entry(get_structure("kidney_left")) == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^7771000^Left"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert terminology_entry("kidney_left") == terminology_entry(get_structure("kidney_left"))
    # each structure in the list that has its codes (test_slicer_terminology.py checks them against the lists)
    assert terminology_entry("iliac_vena_right") == (
        "Segmentation category and type - DICOM master list"
        "~SCT^123037004^Anatomical Structure~SCT^46027005^Common iliac vein~SCT^24028007^Right"
        "~Anatomic codes - DICOM master list~^^~^^"
    )
    assert terminology_entry("vertebrae_L1") == (
        "Segmentation category and type - TextDiffSeg"
        "~SCT^123037004^Anatomical Structure~SCT^66794005^L1 vertebra~^^"
        "~Anatomic codes - DICOM master list~^^~^^"
    )


def test_slicerio_parses_every_terminology_entry():
    for s in structures():
        parsed = slicerio.segmentation.terminology_entry_from_string(terminology_entry(s))
        assert parsed["contextName"] == s.context
        assert parsed["category"] == list(s.category)
        assert parsed["type"] == list(s.type)
        assert parsed.get("typeModifier") == (list(s.type_modifier) if s.type_modifier else None)
        assert parsed["anatomicContextName"] == "Anatomic codes - DICOM master list"
        assert "anatomicRegion" not in parsed
        # slicerio writes back exactly the string Slicer would store
        assert slicerio.segmentation.terminology_entry_to_string(parsed) == terminology_entry(s)


def test_terminology_entry_survives_a_seg_nrrd_file(tmp_path):
    segmentation = slicerio.segmentation.create_segmentation((4, 4, 4), np.eye(4))
    for index, name in enumerate(["liver", "kidney_right"]):
        s = get_structure(name)
        mask = np.zeros((4, 4, 4), dtype=bool)
        mask[index, :, :] = True
        slicerio.segmentation.add_segment(
            segmentation,
            mask,
            {"id": name, "name": s.display_name, "color": [c / 255 for c in s.color], "tags": {"TerminologyEntry": terminology_entry(s)}},
        )
    path = tmp_path / "two.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    read = slicerio.read_segmentation(str(path), skip_voxels=True)
    by_id = {segment["id"]: segment for segment in read["segments"]}
    assert by_id["liver"]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert "typeModifier" not in by_id["liver"]["terminology"]
    assert by_id["kidney_right"]["terminology"]["type"] == ["SCT", "64033007", "Kidney"]
    assert by_id["kidney_right"]["terminology"]["typeModifier"] == list(RIGHT)
    # slicerio finds the segment by terminology, as a Slicer user would
    wanted = slicerio.segmentation.terminology_entry_from_string(terminology_entry("kidney_right"))
    assert [seg["id"] for seg in slicerio.segmentation.segments_from_terminology(read, wanted)] == ["kidney_right"]


def test_terminology_entry_rejects_other_input():
    assert "Unknown structure name" in error_of(terminology_entry, "not_a_structure")
    assert "needs a Structure" in error_of(terminology_entry, 42)
    bad = dataclasses.replace(get_structure("liver"), type=("SCT", "1~2", "Liver"))
    assert "TerminologyEntry cannot hold" in error_of(terminology_entry, bad)
    bad = dataclasses.replace(get_structure("liver"), context="General~Anatomy")
    assert "context 'General~Anatomy', which a TerminologyEntry cannot hold" in error_of(terminology_entry, bad)


# --- completions -------------------------------------------------------------------------------


def test_completions_prefix_then_containing():
    assert completions("liv")[0] == "liver"
    assert completions("LIV") == completions("liv")
    kid = completions("kid")
    assert "left kidney" in kid and "right kidney" in kid
    assert all("kid" in c.lower() for c in kid)
    # starting with the prefix (display names, then synonyms) before merely containing it
    assert completions("spl") == [
        "spleen", "splenic parenchyma", "splenic vein", "splenoportal vein",
        "portal vein and splenic vein", "portal_and_splenic_vein", "portal and splenic veins", "portosplenic vein",
    ]


def test_completions_include_synonyms_and_abbreviations():
    assert "IVC" in completions("iv")
    assert "L kidney" in completions("l k", limit=50)


def test_completions_limit_and_empty():
    assert len(completions("", limit=5)) == 5
    assert completions("", limit=3) == [s.display_name for s in structures()[:3]]
    assert completions("liver", limit=0) == []
    assert completions("zzzz") == []
    assert len(completions("a")) == 10


# --- table validation --------------------------------------------------------------------------


def test_load_table_accepts_a_valid_table(tmp_path):
    path = write_table(tmp_path, [entry("liver", "liver", ["hepar"])])
    assert load_table(path) == [
        Structure("liver", "liver", ("hepar",), (10, 20, 30), ANATOMICAL_STRUCTURE, ("SCT", "10200004", "Liver"), None)
    ]


def test_load_table_rejects_duplicate_names(tmp_path):
    path = write_table(tmp_path, [entry("liver", "liver"), entry("liver", "the liver again")])
    assert "'liver' appears twice" in error_of(load_table, path)


@pytest.mark.parametrize("color", [(0, 0, 256), (-1, 0, 0), (1, 2), (1.0, 2, 3), (True, 2, 3)])
def test_load_table_rejects_bad_colours(tmp_path, color):
    path = write_table(tmp_path, [entry("liver", "liver", color=color)])
    assert "color must be three integers from 0 to 255" in error_of(load_table, path)


def test_load_table_rejects_a_synonym_of_two_structures(tmp_path):
    path = write_table(
        tmp_path,
        [entry("liver", "liver", ["big organ"]), entry("spleen", "spleen", ["Big-Organ"], code="78961009", meaning="Spleen")],
    )
    message = error_of(load_table, path)
    assert "synonym of both 'liver' and 'spleen'" in message


def test_load_table_rejects_a_synonym_equal_to_another_display_name(tmp_path):
    path = write_table(tmp_path, [entry("liver", "liver"), entry("spleen", "spleen", ["Liver"], code="78961009", meaning="Spleen")])
    assert "synonym of both 'liver' and 'spleen'" in error_of(load_table, path)


def test_load_table_rejects_wrong_side(tmp_path):
    path = write_table(tmp_path, [entry("kidney_left", "left kidney", ["R kidney"], modifier=LEFT, code="64033007", meaning="Kidney")])
    assert "names the wrong side" in error_of(load_table, path)


def test_load_table_rejects_bad_fields(tmp_path):
    good = entry("liver", "liver")
    cases = [
        ({k: v for k, v in good.items() if k != "type"}, "lacks type"),
        ({**good, "colour": [1, 2, 3]}, "unknown field(s) colour"),
        ({**good, "name": "Left Kidney"}, "snake_case"),
        ({**good, "type": ["SCT", "10200004"]}, "three non-empty strings"),
        ({**good, "type": ["SCT", "1|2", "Liver"]}, "TerminologyEntry tag cannot hold"),
        ({**good, "synonyms": "hepar"}, "list of non-empty strings"),
        ({k: v for k, v in good.items() if k != "context"}, "lacks context"),
        ({**good, "context": "General^Anatomy"}, "context must be the name of a terminology context"),
    ]
    for bad, expected in cases:
        path = write_table(tmp_path, [copy.deepcopy(bad)])
        assert expected in error_of(load_table, path), expected


def test_load_table_rejects_unreadable_files(tmp_path):
    missing = tmp_path / "missing.json"
    assert "does not exist" in error_of(load_table, missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    assert "cannot be read as JSON" in error_of(load_table, broken)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"anatomic_context_name": "y", "structures": []}))
    assert "non-empty 'structures' list" in error_of(load_table, empty)


# --- import hygiene ----------------------------------------------------------------------------


def test_module_imports_no_torch_slicer_or_qt():
    code = (
        "import sys; import TextDiffSegLib.terminology as t; t.structures(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'slicer', 'qt', 'PySide6', 'PyQt5')))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
