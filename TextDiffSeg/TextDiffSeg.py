import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)
from slicer.parameterNodeWrapper.guiConnectors import QLineEditToStrConnector

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from TextDiffSegHelpers import paths

# The engine (TextDiffSegLib) and Resources/ sit beside this file in an installed extension and one
# folder up in a source checkout: make the engine importable from either.
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
ENGINE_ROOT = str(paths.engineRoot(MODULE_DIR))
if ENGINE_ROOT not in sys.path:
    sys.path.insert(0, ENGINE_ROOT)

# Only the pure-Python parts of the engine are imported here. The rest (numpy, SimpleITK and the
# packages of requirements.txt) is imported where it is used, after the user agreed to install it.
# TextDiffSeg uses torch only in its worker process; Slicer's process imports it once, when the
# PyTorch extension's installer installs it (TextDiffSegHelpers/install.py).
from TextDiffSegLib import registry, terminology  # noqa: E402
from TextDiffSegLib.errors import ModelError  # noqa: E402

CHOOSE_MODEL_FOLDER = "<choose folder>"
CHOOSE_SEVERAL_MODELS = "<choose several>"
THUMBNAIL_SIZE = 128
ROLE_ATTRIBUTE = "TextDiffSeg.Role"


#
# TextDiffSeg
#


