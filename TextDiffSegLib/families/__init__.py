"""The model families, chosen by the ``family`` field of a model's ``config.json``."""

from .universal import UniversalConfig, UniversalModel

FAMILIES = {
    "universal": (UniversalConfig, UniversalModel),
}
