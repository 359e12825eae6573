"""Text encoders: the bundled MiniLM and Hugging Face models from local folders (tiny random ones here)."""

import json

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from TextDiffSegLib.errors import ModelError
from TextDiffSegLib.terminology import resolve_prompt
from TextDiffSegLib.text_encoders import HuggingFaceTextEncoder, conditioning_text, load_text_encoder

WORDS = ["segment", "the", "left", "right", "kidney", "liver", "in", "this", "ct", "scan"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer BERT with its tokenizer, saved as save_pretrained does (BioBERT's format)."""
    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP text model with a small BPE tokenizer, saved as save_pretrained does."""
    folder = tmp_path_factory.mktemp("clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    symbols = [*letters, *(f"{c}</w>" for c in letters)]  # character-level BPE: no merges needed
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{s: i + 2 for i, s in enumerate(symbols)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>").save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_clip_dir"])
def test_local_hugging_face_models_encode_prompts(fixture, request):
    encoder = HuggingFaceTextEncoder(request.getfixturevalue(fixture))
    embedding = encoder.encode(["segment the left kidney", "liver"])
    assert encoder.hidden_size == 16
    assert embedding.tokens.shape[0] == 2 and embedding.tokens.shape[2] == 16
    assert embedding.mask.shape == embedding.tokens.shape[:2]
    assert embedding.pooled.shape == (2, 16)
    torch.testing.assert_close(embedding.pooled.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(embedding.pooled[0], embedding.pooled[1])


def test_bundled_minilm_is_the_offline_default():
    encoder = load_text_encoder("minilm")
    embedding = encoder.encode([conditioning_text(resolve_prompt("liver"), "CT"), "segment the liver in this CT scan"])
    assert embedding.pooled.shape == (2, 384)
    torch.testing.assert_close(embedding.pooled[0], embedding.pooled[1])


def test_conditioning_text_is_the_same_for_every_phrasing():
    phrasings = ["L kidney", "Segment the left kidney in this CT", "kidney_left"]
    assert len({conditioning_text(resolve_prompt(p), "CT") for p in phrasings}) == 1


def test_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_text_encoder(str(tmp_path))
