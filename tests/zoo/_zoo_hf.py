"""The Hugging Face models of the zoo: tiny configs, random weights, float64, nothing
downloaded; used as their users use them (dict batches, their own loss or a loss on the
logits)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DT = torch.float64
N = 4  # samples per batch


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def own_loss(outputs: Any, targets: Any) -> torch.Tensor:
    """The loss a Hugging Face model computes itself from the ``labels`` of its batch."""
    return outputs.loss


def logits_ce(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on a Hugging Face model's ``logits``."""
    return F.cross_entropy(outputs.logits, targets)


# -- Hugging Face text models ---------------------------------------------------------------------
def _text(vocab: int, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, vocab, (N, seq), generator=_g(seed))
    mask = torch.ones(N, seq, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in one sample: a real attention mask
    mask[3, -1:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _lm_batch(vocab: int) -> dict[str, torch.Tensor]:
    batch = _text(vocab)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100  # no loss on padding
    return {**batch, "labels": labels}


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=8, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(DT)
    batch = {**_text(20), "labels": torch.tensor([0, 2, 1, 2])}
    return model, own_loss, (batch, None)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(DT), own_loss, (_lm_batch(16), None)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(DT), own_loss, (_lm_batch(16), None)


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
        num_heads=2, relative_attention_num_buckets=4, relative_attention_max_distance=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    batch = _text(16)
    batch["labels"] = torch.randint(2, 16, (N, 4), generator=_g(5))
    return T5ForConditionalGeneration(config).to(DT), own_loss, (batch, None)


# -- Hugging Face vision models ------------------------------------------------------------------
def _pixels(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(N, 3, size, size, generator=_g(seed), dtype=DT)


_LABELS = torch.tensor([0, 1, 2, 1])


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        image_size=8, patch_size=4, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config).to(DT)
    return model, logits_ce, ({"pixel_values": _pixels(8)}, _LABELS)


def swin():
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=8, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2,
        mlp_ratio=2.0, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SwinForImageClassification(config).to(DT)
    return model, own_loss, ({"pixel_values": _pixels(8), "labels": _LABELS}, None)


def _warm_batchnorm(model: nn.Module, size: int) -> nn.Module:
    """Non-trivial BatchNorm running statistics (a few train-mode batches), back in eval.

    The convolutions and BatchNorm layers first get torch's default initialization: at these
    tiny widths the Hugging Face initialization makes the activations vanish, and a constant
    output would make the curvature trivial.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            module.reset_parameters()
    model.train()
    with torch.no_grad():
        for s in range(2):
            model(pixel_values=_pixels(size, 50 + s) * 2 + 0.5)
    return model.eval()


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _warm_batchnorm(ResNetForImageClassification(config).to(DT), 16)
    return model, logits_ce, ({"pixel_values": _pixels(16)}, _LABELS)


def mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(
        image_size=8, depth_multiplier=0.1, min_depth=4, expand_ratio=2.0, finegrained_output=False,
        num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _warm_batchnorm(MobileNetV2ForImageClassification(config).to(DT), 8)
    return model, own_loss, ({"pixel_values": _pixels(8), "labels": _LABELS}, None)


def regnet():
    from transformers import RegNetConfig, RegNetForImageClassification

    config = RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _warm_batchnorm(RegNetForImageClassification(config).to(DT), 16)
    return model, logits_ce, ({"pixel_values": _pixels(16)}, _LABELS)


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_stages=2, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=8, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ConvNextForImageClassification(config).to(DT)
    return model, own_loss, ({"pixel_values": _pixels(8), "labels": _LABELS}, None)


def efficientnet():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    config = EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128,
        kernel_sizes=[3] * 7, expand_ratios=[1, 2, 2, 2, 2, 2, 2], num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _warm_batchnorm(EfficientNetForImageClassification(config).to(DT), 32)
    return model, logits_ce, ({"pixel_values": _pixels(32)}, _LABELS)
