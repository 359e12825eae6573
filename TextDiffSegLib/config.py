"""Model configs: dataclasses that validate themselves and round-trip through ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from .errors import ModelError

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass
class ModelConfig:
    """Fields every model family shares; families subclass it with their own architecture fields."""

    family: str = ""
    name: str = ""
    modality: str = "CT"
    structures: tuple[str, ...] = ()
    spacing: tuple[float, float, float] = (2.5, 2.5, 5.0)  # (x, y, z) mm of the model grid
    window: tuple[int, ...] = (192, 192)  # sliding-window size, voxels of the model grid: (y, x) in-plane, or (z, y, x)
    num_train_timesteps: int = 1000
    prediction_type: str = "sample"  # what the denoiser predicts: epsilon, sample or v_prediction
    default_steps: int = 4
    conditioning: str = "text"  # "text" (text-encoder embedding) or "learned" (one vector per structure)
    text_encoder: str = "minilm"
    text_embed_dim: int = 384
    adapter: dict | None = None  # for a LoRA adapter folder: base model, its weights' sha256, rank, alpha

    def __post_init__(self):
        # config.json and --model-option give lists; every sequence field of a config is a tuple.
        for field in dataclasses.fields(self):
            if isinstance(getattr(self, field.name), list):
                setattr(self, field.name, tuple(getattr(self, field.name)))
        self.structures = tuple(self.structures)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.window = tuple(int(w) for w in self.window)
        problems = self.problems()
        if problems:
            raise ModelError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when valid); subclasses extend it."""
        found = []
        if self.modality not in ("CT", "MR"):
            found.append(f"modality must be 'CT' or 'MR', not {self.modality!r}")
        if not self.structures:
            found.append("structures must name at least one structure")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            found.append(f"spacing must be three positive numbers, not {self.spacing}")
        if len(self.window) not in (2, 3) or min(self.window) < 8:
            found.append(f"window must be two (y, x) or three (z, y, x) sizes of at least 8 voxels, not {self.window}")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            found.append(f"prediction_type must be epsilon, sample or v_prediction, not {self.prediction_type!r}")
        if self.conditioning not in ("text", "learned"):
            found.append(f"conditioning must be 'text' or 'learned', not {self.conditioning!r}")
        if self.default_steps < 1:
            found.append("default_steps must be at least 1")
        if self.adapter is not None and set(self.adapter) != {"base", "base_sha256", "rank", "alpha"}:
            found.append(f"adapter must give base, base_sha256, rank and alpha, not {sorted(self.adapter)}")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_options(cls: type[C], values: dict[str, Any]) -> C:
        """The config of a model trained anew from ``values`` (its name, modality, structures and the run's model
        options); a family may complete them (ProGiDiff reads a Stable Diffusion folder's architecture)."""
        return cls(**values)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelError(f"config has fields {cls.__name__} does not know: {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as error:
            raise ModelError(f"config does not fit {cls.__name__}: {error}") from error
