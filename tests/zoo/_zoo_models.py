"""The model zoo: tiny float64 models as their users build them, with a batch and a loss.

Every case is a `ZooCase`: a builder returning ``(model, loss_fn, data)`` (the model in
float64, random weights from a fixed seed, nothing downloaded), the names of 24 to 100
parameters the curvature is taken with respect to (through attention, normalization, the
recurrence ... wherever the case's point is), and, for the models whose Hessian cannot be
taken, the name of the operation sharpgen's error must name. The builders are in ``_zoo_hf.py``
(Hugging Face: dict batches, their own loss or a loss on the logits) and ``_zoo_nn.py``.

Imported by ``conftest.py`` and ``zoo_table.py`` with this folder on ``sys.path`` (the tests
are not a package).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _zoo_hf import (
    bert,
    convnext,
    efficientnet,
    gpt2,
    llama,
    mobilenet_v2,
    regnet,
    resnet,
    swin,
    t5,
    vit,
)
from _zoo_nn import (
    _embedding,
    _normed,
    _recurrent,
    _resample,
    ctc_model,
    multihead_attention,
    transformer_decoder,
    transformer_encoder,
)
from torch import nn


@dataclass(frozen=True)
class ZooCase:
    """One model of the zoo.

    Attributes:
        name: The case id (also the row of the supported-models page).
        family: The group the page lists it under.
        covers: What the case exercises (one line for the page).
        build: ``() -> (model, loss_fn, data)``.
        params: The selected parameter names (``params=`` of every measure).
        raises: ``None`` when every measure runs; else the operation (a regex, matched
            case-insensitively) that the curvature measures' ``ValueError`` must name; the
            first-order measures must run anyway.
        ggn: For a case that raises: whether the Gauss-Newton route runs (the model has no
            second derivative but the loss has one in the outputs) or raises too.
    """

    name: str
    family: str
    covers: str
    build: Callable[[], tuple[nn.Module, Callable[..., torch.Tensor], Any]]
    params: tuple[str, ...]
    raises: str | None = None
    ggn: bool = False


# -- the cases ------------------------------------------------------------------------------------
_HF_TEXT = "Hugging Face text"
_HF_VISION = "Hugging Face vision"
_NN = "torch.nn"
_NORM = "normalization (torch.nn)"

CASES: tuple[ZooCase, ...] = (
    ZooCase(
        "bert",
        _HF_TEXT,
        "BertForSequenceClassification: encoder, padding mask, own loss",
        bert,
        (
            "bert.encoder.layer.0.attention.self.query.bias",
            "bert.encoder.layer.0.attention.output.LayerNorm.weight",
            "classifier.weight",
        ),
    ),
    ZooCase(
        "gpt2",
        _HF_TEXT,
        "GPT2LMHeadModel: causal decoder, padding mask, own LM loss",
        gpt2,
        (
            "transformer.h.0.attn.c_attn.bias",
            "transformer.h.0.ln_1.weight",
            "transformer.ln_f.weight",
        ),
    ),
    ZooCase(
        "llama",
        _HF_TEXT,
        "LlamaForCausalLM: rotary embeddings, RMSNorm, grouped-query attention (4 heads, "
        "2 key/value heads), own LM loss",
        llama,
        (
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.input_layernorm.weight",
        ),
    ),
    ZooCase(
        "t5",
        _HF_TEXT,
        "T5ForConditionalGeneration: encoder-decoder, relative position bias, own loss",
        t5,
        (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.0.layer.0.layer_norm.weight",
            "decoder.block.0.layer.1.layer_norm.weight",
        ),
    ),
    ZooCase(
        "vit",
        _HF_VISION,
        "ViTForImageClassification: cross-entropy on the logits",
        vit,
        (
            "vit.layers.0.attention.q_proj.bias",
            "vit.embeddings.cls_token",
            "classifier.weight",
        ),
    ),
    ZooCase(
        "swin",
        _HF_VISION,
        "SwinForImageClassification: shifted windows, relative position bias table, own loss",
        swin,
        (
            "swin.encoder.layers.0.blocks.0.attention.q_proj.bias",
            "swin.encoder.layers.0.blocks.0.attention.relative_position_bias"
            ".relative_position_bias_table",
            "swin.encoder.layers.1.blocks.0.attention.relative_position_bias"
            ".relative_position_bias_table",
        ),
    ),
    ZooCase(
        "resnet",
        _HF_VISION,
        "ResNetForImageClassification: BatchNorm (eval), residual",
        resnet,
        (
            "resnet.encoder.stages.1.layers.0.shortcut.normalization.weight",
            "resnet.encoder.stages.1.layers.0.layer.1.normalization.weight",
            "resnet.embedder.embedder.normalization.weight",
        ),
    ),
    ZooCase(
        "mobilenet_v2",
        _HF_VISION,
        "MobileNetV2ForImageClassification: depthwise convolutions, ReLU6, own loss",
        mobilenet_v2,
        (
            "mobilenet_v2.conv_stem.first_conv.normalization.weight",
            "mobilenet_v2.layer.0.expand_1x1.convolution.weight",
            "mobilenet_v2.layer.0.conv_3x3.normalization.weight",
            "classifier.bias",
        ),
    ),
    ZooCase(
        "regnet",
        _HF_VISION,
        "RegNetForImageClassification: grouped convolutions, squeeze-and-excitation",
        regnet,
        (
            "regnet.encoder.stages.0.layers.0.layer.1.normalization.weight",
            "regnet.encoder.stages.0.layers.0.layer.2.attention.0.weight",
            "regnet.encoder.stages.0.layers.0.layer.2.attention.2.weight",
        ),
    ),
    ZooCase(
        "convnext",
        _HF_VISION,
        "ConvNextForImageClassification: 7x7 depthwise, LayerNorm, layer scale, GELU, own loss",
        convnext,
        (
            "convnext.embeddings.layernorm.weight",
            "convnext.encoder.stages.0.layers.0.layer_scale_parameter",
            "convnext.encoder.stages.0.layers.0.dwconv.bias",
            "convnext.encoder.stages.1.layers.0.layernorm.weight",
        ),
    ),
    ZooCase(
        "efficientnet",
        _HF_VISION,
        "EfficientNetForImageClassification: depthwise, swish, "
        "squeeze-and-excitation, BatchNorm (eval)",
        efficientnet,
        (
            "efficientnet.encoder.blocks.0.depthwise_conv.depthwise_norm.weight",
            "efficientnet.encoder.blocks.0.squeeze_excite.reduce.weight",
            "efficientnet.encoder.blocks.0.squeeze_excite.expand.weight",
            "classifier.bias",
        ),
    ),
    ZooCase(
        "transformer_encoder",
        _NN,
        "nn.TransformerEncoder with a key padding mask",
        transformer_encoder,
        (
            "encoder.layers.0.self_attn.in_proj_bias",
            "encoder.layers.0.norm1.weight",
            "head.weight",
        ),
    ),
    ZooCase(
        "transformer_decoder",
        _NN,
        "nn.TransformerDecoder: causal self-attention, cross-attention",
        transformer_decoder,
        (
            "decoder.layers.0.self_attn.in_proj_bias",
            "decoder.layers.0.multihead_attn.in_proj_bias",
            "decoder.layers.0.norm3.weight",
            "head.weight",
        ),
    ),
    ZooCase(
        "multihead_attention",
        _NN,
        "nn.MultiheadAttention with a key padding mask",
        multihead_attention,
        ("attn.in_proj_bias", "head.weight"),
    ),
    ZooCase(
        "lstm",
        _NN,
        "nn.LSTM, 2 layers",
        _recurrent(nn.LSTM),
        ("rnn.bias_ih_l0", "rnn.bias_ih_l1", "head.weight"),
    ),
    ZooCase(
        "gru",
        _NN,
        "nn.GRU, 2 layers",
        _recurrent(nn.GRU),
        ("rnn.bias_hh_l0", "rnn.bias_ih_l1", "head.weight"),
    ),
    ZooCase(
        "rnn",
        _NN,
        "nn.RNN (tanh), 2 layers",
        _recurrent(nn.RNN),
        ("rnn.weight_ih_l0", "rnn.bias_hh_l1", "head.weight"),
    ),
    ZooCase("embedding", _NN, "nn.Embedding", _embedding(False), ("embed.weight", "head.weight")),
    ZooCase(
        "embedding_bag",
        _NN,
        "nn.EmbeddingBag (mode='mean')",
        _embedding(True),
        ("embed.weight", "head.weight"),
        raises="embedding_?bag",
        ggn=True,
    ),
    ZooCase(
        "ctc_loss",
        _NN,
        "F.ctc_loss on a GRU's log-probabilities",
        ctc_model,
        ("rnn.bias_hh_l0", "head.weight", "head.bias"),
        raises="ctc",
    ),
    ZooCase(
        "pooling",
        _NN,
        "MaxPool2d, AvgPool2d, AdaptiveAvg/MaxPool2d, LPPool2d",
        _resample("down"),
        ("conv.weight", "conv.bias", "head.weight"),
    ),
    ZooCase(
        "upsampling",
        _NN,
        "Upsample (nearest, bilinear, bicubic), PixelShuffle, ConvTranspose2d",
        _resample("up"),
        ("conv.bias", "branches.4.weight", "head.weight"),
    ),
)

_NORMS: tuple[tuple[str, Callable[[], nn.Module], str, bool], ...] = (
    ("batchnorm1d", lambda: nn.BatchNorm1d(4), "1d", True),
    ("batchnorm2d", lambda: nn.BatchNorm2d(4), "2d", True),
    ("batchnorm3d", lambda: nn.BatchNorm3d(4), "3d", True),
    ("layernorm", lambda: nn.LayerNorm(4), "last", False),
    ("groupnorm", lambda: nn.GroupNorm(2, 4), "2d", False),
    ("instancenorm1d", lambda: nn.InstanceNorm1d(4, affine=True), "1d", False),
    ("instancenorm2d", lambda: nn.InstanceNorm2d(4, affine=True), "2d", False),
    ("instancenorm3d", lambda: nn.InstanceNorm3d(4, affine=True), "3d", False),
    ("rmsnorm", lambda: nn.RMSNorm(4), "last", False),
    ("localresponsenorm", lambda: nn.LocalResponseNorm(3), "2d", False),
)

CASES += tuple(
    ZooCase(
        name, _NORM,
        f"{type(make()).__name__}" + (" in eval (running statistics)" if running else ""),
        _normed(make, layout, running),
        ("conv.weight", "head.weight") + (() if name == "localresponsenorm" else ("norm.weight",)),
    )
    for name, make, layout, running in _NORMS
)  # fmt: skip
