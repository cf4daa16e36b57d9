"""The model zoo: tiny float64 models as their users build them, with a batch and a loss.

Every case is a `ZooCase`: a builder returning ``(model, loss_fn, data)`` (the model in
float64, random weights from a fixed seed, nothing downloaded), the names of a few hundred
parameters the curvature is taken with respect to (through attention, normalization, the
recurrence ... wherever the case's point is), and, for the models whose Hessian cannot be
taken, the name of the operation sharpgen's error must name. Hugging Face models are used
as their users use them: dict batches (``input_ids``, ``attention_mask``, ``labels`` /
``pixel_values``), the model's own loss (``outputs.loss``) or a loss on the logits.

Loaded by ``conftest.py`` and ``zoo_table.py`` through ``importlib`` (the tests are not a
package).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


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


# -- torch.nn models ------------------------------------------------------------------------------
def _seq(seed: int = 0, d: int = 8, seq: int = 5) -> torch.Tensor:
    return torch.randn(N, seq, d, generator=_g(seed), dtype=DT)


_CLASSES = torch.tensor([0, 1, 1, 0])


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (batch first, key padding mask) and a mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding).mean(1))


def transformer_encoder():
    torch.manual_seed(0)
    padding = torch.zeros(N, 5, dtype=torch.bool)
    padding[1, -2:] = True
    return Encoder().to(DT), ce, ((_seq(1), padding), _CLASSES)


class Decoder(nn.Module):
    """``nn.TransformerDecoder`` with a causal mask over a memory, a per-token regression."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 1)
        self.head = nn.Linear(8, 1)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=tgt.dtype)
        return self.head(self.decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True))


def transformer_decoder():
    torch.manual_seed(0)
    y = torch.randn(N, 4, 1, generator=_g(7), dtype=DT)
    return Decoder().to(DT), F.mse_loss, ((_seq(1, seq=4), _seq(2, seq=3)), y)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention with a key padding mask, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        padding[:, -1] = True
        out, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        return self.head(out.mean(1))


def multihead_attention():
    torch.manual_seed(0)
    return SelfAttention().to(DT), ce, (_seq(1), _CLASSES)


class Recurrent(nn.Module):
    """An ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (2 layers, batch first) and a head on the
    last step."""

    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = kind(3, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def _recurrent(kind: type[nn.Module]):
    def build():
        torch.manual_seed(0)
        return Recurrent(kind).to(DT), ce, (_seq(1, d=3), _CLASSES)

    return build


class Bag(nn.Module):
    """``nn.Embedding`` (mean over tokens) or ``nn.EmbeddingBag`` (mode="mean") and a head."""

    def __init__(self, bag: bool) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(10, 4, mode="mean") if bag else nn.Embedding(10, 4)
        self.bag = bag
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.embed(tokens) if self.bag else self.embed(tokens).mean(1)
        return self.head(torch.tanh(pooled))


def _embedding(bag: bool):
    def build():
        torch.manual_seed(0)
        tokens = torch.randint(0, 10, (N, 5), generator=_g(1))
        return Bag(bag).to(DT), ce, (tokens, _CLASSES)

    return build


class CTC(nn.Module):
    """A GRU over 6 frames with per-frame log-probabilities over 4 symbols (blank 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0]).log_softmax(-1).transpose(0, 1)  # (T, N, C)


_CTC_TARGETS = torch.tensor([[1, 2], [3, 3], [2, 1], [1, 1]])


def ctc(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lengths = torch.full((targets.shape[0],), log_probs.shape[0], dtype=torch.long)
    target_lengths = torch.full((targets.shape[0],), targets.shape[1], dtype=torch.long)
    return F.ctc_loss(log_probs, targets, lengths, target_lengths)


def ctc_model():
    torch.manual_seed(0)
    return CTC().to(DT), ctc, (_seq(1, d=3, seq=6), _CTC_TARGETS)


class Normed(nn.Module):
    """conv -> ``norm`` -> tanh -> mean pool -> linear, on (N, 2, 4, 4) images; the 1-D
    norms see (N, C, L) (``flat``: (N, C*L)), the channels-last ones (N, ..., C)."""

    def __init__(self, norm: nn.Module, layout: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = norm
        self.layout = layout
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.layout == "1d":
            h = self.norm(h.flatten(2)).unflatten(2, (4, 4))
        elif self.layout == "flat":
            h = self.norm(h.mean((2, 3)))[:, :, None, None]
        elif self.layout == "last":
            h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif self.layout == "3d":
            h = self.norm(h.unsqueeze(2)).squeeze(2)
        else:
            h = self.norm(h)
        return self.head(torch.tanh(h).mean((2, 3)))


def _normed(make_norm: Callable[[], nn.Module], layout: str = "2d", running: bool = False):
    def build():
        torch.manual_seed(0)
        model = Normed(make_norm(), layout).to(DT)
        if running:  # BatchNorm in eval with non-trivial running statistics
            model.train()
            with torch.no_grad():
                for s in range(2):
                    model(torch.randn(8, 2, 4, 4, generator=_g(60 + s), dtype=DT) * 2 + 1)
            model.eval()
        x = torch.randn(N, 2, 4, 4, generator=_g(1), dtype=DT)
        return model, ce, (x, _CLASSES)

    return build


class Resample(nn.Module):
    """Pooling (``down``) or upsampling (``up``) layers between two convolutions."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        if kind == "down":
            self.branches = nn.ModuleList([
                nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2),
                nn.AdaptiveMaxPool2d(2), nn.LPPool2d(2, 2), nn.MaxPool2d(3, 1, padding=1),
            ])  # fmt: skip
        else:
            self.branches = nn.ModuleList([
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Upsample(scale_factor=2, mode="bicubic", align_corners=True),
                nn.Sequential(nn.Conv2d(4, 16, 1), nn.PixelShuffle(2)),
                nn.ConvTranspose2d(4, 4, 2, stride=2),
            ])  # fmt: skip
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        pooled = sum(torch.tanh(b(h)).pow(2).mean((2, 3)) for b in self.branches)
        return self.head(pooled)


