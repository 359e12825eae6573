"""The model families, chosen by the ``family`` field of a model's ``config.json``.

Each is a ``base.Family``: config, model, predictor, training recipe, adapter rules and card text
(docs/adding-a-family.md).
"""

from . import lcpdn, progidiff, textdiffseg3d
from .base import Family
from .lcpdn_training import LCPDNRecipe
from .progidiff_training import ProGiDiffRecipe
from .textdiffseg3d_training import TextDiffSeg3DRecipe
from .universal import (UniversalConfig, UniversalModel, UniversalPredictor, card_text, grown, lora_targets,
                        retrained_parameters)
from .universal_training import UniversalRecipe

FAMILIES: dict[str, Family] = {
    "universal": Family(UniversalConfig, UniversalModel, UniversalPredictor, UniversalRecipe,
                        lora_targets, retrained_parameters, card_text, grown),
    "textdiffseg3d": Family(textdiffseg3d.TextDiffSeg3DConfig, textdiffseg3d.TextDiffSeg3DModel,
                            textdiffseg3d.TextDiffSeg3DPredictor, TextDiffSeg3DRecipe, textdiffseg3d.lora_targets,
                            textdiffseg3d.retrained_parameters, textdiffseg3d.card_text),
    "progidiff": Family(progidiff.ProGiDiffConfig, progidiff.ProGiDiffModel, progidiff.ProGiDiffPredictor,
                        ProGiDiffRecipe, progidiff.lora_targets, progidiff.retrained_parameters, progidiff.card_text,
                        progidiff.grown),
    "lcpdn": Family(lcpdn.LCPDNConfig, lcpdn.LCPDNModel, lcpdn.LCPDNPredictor, LCPDNRecipe, lcpdn.lora_targets,
                    lcpdn.retrained_parameters, lcpdn.card_text, lcpdn.grown),
}
