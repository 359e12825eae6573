"""The model families, chosen by the ``family`` field of a model's ``config.json``.

Each is a ``base.Family``: config, model, predictor, training recipe, adapter rules and card text
(docs/adding-a-family.md).
"""

from .base import Family
from .universal import UniversalConfig, UniversalModel, UniversalPredictor, card_text, lora_targets, retrained_parameters
from .universal_training import UniversalRecipe

FAMILIES: dict[str, Family] = {
    "universal": Family(UniversalConfig, UniversalModel, UniversalPredictor, UniversalRecipe,
                        lora_targets, retrained_parameters, card_text),
}
