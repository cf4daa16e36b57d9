"""The ``torch.nn`` models of the zoo: attention, recurrent, embedding, CTC, normalization,
pooling and upsampling layers in tiny float64 models."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from _zoo_hf import DT, N, _g
from torch import nn


def ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


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
