"""The module's .ui file loads (PySide6, offscreen) and matches the module code that uses it.

The module itself needs Slicer, so its source is read as a syntax tree: every ``self.ui.<name>`` it
uses must exist in the .ui file, and every widget the parameter node drives must suit its type.
"""

import ast
import xml.etree.ElementTree as ET

import pytest

from slicer_ui import MODULE_FILE, UI_FILE, loadUi, moduleSource

pytest.importorskip("PySide6.QtUiTools")

from PySide6.QtWidgets import QWidget  # noqa: E402

# parameterNodeWrapper's GUI connectors (Slicer's guiConnectors.py): widget classes per value type
CONNECTORS = {
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "bool": {"QCheckBox", "QPushButton"},
    "str": {"QLineEdit", "QTextEdit"},
    "choice": {"QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}
SLICER_WIDGETS = {"qMRMLWidget", "ctkCollapsibleButton", "qMRMLNodeComboBox", "ctkPathLineEdit"}


def _uiNamesUsedByTheModule() -> set[str]:
    names = set()
    for node in ast.walk(moduleSource()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            names.add(node.attr)
    return names


def _parameterFields() -> dict[str, str]:
    """Field name to connector kind, from the @parameterNodeWrapper class in the module source."""
    for node in ast.walk(moduleSource()):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            fields = {}
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign):
                    annotation = ast.unparse(statement.annotation)
                    if annotation.startswith("vtkMRML"):
                        kind = "node"
                    elif "Choice(" in annotation:
                        kind = "choice"
                    else:
                        kind = annotation.removeprefix("Annotated[").split(",")[0].rstrip("]")
                    fields[statement.target.id] = kind
            return fields
    raise AssertionError("no @parameterNodeWrapper class in the module")


def _widgets():
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def test_the_ui_file_loads_offscreen_with_stand_ins_for_slicers_widgets():
    panel = loadUi()
    assert panel.objectName() == "TextDiffSeg"
    assert panel.findChild(QWidget, "generateButton").text() == "Generate"
    assert panel.findChild(QWidget, "inputVolumeSelector").property("nodeTypes") == ["vtkMRMLScalarVolumeNode"]


def test_every_widget_the_module_uses_is_in_the_ui_file():
    panel = loadUi()
    used = _uiNamesUsedByTheModule()
    assert {"generateButton", "galleryListWidget", "acceptButton", "fuseButton", "editButton"} <= used
    missing = sorted(name for name in used if panel.findChild(QWidget, name) is None)
    assert not missing, f"the module uses widgets the .ui file lacks: {missing}"


def test_the_module_never_stores_anything_else_in_self_ui():
    # connectGui() calls .property() on every value of self.ui: it must hold widgets only
    for node in ast.walk(moduleSource()):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute):
                    assert target.value.attr != "ui", f"line {node.lineno} assigns self.ui.{target.attr}"


def test_parameter_widgets_suit_their_parameters():
    fields = _parameterFields()
    bound = {
        widget.find("property[@name='SlicerParameterName']/string").text: widget.get("class")
        for widget in _widgets().values()
        if widget.find("property[@name='SlicerParameterName']") is not None
    }
    for name, widgetClass in bound.items():
        assert name in fields, f"the .ui binds {name!r}, which the parameter node lacks"
        assert widgetClass in CONNECTORS[fields[name]], f"{name}: a {widgetClass} cannot show a {fields[name]}"
    # the model selector is filled from the model registry by the module, not by connectGui, and the weights file
    # (a ctkPathLineEdit, which connectGui binds to a pathlib.Path, not a str) follows it there too
    assert set(fields) - set(bound) == {"model", "modelWeights"}


def test_every_node_selector_gets_the_scene_and_custom_widgets_are_declared():
    root = ET.parse(UI_FILE).getroot()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors and selectors <= connected
    used = {w.get("class") for w in root.iter("widget")} - {c for c in _qtClasses()}
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert used <= declared <= SLICER_WIDGETS


def _qtClasses():
    from PySide6.QtUiTools import QUiLoader

    return QUiLoader().availableWidgets()


def test_the_module_loads_no_heavy_package_when_slicer_starts():
    # module-level imports run at Slicer's start-up, before the engine's packages may be installed
    allowed = {"os", "shutil", "sys", "tempfile", "pathlib", "typing", "qt", "vtk", "slicer",
               "slicer.i18n", "slicer.ScriptedLoadableModule", "slicer.util", "slicer.parameterNodeWrapper",
               "slicer.parameterNodeWrapper.guiConnectors", "TextDiffSegHelpers", "TextDiffSegLib",
               "TextDiffSegLib.errors"}
    for node in moduleSource().body:
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module]
        else:
            continue
        assert set(modules) <= allowed, f"{MODULE_FILE.name} line {node.lineno} imports {modules} at load time"


def _onlyWithMainWindow(call: ast.Call, parents: dict) -> bool:
    """Whether ``call`` runs only when Slicer has a main window: under ``if not ...noMainWindow`` or in the
    ``else`` of ``if ...noMainWindow``."""
    child, node = call, parents.get(call)
    while node is not None:
        if isinstance(node, ast.If) and "noMainWindow" in ast.unparse(node.test):
            negated = isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
            return (child in node.body) == negated
        child, node = node, parents.get(node)
    return False


def test_the_module_selector_is_used_only_when_there_is_a_main_window():
    # slicer.util.selectModule() and selectedModule() raise without one (Slicer --no-main-window)
    tree = moduleSource()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and ast.unparse(node.func) in ("slicer.util.selectModule", "slicer.util.selectedModule")]
    assert calls
    for call in calls:
        assert _onlyWithMainWindow(call, parents), f"line {call.lineno}: {ast.unparse(call)} needs a main window"


def test_the_prompt_box_gets_one_completer():
    # onPromptEdited used to make a QCompleter at every keystroke, and none was ever freed
    for function in ast.walk(moduleSource()):
        if isinstance(function, ast.FunctionDef) and function.name != "setup":
            made = [node.lineno for node in ast.walk(function)
                    if isinstance(node, ast.Call) and ast.unparse(node.func) == "qt.QCompleter"]
            assert not made, f"{function.name} makes a QCompleter (line {made[0]})"