class TextDiffSeg(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TextDiffSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TextDiffSeg contributors"]
        self.parent.helpText = _("""
Segment anatomy in CT and MR from a text prompt ("liver; left kidney") with diffusion models.
Several plausible segmentations are sampled per structure; pick one, or fuse those you like, then
refine it in the Segment Editor. The same logic runs from the Python console:
<code>import TextDiffSeg; TextDiffSeg.TextDiffSegLogic().segment(volumeNode, "liver")</code>.
See the <a href="https://github.com/TextDiffSeg/SlicerTextDiffSeg">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer's scripted module template (Jean-Christophe Fillion-Robin, Kitware Inc., Andras
Lasso, PerkLab, and Steve Pieper, Isomics, Inc.) and the PyTorch extension.
""")
        self.parent.icon = qt.QIcon(paths.resourcePath(MODULE_DIR, "Icons/TextDiffSeg.png"))
        slicer.app.connect("startupCompleted()", self.loadTerminology)

    @staticmethod
    def loadTerminology() -> None:
        """Let Slicer's terminology selector know the structures that no Slicer list has (lumbar vertebrae...)."""
        path = paths.resourcePath(MODULE_DIR, terminology.CONTEXT_RELATIVE_PATH.as_posix())
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(path)


#
# TextDiffSegParameterNode
#


@parameterNodeWrapper
class TextDiffSegParameterNode:
    """
    The module's settings, saved with the scene.

    inputVolume - The CT or MR volume to segment.
    prompt - What to segment; several structures separated by ";".
    model - A registered model name or a model folder; empty for the default model; several names joined by
        commas ("a,b") for an ensemble, as the command line's --model.
    modelWeights - An ensemble's weight of each model per structure: a JSON file of them or the report of
        `textdiffseg evaluate` of the same models, as the command line's --model-weights; empty: the models alike.
    numProposals - Proposals sampled per structure.
    steps - Denoising steps per proposal; 0 for the model's default.
    seed - Random seed of the first proposal.
    device - Where the model runs.
    outputSegmentation - Where accepted proposals go; a new segmentation when none.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    prompt: str = ""
    model: str = ""
    modelWeights: str = ""
    numProposals: Annotated[int, WithinRange(1, 16)] = 5
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    device: Annotated[str, Choice(["auto", "cuda", "cpu", "mps"])] = "auto"  # the engine's machine.DEVICES
    outputSegmentation: vtkMRMLSegmentationNode


class PromptLineEditConnector(QLineEditToStrConnector):
    """Slicer's connector of a QLineEdit to a str parameter, but one that leaves the text alone when it holds the value.

    Setting a QLineEdit's text moves its cursor to the end, and before Slicer 5.10 the connector set it
    again after every keystroke, so the cursor jumped to the end while typing (Slicer issue #8620).
    """

    def write(self, value: str) -> None:
        if self.read() != value:
            super().write(value)


#
# TextDiffSegWidget
#


class TextDiffSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._proposals = []  # the last run's Proposals, one per prompt
        self._galleries = []  # a Gallery per prompt
        self._volumeNode = None  # the volume the proposals lie on
        self._lastSegment = None  # (segmentation node, segment ID) accepted last
        self._promptCompletions = None  # the prompt box's completer's list, updated as the user types
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)

    def resourcePath(self, filename: str) -> str:
        """Resources/ is shared with the engine; see ``TextDiffSegHelpers.paths``."""
        return paths.resourcePath(MODULE_DIR, filename)

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TextDiffSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets. Make sure that in Qt designer the top-level qMRMLWidget's
        # "mrmlSceneChanged(vtkMRMLScene*)" signal in is connected to each MRML widget's.
        # "setMRMLScene(vtkMRMLScene*)" slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # Create logic class. Logic implements all computations that should be possible to run
        # in batch mode, without a graphical user interface.
        self.logic = TextDiffSegLogic()

        # Connections

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.promptLineEdit.connect("textEdited(QString)", self.onPromptEdited)
        self.ui.modelComboBox.connect("activated(int)", self.onModelActivated)
        self.ui.modelWeightsPathLineEdit.connect("currentPathChanged(QString)", self.onModelWeightsChanged)
        self.ui.generateButton.connect("clicked(bool)", self.onGenerateButton)
        self.ui.structureComboBox.connect("currentIndexChanged(int)", self.showGallery)
        self.ui.galleryListWidget.connect("itemSelectionChanged()", self.onGallerySelectionChanged)
        self.ui.acceptButton.connect("clicked(bool)", self.onAcceptButton)
        self.ui.fuseButton.connect("clicked(bool)", self.onFuseButton)
        self.ui.uncertaintyCheckBox.connect("toggled(bool)", self.onUncertaintyToggled)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self._pollTimer.connect("timeout()", self.onPoll)

        completer = qt.QCompleter(self.ui.promptLineEdit)
        self._promptCompletions = qt.QStringListModel(completer)
        completer.setModel(self._promptCompletions)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        completer.setCompletionMode(qt.QCompleter.UnfilteredPopupCompletion)
        self.ui.promptLineEdit.setCompleter(completer)

        self.ui.progressBar.hide()
        self.ui.structureComboBox.hide()

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._pollTimer.stop()
        self.removeObservers()
        self.logic.cleanup()
        if _sharedWorker is not None:
            _sharedWorker.stop()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)
        if self.logic.isRunning():
            self.logic.cancel()
            self._setRunning(False)
        self._lastSegment = None
        self.showResults([], None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            from TextDiffSegHelpers import mrml

            volumeNode = mrml.defaultInputVolume(slicer.mrmlScene)
            if volumeNode:
                self._parameterNode.inputVolume = volumeNode

    def setParameterNode(self, inputParameterNode: Optional[TextDiffSegParameterNode]) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection. What connectGui(self.ui) would connect, but the prompt box
            # through PromptLineEditConnector.
            widgets = {widget.property("SlicerParameterName"): widget for widget in vars(self.ui).values()
                       if widget.property("SlicerParameterName")}
            widgets["prompt"] = PromptLineEditConnector(self.ui.promptLineEdit)
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(widgets)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """The model selector (filled from the registry, not by connectGui), the model weights (asked for an
        ensemble only) and the buttons follow the parameters."""
        if self.ui.modelComboBox.currentIndex < 0 or self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) != self._chosenModel():
            self.populateModels()
        ensemble = len(registry.model_names(self._chosenModel())) > 1
        self.ui.modelWeightsLabel.visible = self.ui.modelWeightsPathLineEdit.visible = ensemble
        if self._parameterNode and self.ui.modelWeightsPathLineEdit.currentPath != self._parameterNode.modelWeights:
            self.ui.modelWeightsPathLineEdit.currentPath = self._parameterNode.modelWeights
        self._updateButtons()

    # --- inputs -------------------------------------------------------------------------------

    def onPromptEdited(self, text: str) -> None:
        """Offer completions for the prompt being typed (the last one, after any ';')."""
        from TextDiffSegHelpers.prompts import promptCompletions

        self._promptCompletions.setStringList(promptCompletions(text))
        if text.strip():
            self.ui.promptLineEdit.completer().complete()

    def _chosenModel(self) -> str:
        return (self._parameterNode.model if self._parameterNode else "") or registry.default_model_name()

    def populateModels(self) -> None:
        """Fill the model selector from the model registry (JSON only: no torch in Slicer's process)."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        default = registry.default_model_name()
        descriptions = {info.name: self.logic.describeModel(info) for info in registry.list_models()}
        for name, description in descriptions.items():
            combo.addItem(name + (_(" (default)") if name == default else ""), name)
            combo.setItemData(combo.count - 1, description, qt.Qt.ToolTipRole)
        chosen = self._chosenModel()
        names = registry.model_names(chosen)
        if len(names) > 1:  # an ensemble
            combo.addItem(" + ".join(names), chosen)
            combo.setItemData(combo.count - 1, "\n\n".join(f"{name}: {descriptions.get(name, name)}" for name in names),
                              qt.Qt.ToolTipRole)
        elif combo.findData(chosen) < 0:  # a model folder on this computer
            combo.addItem(_("{folder} (folder)").format(folder=os.path.basename(chosen.rstrip("/\\"))), chosen)
            combo.setItemData(combo.count - 1, chosen, qt.Qt.ToolTipRole)
        combo.addItem(_("Choose a model folder..."), CHOOSE_MODEL_FOLDER)
        combo.addItem(_("Ask several models together..."), CHOOSE_SEVERAL_MODELS)
        combo.currentIndex = combo.findData(chosen)
        combo.blockSignals(wasBlocked)
        self.ui.modelInfoLabel.text = combo.itemData(combo.currentIndex, qt.Qt.ToolTipRole) or ""

    def onModelActivated(self, index: int) -> None:
        model = self.ui.modelComboBox.itemData(index)
        if model == CHOOSE_MODEL_FOLDER:
            model = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a TextDiffSeg model folder"))
        elif model == CHOOSE_SEVERAL_MODELS:
            model = self._chooseSeveralModels()
        if model and self._parameterNode:
            self._parameterNode.model = model
        self.populateModels()

    def onModelWeightsChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.modelWeights = path

    def _chooseSeveralModels(self) -> str:
        """The registered models the user ticks, joined by commas (an ensemble); empty when cancelled."""
        dialog = qt.QDialog(slicer.util.mainWindow())
        dialog.setWindowTitle(_("Ask several models together"))
        layout = qt.QVBoxLayout(dialog)
        explanation = qt.QLabel(_(
            "Each structure is asked of every ticked model that segments it. Their proposals are shown together, "
            "labelled with their model, and fused into one segmentation and one uncertainty map."))
        explanation.wordWrap = True
        layout.addWidget(explanation)
        modelList = qt.QListWidget()
        ticked = registry.model_names(self._chosenModel())
        for info in registry.list_models():
            item = qt.QListWidgetItem(info.name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if info.name in ticked else qt.Qt.Unchecked)
            item.setToolTip(self.logic.describeModel(info))
            modelList.addItem(item)
        layout.addWidget(modelList)
        buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Ok | qt.QDialogButtonBox.Cancel)
        buttons.connect("accepted()", dialog.accept)
        buttons.connect("rejected()", dialog.reject)
        layout.addWidget(buttons)
        if not dialog.exec_():
            return ""
        return ",".join(modelList.item(row).text() for row in range(modelList.count)
                        if modelList.item(row).checkState() == qt.Qt.Checked)

    def _updateButtons(self) -> None:
        running = self.logic.isRunning()
        parameters = self._parameterNode
        ready = bool(parameters and parameters.inputVolume and parameters.prompt.strip())
        self.ui.generateButton.enabled = running or ready
        self.ui.generateButton.text = _("Cancel") if running else _("Generate")
        if not running:
            self.ui.generateButton.toolTip = (
                _("Sample proposals for each structure in the prompt.") if ready
                else _("Choose an input volume and type what to segment.")
            )
        gallery = self._currentGallery()
        self.ui.acceptButton.enabled = bool(gallery and gallery.canAccept())
        self.ui.fuseButton.enabled = bool(gallery and gallery.canFuse())
        self.ui.uncertaintyCheckBox.enabled = gallery is not None
        self.ui.editButton.enabled = self._lastSegment is not None

    # --- running ------------------------------------------------------------------------------

    def onGenerateButton(self) -> None:
        """Start sampling; while it runs, the same button cancels."""
        if self.logic.isRunning():
            self.logic.cancel()
            self._setRunning(False)
            self.ui.statusLabel.text = _("Cancelled.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.ensureRequirements():
                return
            parameters = self._parameterNode
            model = registry.model_request(parameters.model)
            self.logic.segment(
                parameters.inputVolume, parameters.prompt, numProposals=parameters.numProposals, seed=parameters.seed,
                model=model, device=parameters.device,
                modelWeights=(parameters.modelWeights or None) if isinstance(model, list) else None,
                steps=parameters.steps or None, waitForCompletion=False,
            )
            self.ui.uncertaintyCheckBox.checked = False
            self.showResults([], None)
            self._volumeNode = parameters.inputVolume
            self.ui.statusLabel.text = _("Starting...")
            self._setRunning(True)

    def ensureRequirements(self) -> bool:
        """Install missing Python packages if the user agrees; whether they are all there now."""
        from TextDiffSegHelpers import install

        install.checkPlatform()
        missing = self.logic.missingRequirements()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _("TextDiffSeg needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
              "Install them now? It may take several minutes and download a few GB.").format(packages="\n".join(missing)),
            _("Install TextDiffSeg's Python packages"),
        ):
            return False
        self.logic.installRequirements()
        return True

    def _setRunning(self, running: bool) -> None:
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        if running:
            self._pollTimer.start()
        else:
            self._pollTimer.stop()
        self._updateButtons()

    def onPoll(self) -> None:
        """Show the worker's progress; show the proposals when they come (called by a timer)."""
        for event in self.logic.pollEvents():
            if event["type"] == "progress":
                self.ui.progressBar.value = int(round(100 * event.get("fraction", 0.0)))
                self.ui.statusLabel.text = f"{event.get('stage', '')}: {event.get('message', '')}"
                continue
            self._setRunning(False)
            if event["type"] == "result":
                warnings = [_("Warning: {warning}.").format(warning=item.warning)
                            for item in event["proposals"] if item.warning]
                self.ui.statusLabel.text = "\n".join(
                    [_("Done. Select a proposal to see it; accept one or fuse several."), *warnings])
                self.showResults(event["proposals"], self._volumeNode)
            elif event["type"] == "error":
                self.ui.statusLabel.text = _("Failed.")
                slicer.util.errorDisplay(_("Segmentation failed: {message}").format(message=event.get("message", "")))

    # --- gallery ------------------------------------------------------------------------------

    def showResults(self, proposals: list, volumeNode) -> None:
        from TextDiffSegHelpers.gallery import Gallery

        self._proposals, self._volumeNode = proposals, volumeNode
        self._galleries = [Gallery(item.scores, item.models) for item in proposals]
        combo = self.ui.structureComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for item in proposals:
            combo.addItem(terminology.get_structure(item.structure).display_name)
        combo.blockSignals(wasBlocked)
        combo.visible = len(proposals) > 1
        self.showGallery()

    def _currentGallery(self):
        index = self.ui.structureComboBox.currentIndex
        return self._galleries[index] if 0 <= index < len(self._galleries) else None

    def _currentProposals(self):
        index = self.ui.structureComboBox.currentIndex
        return self._proposals[index] if 0 <= index < len(self._proposals) else None

    def showGallery(self) -> None:
        """Fill the gallery with the current structure's proposals, best agreement first."""
        listWidget = self.ui.galleryListWidget
        wasBlocked = listWidget.blockSignals(True)
        listWidget.clear()
        proposals, gallery = self._currentProposals(), self._currentGallery()
        if gallery is not None:
            for number in gallery.order():
                item = qt.QListWidgetItem(qt.QIcon(proposals.thumbnailPaths[number - 1]), gallery.label(number))
                item.setData(qt.Qt.UserRole, number)
                item.setToolTip(_("Proposal {number}: seed {seed}, agreement with the others {score:.2f}").format(
                    number=number, seed=proposals.seeds[number - 1], score=proposals.scores[number - 1]))
                listWidget.addItem(item)
                item.setSelected(number in gallery.selected)
        listWidget.blockSignals(wasBlocked)
        if gallery is not None:
            self.onGallerySelectionChanged()  # the preview follows the structure shown
        if self.ui.uncertaintyCheckBox.checked:
            self.onUncertaintyToggled(True)
        self._updateButtons()

    def onGallerySelectionChanged(self) -> None:
        """Show the selected proposals in the slice views."""
        gallery = self._currentGallery()
        if gallery is None:
            return
        gallery.select([item.data(qt.Qt.UserRole) for item in self.ui.galleryListWidget.selectedItems()])
        with slicer.util.tryWithErrorDisplay(_("Failed to show the proposal."), waitCursor=True):
            self.logic.showProposals(self._currentProposals(), gallery.selected, self._volumeNode)
        self._updateButtons()

    def _outputSegmentation(self):
        """The output segmentation; a new one if none is chosen."""
        if not self._parameterNode.outputSegmentation:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{self._volumeNode.GetName()} TextDiffSeg"))
            segmentationNode.CreateDefaultDisplayNodes()
            self._parameterNode.outputSegmentation = segmentationNode
        return self._parameterNode.outputSegmentation

    def onAcceptButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to accept the proposal."), waitCursor=True):
            segmentationNode = self._outputSegmentation()
            segmentId = self.logic.acceptProposal(
                self._currentProposals(), self._currentGallery().selected[0], self._volumeNode, segmentationNode)
            self._accepted(segmentationNode, segmentId)

    def onFuseButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to fuse the proposals."), waitCursor=True):
            segmentationNode = self._outputSegmentation()
            segmentId = self.logic.fuseProposals(
                self._currentProposals(), self._currentGallery().selected, self._volumeNode, segmentationNode)
            self._accepted(segmentationNode, segmentId)

    def _accepted(self, segmentationNode, segmentId: str) -> None:
        self._lastSegment = (segmentationNode, segmentId)
        self.ui.galleryListWidget.clearSelection()  # which also clears the preview
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        self.ui.statusLabel.text = _("Added segment '{name}' to {segmentation}.").format(
            name=name, segmentation=segmentationNode.GetName())
        self._updateButtons()

    def onUncertaintyToggled(self, show: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to show the uncertainty map."), waitCursor=True):
            self.logic.showUncertainty(self._currentProposals() if show else None, self._volumeNode)

    def onEditButton(self) -> None:
        """Open the Segment Editor on the last accepted segment."""
        segmentationNode, segmentId = self._lastSegment
        if not slicer.app.commandOptions().noMainWindow:  # without a main window there is no module panel to open
            slicer.util.selectModule("SegmentEditor")
        editor = slicer.util.getModuleWidget("SegmentEditor").editor
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(self._volumeNode)
        editor.setCurrentSegmentID(segmentId)


#
# TextDiffSegLogic
#


class TextDiffSegLogic(ScriptedLoadableModuleLogic):
    """This class should implement all the actual
    computation done by your module.  The interface
    should be such that other python code can import
    this class and make use of the functionality without
    requiring an instance of the Widget.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py

    Inference runs in the worker process that all logics of this Slicer session share (``sharedWorker``).
    Proposals are numbered from 1, as the gallery shows them.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._workDir = None
        self._request = None  # (request id, volume node, segmentation node) awaiting its answer

    def getParameterNode(self):
        return TextDiffSegParameterNode(super().getParameterNode())

    # --- dependencies and models --------------------------------------------------------------

    def missingRequirements(self) -> list:
        """Python packages the engine needs that Slicer's Python lacks (torch first)."""
        from TextDiffSegHelpers import install

        return install.missingRequirements(paths.resourcePath(MODULE_DIR, "requirements.txt"))

    def installRequirements(self) -> None:
        """Install the missing packages: torch through the PyTorch extension, the rest with pip."""
        from TextDiffSegHelpers import install

        install.installRequirements(self.missingRequirements(), slicer)

    @staticmethod
    def describeModel(info) -> str:
        """One paragraph about a registered model: what it segments and where its weights are."""
        try:
            registry.resolve_model(info.name, download=False)
            where = _("bundled") if info.path else _("downloaded")
        except ModelError:
            where = _("downloaded on first use ({size:.0f} MB)").format(size=info.size_bytes / 1e6)
        text = _("{description} {modality}, {family} family; {where}.").format(
            description=info.description, modality=info.modality, family=info.family, where=where)
        if info.structures:
            names = ", ".join(terminology.get_structure(name).display_name for name in info.structures)
            text += " " + _("Segments: {names}.").format(names=names)
        return text.strip()

    # --- segmenting ---------------------------------------------------------------------------

    def segment(self, volumeNode, prompts, numProposals=5, seed=0, model=None, device="auto", segmentationNode=None,
                waitForCompletion=True, steps=None, progressCallback=None, modelWeights=None):
        """Sample ``numProposals`` segmentations per prompt of ``volumeNode``.

        :param prompts: ``"liver; spleen"`` or a list of prompts.
        :param model: a registered model name or a model folder; None for the default model; a list of them for an
            ensemble, whose proposals are numbered across its models (``Proposals.models`` names each one's).
        :param device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (or ``"mps"`` on a Mac), as the command line's ``--device``.
        :param segmentationNode: if given, each prompt's fusion of all proposals is added to it.
        :param steps: denoising steps per proposal; None for the model's default.
        :param progressCallback: called with each progress event (``stage``, ``fraction``, ``message``).
        :param modelWeights: an ensemble's weight of each model per structure, ``{"pancreas": {"a": 1, "b": 0}}``, or
            the path of a JSON file of them or of an evaluate report of the same models (``--model-weights``); None:
            the models alike.
        :return: with ``waitForCompletion`` (which blocks Slicer until the worker is done), a list of
            ``Proposals``, one per prompt; otherwise the request's id, and the results come through
            ``pollEvents``.
        """
        from TextDiffSegHelpers import install, mrml
        from TextDiffSegLib.volume import write_volume

        if not volumeNode:
            raise ValueError(_("Choose an input volume."))
        prompts = terminology.split_prompts(prompts) if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError(_("Type what to segment, for example 'liver' (several: 'liver; spleen')."))
        for prompt in prompts:
            terminology.resolve_prompt(prompt)  # a misspelt structure fails here, with suggestions
        install.checkPlatform()
        missing = self.missingRequirements()
        if missing:
            raise RuntimeError(_(
                "TextDiffSeg's Python packages are not installed ({packages}). Click Generate in the TextDiffSeg "
                "module, or call installRequirements() on this logic, to install them.").format(packages=", ".join(missing)))
        if self.isRunning():
            raise RuntimeError(_("TextDiffSeg is already segmenting; wait for it or cancel it first."))

        requestDir = Path(tempfile.mkdtemp(prefix="request-", dir=self._workFolder()))
        volume = mrml.volumeFromNode(volumeNode)
        write_volume(requestDir / "volume.nrrd", volume)
        (requestDir / "out").mkdir()
        displayNode = volumeNode.GetDisplayNode()
        window = [displayNode.GetLevel(), displayNode.GetWindow()] if displayNode and displayNode.IsA("vtkMRMLScalarVolumeDisplayNode") else None
        requestId = sharedWorker().send(
            "segment", input=str(requestDir / "volume.nrrd"), prompts=prompts, model=model,
            num_proposals=int(numProposals), seed=int(seed), steps=None if steps is None else int(steps),
            device=device.lower(), output_dir=str(requestDir / "out"),
            model_weights=str(modelWeights) if isinstance(modelWeights, Path) else modelWeights,
            thumbnails={"size": THUMBNAIL_SIZE, "window": window},
        )
        self._request = (requestId, volumeNode, segmentationNode)
        if not waitForCompletion:
            return requestId
        try:
            event = sharedWorker().wait(requestId, onEvent=progressCallback)
        finally:
            request, self._request = self._request, None
        return self._proposalsOf(event, request)

    def isRunning(self) -> bool:
        return self._request is not None

    def pollEvents(self) -> list:
        """The running request's events so far, without waiting (the GUI calls this on a timer).

        ``progress`` events, then one ``result`` (its ``proposals`` holding the ``Proposals``),
        ``error`` (with a ``message``) or ``cancelled``.
        """
        from TextDiffSegHelpers.worker_client import FINAL_EVENTS

        if self._request is None:
            return []
        events = sharedWorker().poll(self._request[0])
        for event in events:
            if event["type"] not in FINAL_EVENTS:
                continue
            request, self._request = self._request, None
            if event["type"] == "result":
                try:
                    event["proposals"] = self._proposalsOf(event, request)
                except Exception as error:
                    event.update(type="error", message=str(error))
        return events

    def cancel(self) -> None:
        """Stop the running request: the worker process and everything it started are killed (so a request of
        another logic ends as cancelled too); the next request starts a new worker."""
        if self._request is not None:
            sharedWorker().cancel()
            sharedWorker().poll(self._request[0])  # its events, 'cancelled' last: no one waits for them now
        self._request = None

    def _proposalsOf(self, event: dict, request) -> list:
        from TextDiffSegHelpers.worker_client import proposalsFromResult

        proposals = proposalsFromResult(event)
        volumeNode, segmentationNode = request[1], request[2]
        if segmentationNode:
            for item in proposals:
                self._addSegment(item, item.fusedMask(), volumeNode, segmentationNode, numbers=range(1, len(item) + 1))
        return proposals

    # --- results into the scene ---------------------------------------------------------------

    def acceptProposal(self, proposals, number: int, volumeNode, segmentationNode) -> str:
        """Add proposal ``number`` (from 1) as a new segment; returns its ID. Existing segments are kept."""
        if not 1 <= number <= len(proposals):
            raise ValueError(_("There is no proposal {number}; there are {count}.").format(number=number, count=len(proposals)))
        return self._addSegment(proposals, proposals.mask(number - 1), volumeNode, segmentationNode, numbers=[number])

    def fuseProposals(self, proposals, numbers, volumeNode, segmentationNode) -> str:
        """Add the fusion of proposals ``numbers`` (voxels at least half of them hold) as a new segment; returns its ID."""
        from TextDiffSegLib.fusion import fuse

        numbers = sorted(set(numbers))
        if len(numbers) < 2 or not all(1 <= number <= len(proposals) for number in numbers):
            raise ValueError(_("Select at least two of the {count} proposals to fuse.").format(count=len(proposals)))
        mask = fuse([proposals.mask(number - 1) for number in numbers], method="mean")
        return self._addSegment(proposals, mask, volumeNode, segmentationNode, numbers=numbers)

    def _addSegment(self, proposals, mask, volumeNode, segmentationNode, numbers) -> str:
        """``mask``, made of proposals ``numbers``, as a new segment tagged with their seeds and models."""
        from TextDiffSegHelpers import mrml

        structure = terminology.get_structure(proposals.structure)
        numbers = list(numbers)
        tags = {
            "prompt": proposals.prompt,
            "model": ",".join(dict.fromkeys(proposals.models[number - 1] for number in numbers)),
            "seed": ",".join(str(proposals.seeds[number - 1]) for number in numbers),
            "proposal": str(numbers[0]) if len(numbers) == 1 else "fused " + ",".join(str(n) for n in numbers),
        }
        return mrml.addSegment(segmentationNode, volumeNode, mask, structure.display_name, structure.color,
                               terminology.terminology_entry(structure), tags)

    # --- showing proposals --------------------------------------------------------------------

    def showProposals(self, proposals, numbers, volumeNode) -> None:
        """Show proposals ``numbers`` in the slice views (a preview, not saved with the scene) and go to the first."""
        import numpy as np
        from TextDiffSegHelpers import mrml

        if not numbers:
            self.clearPreview()
            return
        structure = terminology.get_structure(proposals.structure)
        masks = {f"{structure.display_name} #{number}": proposals.mask(number - 1) for number in numbers}
        preview = self._temporaryNode("vtkMRMLSegmentationNode", "preview", _("TextDiffSeg preview"))
        preview.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        mrml.replaceSegments(preview, volumeNode, masks, structure.color)
        preview.GetDisplayNode().SetVisibility(True)
        first = next(iter(masks.values()))
        if first.any():
            centre = np.append(np.argwhere(first).mean(axis=0)[::-1], 1.0)  # (i, j, k, 1)
            ras = (mrml.ijkToRasFromNode(volumeNode) @ centre)[:3]
            toWorld = vtk.vtkGeneralTransform()
            slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volumeNode.GetParentTransformNode(), None, toWorld)
            slicer.modules.markups.logic().JumpSlicesToLocation(*toWorld.TransformPoint(ras), True)

    def clearPreview(self) -> None:
        preview = self._temporaryNode("vtkMRMLSegmentationNode", "preview", _("TextDiffSeg preview"), create=False)
        if preview:
            preview.GetSegmentation().RemoveAllSegments()

    def showUncertainty(self, proposals, volumeNode) -> None:
        """Show where ``proposals`` disagree over ``volumeNode`` in the slice views; hide it for None."""
        from TextDiffSegHelpers import mrml

        if proposals is None:
            if self._temporaryNode("vtkMRMLScalarVolumeNode", "uncertainty", "", create=False):
                slicer.util.setSliceViewerLayers(foreground=None)
            return
        node = self._temporaryNode("vtkMRMLScalarVolumeNode", "uncertainty", _("TextDiffSeg uncertainty"))
        mrml.updateNodeFromVolume(node, proposals.uncertainty())
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        displayNode = node.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileInferno.txt")
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(0.0, 1.0)
        displayNode.SetApplyThreshold(True)
        displayNode.SetLowerThreshold(0.05)  # where the proposals agree, the image shows through
        displayNode.SetUpperThreshold(1.0)
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=node, foregroundOpacity=0.6)

    def _temporaryNode(self, className: str, role: str, name: str, create: bool = True):
        """This module's node for ``role`` (preview, uncertainty): shown, but not saved with the scene."""
        for node in slicer.util.getNodesByClass(className):
            if node.GetAttribute(ROLE_ATTRIBUTE) == role:
                return node
        if not create:
            return None
        node = slicer.mrmlScene.AddNewNodeByClass(className, name)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetHideFromEditors(True)  # not offered as an input or output in node selectors
        node.CreateDefaultDisplayNodes()
        for item in (node, node.GetDisplayNode()):
            item.SetSaveWithScene(False)
        return node

    # --- worker -------------------------------------------------------------------------------

    def _workFolder(self) -> str:
        if self._workDir is None:
            self._workDir = tempfile.mkdtemp(prefix="TextDiffSeg-", dir=slicer.app.temporaryPath)
        return self._workDir

    def cleanup(self) -> None:
        """Cancel this logic's request, if one is running, and delete its temporary files."""
        if self.isRunning():
            self.cancel()
        if self._workDir is not None:
            shutil.rmtree(self._workDir, ignore_errors=True)
            self._workDir = None


_sharedWorker = None  # see sharedWorker()


def sharedWorker():
    """The client of the worker process that every TextDiffSegLogic of this Slicer session uses.

    The worker (PythonSlicer running ``TextDiffSegLib.worker``) starts with the first request and keeps
    its model loaded for the next; after ``$TEXTDIFFSEG_WORKER_IDLE_MINUTES`` (30 by default) without a
    request it exits, freeing the memory, and the next request starts it again. It stops when Slicer closes.
    """
    from TextDiffSegHelpers.worker_client import WorkerClient, workerLauncher

    global _sharedWorker
    if _sharedWorker is None:
        _sharedWorker = WorkerClient(workerLauncher(paths.pythonSlicer(), ENGINE_ROOT, slicer.util.startupEnvironment()))
    return _sharedWorker


#
# TextDiffSegTest
#


class TextDiffSegTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py

    It runs with or without Slicer's main window (``--no-main-window``), which has the module selector.
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_ParametersSurviveSceneSaveAndReload()
        self.setUp()
        self.test_AcceptAndFuseKeepExistingSegments()
        self.setUp()
        self.test_SegmentFromThePythonConsole()
        self.setUp()
        self.test_TypingInThePromptBox()
        self.setUp()
        self.test_GenerateCancelAcceptAndEditInTheGui()

    def _openModule(self):
        """This module's widget, entered as when the user opens the module; without a main window, which has the
        module selector, the widget is entered directly."""
        if slicer.app.commandOptions().noMainWindow:
            slicer.modules.textdiffseg.widgetRepresentation().enter()
        else:
            slicer.util.selectModule("TextDiffSeg")
        return slicer.util.getModuleWidget("TextDiffSeg")

    def _phantom(self):
        """A small CT-like volume: a soft-tissue ellipsoid in air, in a non-trivial orientation."""
        import numpy as np

        k, j, i = np.mgrid[0:24, 0:64, 0:64]
        inside = ((i - 32) / 24.0) ** 2 + ((j - 30) / 18.0) ** 2 + ((k - 12) / 10.0) ** 2 < 1
        array = np.where(inside, 60, -1000).astype(np.int16)
        ijkToRas = vtk.vtkMatrix4x4()
        for row, values in enumerate([[-1.5, 0, 0, 40], [0, -1.5, 0, 25], [0, 0, 3, -100]]):
            for column, value in enumerate(values):
                ijkToRas.SetElement(row, column, value)
        return slicer.util.addVolumeFromArray(array, ijkToRas, name="phantom")

    def _fakeProposals(self, volumeNode, count=3):
        """Proposals as the worker writes them, without running a model."""
        import numpy as np
        from TextDiffSegHelpers import mrml
        from TextDiffSegHelpers.worker_client import Proposals
        from TextDiffSegLib.volume import write_volume

        folder = Path(tempfile.mkdtemp(dir=slicer.app.temporaryPath))
        volume = mrml.volumeFromNode(volumeNode)
        paths = []
        for number in range(1, count + 1):
            mask = np.zeros(volume.array.shape, np.uint8)
            mask[8:16, 20:40, 20:30 + 5 * number] = 1
            paths.append(str(write_volume(folder / f"proposal-{number}.nrrd", volume.with_array(mask))))
        return Proposals(prompt="the liver", structure="liver", model="test", seeds=list(range(count)),
                         models=["test"] * count, scores=[0.8] * count, proposalPaths=paths, fusedPath=paths[0], uncertaintyPath=paths[0],
                         thumbnailPaths=[])

    def test_ParametersSurviveSceneSaveAndReload(self):
        self.delayDisplay("Parameters survive saving and reloading the scene")
        logic = TextDiffSegLogic()
        parameters = logic.getParameterNode()
        parameters.inputVolume = self._phantom()
        parameters.prompt = "liver; spleen"
        parameters.numProposals = 7
        parameters.seed = 42
        parameters.device = "cpu"
        parameters.model = "universal-btcv,lcpdn-btcv"
        parameters.modelWeights = "/data/ensemble-report.json"
        sceneFile = os.path.join(tempfile.mkdtemp(dir=slicer.app.temporaryPath), "scene.mrb")
        self.assertTrue(slicer.util.saveScene(sceneFile))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(sceneFile)
        reloaded = TextDiffSegLogic().getParameterNode()
        self.assertEqual(reloaded.prompt, "liver; spleen")
        self.assertEqual((reloaded.numProposals, reloaded.seed, reloaded.device), (7, 42, "cpu"))
        self.assertEqual((reloaded.model, reloaded.modelWeights), ("universal-btcv,lcpdn-btcv", "/data/ensemble-report.json"))
        self.assertEqual(reloaded.inputVolume.GetName(), "phantom")

    def test_AcceptAndFuseKeepExistingSegments(self):
        self.delayDisplay("Accepted and fused proposals become new segments")
        import numpy as np
        from TextDiffSegHelpers import mrml

        volumeNode = self._phantom()
        proposals = self._fakeProposals(volumeNode)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        existingId = segmentationNode.GetSegmentation().AddEmptySegment("", "liver")
        logic = TextDiffSegLogic()

        acceptedId = logic.acceptProposal(proposals, 2, volumeNode, segmentationNode)
        fusedId = logic.fuseProposals(proposals, [1, 2, 3], volumeNode, segmentationNode)

        segmentation = segmentationNode.GetSegmentation()
        self.assertIsNotNone(segmentation.GetSegment(existingId))
        accepted, fused = segmentation.GetSegment(acceptedId), segmentation.GetSegment(fusedId)
        self.assertEqual((accepted.GetName(), fused.GetName()), ("liver (2)", "liver (3)"))
        entry, tag = vtk.reference(""), vtk.reference("")
        self.assertTrue(accepted.GetTag(accepted.GetTerminologyEntryTagName(), entry))
        self.assertEqual(str(entry), terminology.terminology_entry("liver"))
        self.assertTrue(fused.GetTag("TextDiffSeg.proposal", tag))
        self.assertEqual(str(tag), "fused 1,2,3")
        np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, acceptedId, volumeNode), proposals.mask(1))
        np.testing.assert_array_equal(mrml.maskFromSegment(segmentationNode, fusedId, volumeNode), proposals.mask(1))

    def _requirementsMissing(self, logic) -> bool:
        missing = logic.missingRequirements()
        if missing:
            self.delayDisplay(f"Skipped: TextDiffSeg's Python packages are not installed ({', '.join(missing)})")
        return bool(missing)

    def test_SegmentFromThePythonConsole(self):
        self.delayDisplay("Segment with the bundled default model, as from the Python console")
        volumeNode = self._phantom()
        logic = TextDiffSegLogic()
        if self._requirementsMissing(logic):
            return
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        progress = []
        try:
            proposals = logic.segment(volumeNode, "liver", numProposals=2, steps=2, device="cpu",
                                      segmentationNode=segmentationNode, progressCallback=progress.append)
            self.assertEqual(len(proposals), 1)
            self.assertEqual((proposals[0].structure, len(proposals[0])), ("liver", 2))
            self.assertEqual(proposals[0].mask(0).shape, slicer.util.arrayFromVolume(volumeNode).shape)
            self.assertTrue(progress and all(event["type"] == "progress" for event in progress))
            self.assertEqual(segmentationNode.GetSegmentation().GetNthSegment(0).GetName(), "liver")
            with self.assertRaises(Exception) as context:
                logic.segment(volumeNode, "livr")
            self.assertIn("liver", str(context.exception))
        finally:
            logic.cleanup()

    def test_TypingInThePromptBox(self):
        self.delayDisplay("Typing in the middle of the prompt keeps the cursor there; one completer offers completions")
        widget = self._openModule()
        promptBox = widget.ui.promptLineEdit
        promptBox.text = "lver"
        promptBox.cursorPosition = 1
        promptBox.insert("i")
        self.assertEqual((promptBox.text, promptBox.cursorPosition), ("liver", 2))
        self.assertEqual(widget.logic.getParameterNode().prompt, "liver")

        completer = promptBox.completer()
        widget.onPromptEdited("liver; sp")
        widget.onPromptEdited("liver; spl")
        completer.popup().hide()
        self.assertEqual(promptBox.completer(), completer)
        self.assertIn("liver; spleen", completer.model().stringList())

    def test_GenerateCancelAcceptAndEditInTheGui(self):
        self.delayDisplay("Generate, cancel, generate again, accept and edit from the module's GUI")
        import time

        if self._requirementsMissing(TextDiffSegLogic()):
            return
        volumeNode = self._phantom()
        widget = self._openModule()
        parameters = widget.logic.getParameterNode()
        parameters.inputVolume = volumeNode
        parameters.prompt = "liver"
        parameters.numProposals = 2
        parameters.steps = 2
        parameters.device = "cpu"
        parameters.model = ""
        self.assertTrue(widget.ui.modelWeightsPathLineEdit.isHidden())  # asked for an ensemble only
        parameters.model = "universal-btcv,lcpdn-btcv"
        parameters.modelWeights = "/data/ensemble-report.json"
        self.assertFalse(widget.ui.modelWeightsPathLineEdit.isHidden())
        self.assertEqual(widget.ui.modelWeightsPathLineEdit.currentPath, "/data/ensemble-report.json")
        parameters.model = ""  # the default model alone: the weights stay in the scene but are not sent

        widget.ui.generateButton.click()
        self.assertEqual(widget.ui.generateButton.text, "Cancel")
        widget.ui.generateButton.click()
        self.assertFalse(widget.logic.isRunning())
        self.assertEqual(widget.ui.generateButton.text, "Generate")

        widget.ui.generateButton.click()
        deadline = time.time() + 600
        while widget.logic.isRunning() and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        slicer.app.processEvents()
        self.assertFalse(widget.logic.isRunning(), "no result within 10 minutes")
        self.assertEqual(widget.ui.galleryListWidget.count, 2)

        widget.ui.galleryListWidget.item(0).setSelected(True)
        self.assertTrue(widget.ui.acceptButton.enabled)
        widget.ui.acceptButton.click()
        segmentationNode = parameters.outputSegmentation
        self.assertIsNotNone(segmentationNode)
        self.assertEqual(segmentationNode.GetSegmentation().GetNthSegment(0).GetName(), "liver")

        widget.ui.uncertaintyCheckBox.checked = True
        widget.ui.uncertaintyCheckBox.checked = False
        widget.ui.editButton.click()
        if not slicer.app.commandOptions().noMainWindow:
            self.assertEqual(slicer.util.selectedModule(), "SegmentEditor")
        editor = slicer.util.getModuleWidget("SegmentEditor").editor
        self.assertEqual(editor.segmentationNode(), segmentationNode)
        self.delayDisplay("Test passed")
