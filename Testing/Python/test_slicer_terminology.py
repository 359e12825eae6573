"""The terminology entry of every structure names codes that are in the terminology context (list)
it names, as Slicer's own terminology logic (the ``slicer-core`` wheel) reads the lists: Slicer's
General Anatomy and DICOM master lists (excerpts in ``Testing/Data/SlicerTerminologies``, see its
README) and TextDiffSeg's list for the structures no Slicer list has. The colour is the list's, and
Slicer writes the entry back exactly as TextDiffSeg writes it.
"""

from pathlib import Path

import pytest

from TextDiffSegLib import terminology
from TextDiffSegLib.resources import resources_dir

slicer = pytest.importorskip("slicer")

SLICER_LISTS = Path(__file__).resolve().parents[1] / "Data" / "SlicerTerminologies"
CONTEXT_FILES = {
    terminology.GENERAL_ANATOMY: SLICER_LISTS / "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.excerpt.json",
    "Segmentation category and type - DICOM master list":
        SLICER_LISTS / "SegmentationCategoryTypeModifier-DICOM-Master.excerpt.json",
    "Segmentation category and type - TextDiffSeg": resources_dir() / terminology.CONTEXT_RELATIVE_PATH,
}


@pytest.fixture(scope="module")
def logic():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for name, path in CONTEXT_FILES.items():
        assert logic.LoadTerminologyFromFile(str(path)) == name, path
    return logic


def _code(coded) -> tuple[str, str, str]:
    return coded.GetCodingSchemeDesignator(), coded.GetCodeValue(), coded.GetCodeMeaning()


def _find(entries, code):
    """The entry with ``code``'s coding scheme and value (Slicer's match), or None."""
    return next((entry for entry in entries if _code(entry)[:2] == tuple(code[:2])), None)


def _categories(logic, context):
    categories = [slicer.vtkSlicerTerminologyCategory() for _ in range(logic.GetNumberOfCategoriesInTerminology(context))]
    for index, category in enumerate(categories):
        logic.GetNthCategoryInTerminology(context, index, category)
    return categories


def _types(logic, context, category):
    types = [slicer.vtkSlicerTerminologyType() for _ in range(logic.GetNumberOfTypesInTerminologyCategory(context, category))]
    for index, type_ in enumerate(types):
        logic.GetNthTypeInTerminologyCategory(context, category, index, type_)
    return types


def _modifiers(logic, context, category, type_):
    count = logic.GetNumberOfTypeModifiersInTerminologyType(context, category, type_)
    modifiers = [slicer.vtkSlicerTerminologyType() for _ in range(count)]
    for index, modifier in enumerate(modifiers):
        logic.GetNthTypeModifierInTerminologyType(context, category, type_, index, modifier)
    return modifiers


@pytest.mark.parametrize("structure", terminology.structures(), ids=lambda structure: structure.name)
def test_every_structure_is_in_the_context_it_names(logic, structure):
    text = terminology.terminology_entry(structure)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(text, entry)
    context = entry.GetTerminologyContextName()
    assert context == structure.context and context in CONTEXT_FILES

    category = _find(_categories(logic, context), structure.category)
    assert category is not None, f"{structure.category} is no category of {context}"
    type_ = _find(_types(logic, context, category), structure.type)
    assert type_ is not None, f"{structure.name}: {structure.type} is not in {context}"
    assert (_code(category), _code(type_)) == (structure.category, structure.type)
    shown = type_
    if structure.type_modifier is not None:
        shown = _find(_modifiers(logic, context, category, type_), structure.type_modifier)
        assert shown is not None, f"{structure.name}: {structure.type_modifier} is no modifier of {structure.type} in {context}"
        assert _code(shown) == structure.type_modifier
    assert shown.GetRecommendedDisplayRGBValue() == structure.color, structure.name

    assert logic.SerializeTerminologyEntry(entry) == text


def test_textdiffseg_list_holds_exactly_the_structures_that_name_it(logic):
    context = "Segmentation category and type - TextDiffSeg"
    (category,) = _categories(logic, context)
    listed = {_code(type_) for type_ in _types(logic, context, category)}
    assert listed == {structure.type for structure in terminology.structures() if structure.context == context}