def _resample(kind: str):
    def build():
        torch.manual_seed(0)
        x = torch.randn(N, 2, 4, 4, generator=_g(1), dtype=DT)
        return Resample(kind).to(DT), ce, (x, _CLASSES)

    return build


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
            "bert.encoder.layer.0.attention.self.query.weight",
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
            "transformer.h.0.attn.c_proj.weight",
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
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
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
            "decoder.block.0.layer.1.EncDecAttention.q.weight",
        ),
    ),
    ZooCase(
        "vit",
        _HF_VISION,
        "ViTForImageClassification: cross-entropy on the logits",
        vit,
        (
            "vit.layers.0.attention.q_proj.weight",
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
            "swin.encoder.layers.0.blocks.0.attention.q_proj.weight",
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
            "classifier.1.weight",
        ),
    ),
    ZooCase(
        "mobilenet_v2",
        _HF_VISION,
        "MobileNetV2ForImageClassification: depthwise convolutions, ReLU6, own loss",
        mobilenet_v2,
        (
            "mobilenet_v2.conv_stem.conv_3x3.convolution.weight",
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
            "regnet.encoder.stages.0.layers.0.layer.0.convolution.weight",
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
            "convnext.embeddings.patch_embeddings.weight",
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
            "efficientnet.encoder.blocks.0.depthwise_conv.depthwise_conv.weight",
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
            "encoder.layers.0.self_attn.out_proj.weight",
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
        ("attn.in_proj_bias", "attn.out_proj.weight", "head.weight"),
    ),
    ZooCase(
        "lstm",
        _NN,
        "nn.LSTM, 2 layers",
        _recurrent(nn.LSTM),
        ("rnn.weight_ih_l0", "rnn.bias_ih_l1", "head.weight"),
    ),
    ZooCase(
        "gru",
        _NN,
        "nn.GRU, 2 layers",
        _recurrent(nn.GRU),
        ("rnn.weight_ih_l0", "rnn.bias_hh_l1", "head.weight"),
    ),
    ZooCase(
        "rnn",
        _NN,
        "nn.RNN (tanh), 2 layers",
        _recurrent(nn.RNN),
        ("rnn.weight_hh_l0", "rnn.weight_ih_l1", "head.weight"),
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
        ("rnn.weight_hh_l0", "head.weight", "head.bias"),
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
        ("conv.weight", "branches.4.weight", "head.weight"),
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
