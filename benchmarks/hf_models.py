"""Tiny transformers models of many families, with inputs to call them (random weights).

Shared by ``transformers_zoo.py`` and the tests: each entry builds a model from a tiny config
(hidden size 32, two layers) and makes a batch of keyword inputs for it, with padding where the
family takes an attention mask. Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["CATALOGUE", "build", "inputs_for", "first_tensor", "class_of"]

BATCH, LENGTH, VOCAB, IMAGE = 4, 8, 64, 32
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32)


def _text(batch: int, generator: torch.Generator, types: bool = False,
          pad_left: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, LENGTH), generator=generator)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    if batch > 1:  # one padded row: the mask must matter
        mask[1, :3] = 0 if pad_left else 1
        mask[1, LENGTH - 3:] = 1 if pad_left else 0
        ids[1][mask[1] == 0] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if types:
        out["token_type_ids"] = (torch.arange(LENGTH) >= LENGTH // 2).long().expand(batch, -1)
    return out


def _pixels(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)}


def _audio(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(batch, 1600, generator=generator)}


def _features(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(batch, 16, 64, generator=generator)}


def _ending(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Text whose every row ends with the end token 2 (BART classifies at it)."""
    out = _text(batch, generator)
    out["input_ids"][:, -1] = 2
    out["attention_mask"][:] = 1
    return out


def _choices(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Two choices per sample: (batch, 2, length) inputs."""
    return {k: torch.stack([v, v.roll(1, dims=-1)], 1) for k, v in _text(batch, generator).items()}


def _entries() -> dict[str, tuple[str, str, dict[str, Any], Callable]]:
    """name -> (model class, config class, config values, input maker)."""
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=IMAGE, patch_size=8, num_labels=5)
    stages = dict(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                  num_labels=5, image_size=IMAGE)
    wav = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
               num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_labels=5,
               mask_time_prob=0.0, classifier_proj_size=16)
    text = lambda **kw: {**TEXT, "num_labels": 5, "pad_token_id": 0, **kw}  # noqa: E731
    return {
        "bert-seq": ("BertForSequenceClassification", "BertConfig", text(),
                     lambda b, g: _text(b, g, types=True)),
        "bert-token": ("BertForTokenClassification", "BertConfig", text(), _text),
        "bert-backbone": ("BertModel", "BertConfig", text(), _text),
        "roberta-seq": ("RobertaForSequenceClassification", "RobertaConfig",
                        text(max_position_embeddings=40, pad_token_id=1), _text),
        "distilbert-seq": ("DistilBertForSequenceClassification", "DistilBertConfig",
                           dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=32, num_labels=5, pad_token_id=0),
                           _text),
        "albert-seq": ("AlbertForSequenceClassification", "AlbertConfig",
                       text(embedding_size=16), _text),
        "electra-seq": ("ElectraForSequenceClassification", "ElectraConfig",
                        text(embedding_size=16), _text),
        "deberta-v2-seq": ("DebertaV2ForSequenceClassification", "DebertaV2Config",
                           text(relative_attention=True, position_buckets=8,
                                pos_att_type=["p2c", "c2p"]), _text),
        "gpt2-seq": ("GPT2ForSequenceClassification", "GPT2Config",
                     dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                          num_labels=5, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                     _text),
        "llama-seq": ("LlamaForSequenceClassification", "LlamaConfig",
                      dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                           max_position_embeddings=32, num_labels=5, pad_token_id=0),
                      lambda b, g: _text(b, g, pad_left=True)),
        "bert-choice": ("BertForMultipleChoice", "BertConfig", text(), _choices),
        "mobilebert-seq": ("MobileBertForSequenceClassification", "MobileBertConfig",
                           text(embedding_size=16, intra_bottleneck_size=16,
                                true_hidden_size=16), _text),
        "bart-seq": ("BartForSequenceClassification", "BartConfig",
                     dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2,
                          encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                          num_labels=5, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                     _ending),
        "t5-encoder": ("T5EncoderModel", "T5Config",
                       dict(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                            num_heads=2), _text),
        "qwen2-seq": ("Qwen2ForSequenceClassification", "Qwen2Config",
                      dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                           num_labels=5, pad_token_id=0),
                      lambda b, g: _text(b, g, pad_left=True)),
        "vit-image": ("ViTForImageClassification", "ViTConfig", vit, _pixels),
        "deit-distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", vit, _pixels),
        "beit-image": ("BeitForImageClassification", "BeitConfig",
                       dict(vit, use_relative_position_bias=True), _pixels),
        "dinov2-image": ("Dinov2ForImageClassification", "Dinov2Config",
                         dict(vit, mlp_ratio=2), _pixels),
        "resnet-image": ("ResNetForImageClassification", "ResNetConfig",
                         dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                              num_labels=5), _pixels),
        "swin-image": ("SwinForImageClassification", "SwinConfig",
                       dict(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1],
                            num_heads=[2, 2], window_size=4, num_labels=5), _pixels),
        "convnext-image": ("ConvNextForImageClassification", "ConvNextConfig", stages, _pixels),
        "wav2vec2-audio": ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", wav, _audio),
        "hubert-audio": ("HubertForSequenceClassification", "HubertConfig", wav, _audio),
        "whisper-audio": ("WhisperForAudioClassification", "WhisperConfig",
                          dict(vocab_size=VOCAB, d_model=32, encoder_layers=2,
                               encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                               decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16,
                               max_source_positions=32, max_target_positions=32,
                               num_labels=5, classifier_proj_size=16, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                          _features),
    }


CATALOGUE = tuple(_entries())


def build(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """The tiny model ``name`` in eval mode, its weights drawn from ``seed``."""
    import transformers
    model_cls, config_cls, values, _ = _entries()[name]
    config = getattr(transformers, config_cls)(**{**values, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(transformers, model_cls)(config).eval()


def inputs_for(name: str, batch: int = BATCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of keyword inputs for the model ``name``."""
    return _entries()[name][3](batch, torch.Generator().manual_seed(seed))


def first_tensor(out: Any) -> torch.Tensor:
    """The main output: ``logits`` of a task model, ``last_hidden_state`` of a backbone."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


def class_of(name: str) -> str:
    """The transformers class of the entry ``name``."""
    return _entries()[name][0]
