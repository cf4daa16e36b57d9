r"""Many small models of one architecture trained together: parameters stacked per model.

``R`` models that share an architecture (input size, width, depth, biases, outputs) but differ
in their hyperparameters keep their parameters in tensors with a leading model axis: layer
$l$ has weights ``(R, out, in)`` and biases ``(R, out)``. A forward pass over every model's own
batch ``(R, B, d)`` is one batched matrix product per layer (``torch.baddbmm``), and one
backward pass of $\sum_r L_r$ gives every model its own gradient (the models share no
parameters). Per model $r$, with its own learning rate $\eta_r$, momentum $\mu_r$, weight
decay $\lambda_r$ and SAM radius $\rho_r$, a step is torch's SGD around a SAM gradient:

$$ \varepsilon_r = \begin{cases} 0 & \text{sgd} \\ \rho_r g_r / \lVert g_r\rVert & \text{sam}
\\ \rho_r g_r & \text{usam} \\ \rho_r T_r^2 g_r / \lVert T_r g_r\rVert,\ T_r = |w_r| &
\text{asam} \end{cases},\qquad \tilde g_r = \nabla L_r(w_r + \varepsilon_r), $$
$$ b_r \leftarrow \mu_r b_r + \tilde g_r + \lambda_r w_r,\qquad
w_r \leftarrow w_r - \eta_r b_r, $$

with $g_r = \nabla L_r(w_r)$ on the same batch and norms over all of model $r$'s parameters
(Foret et al. 2021; Kwon et al. 2021 for ASAM; Andriushchenko & Flammarion 2022 for USAM). It
is what `torch.optim.SGD` (``dampening=0``, no Nesterov) computes inside `sharpgen.SAM` for
each model alone; ``tests/study`` checks this step by step in float64. A model that met the
stopping rule is frozen: its $\eta_r$ becomes 0, so its weights stay bit for bit.

Dropout (rate $p_r$, on every hidden layer's activations, inverted scaling $1/(1-p_r)$) draws
its masks from the stack's generator and is used by both passes of a SAM step; evaluation is
without dropout. The ascent norm uses `sharpgen.experiments._fused.ascent_scale` (0 for a zero
gradient), as the paper's batched trainer does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpgen.experiments._fused import ascent_scale

__all__ = ["Arch", "StackedTrainer", "init_stack", "train_stack", "module_of"]


@dataclass(frozen=True)
class Arch:
    """The architecture shared by the models of one stack.

    Attributes:
        kind: ``"mlp"`` (ReLU MLP, biases on every layer or none) or ``"two_layer"`` (the
            paper's net: bias on the hidden layer only, no output bias, scalar output).
        d: Input size.
        width: Hidden units per layer.
        depth: Hidden layers.
        outputs: Output units (classes; 1 gives a scalar output per example).
        bias: Whether the layers have biases (``two_layer``: the hidden one only).
    """

    kind: str
    d: int
    width: int
    depth: int
    outputs: int
    bias: bool

    def layers(self) -> list[tuple[int, int, bool]]:
        """``(out, in, has_bias)`` of every linear layer, input first."""
        sizes = [self.d] + [self.width] * self.depth + [self.outputs]
        out = []
        for i in range(len(sizes) - 1):
            has_bias = self.bias and (self.kind == "mlp" or i < len(sizes) - 2)
            out.append((sizes[i + 1], sizes[i], has_bias))
        return out

    def names(self) -> list[str]:
        """Names of the stacked tensors, in the order `init_stack` draws them."""
        out = []
        for i, (_, _, has_bias) in enumerate(self.layers()):
            out += [f"weight{i}"] + ([f"bias{i}"] if has_bias else [])
        return out


def init_stack(
    arch: Arch, generators: Sequence[torch.Generator], dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    r"""Stacked parameters, model ``r`` drawn from ``generators[r]`` alone.

    Every layer gets PyTorch's default `torch.nn.Linear` initialization,
    $U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})$ for weights and biases, drawn weight
    then bias, layer by layer: the draws of ``nn.Linear`` (and, for ``"two_layer"``, of
    `sharpgen.models.two_layer_relu`) from the same generator.
    """
    per_model: dict[str, list[Tensor]] = {name: [] for name in arch.names()}
    for g in generators:
        for i, (out, fan_in, has_bias) in enumerate(arch.layers()):
            bound = 1.0 / fan_in**0.5
            w = torch.empty(out, fan_in, dtype=dtype).uniform_(-bound, bound, generator=g)
            per_model[f"weight{i}"].append(w)
            if has_bias:
                b = torch.empty(out, dtype=dtype).uniform_(-bound, bound, generator=g)
                per_model[f"bias{i}"].append(b)
    return {name: torch.stack(ts) for name, ts in per_model.items()}


def module_of(arch: Arch, params: dict[str, Tensor], r: int) -> nn.Module:
    """Model ``r`` of a stack as an ordinary module (a copy; no dropout layers).

    ``"mlp"``: ``nn.Sequential(Linear, ReLU, ..., Linear)``; ``"two_layer"``:
    `sharpgen.models.TwoLayerNet` with ``W1``, ``b1``, ``W2``.
    """
    p = {k: v[r].detach().clone() for k, v in params.items()}
    if arch.kind == "two_layer":
        from sharpgen.models import TwoLayerNet

        kind = "bias" if arch.bias else "no_bias"
        return TwoLayerNet(kind, p["weight0"], p["weight1"][0], b1=p.get("bias0"))
    mods: list[nn.Module] = []
    for i, (out, fan_in, has_bias) in enumerate(arch.layers()):
        lin = nn.Linear(fan_in, out, bias=has_bias, dtype=p["weight0"].dtype)
        with torch.no_grad():
            lin.weight.copy_(p[f"weight{i}"])
            if has_bias:
                lin.bias.copy_(p[f"bias{i}"])
        mods += [lin, nn.ReLU()]
    net = nn.Sequential(*mods[:-1])
    if arch.outputs == 1:
        net.append(nn.Flatten(0))  # (n, 1) -> (n,): the scalar output of the paper's nets
    return net


def _col(v: Tensor, like: Tensor) -> Tensor:
    """A per-model vector ``(R,)`` shaped to broadcast against ``like`` ``(R, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class StackedTrainer:
    """SGD / SAM-family steps of ``R`` stacked models, every model with its own settings.

    Args:
        arch: The shared `Arch`.
        params: Stacked parameters (`init_stack`); updated in place.
        X: Every model's training inputs ``(R, n, d)``.
        Y: Its labels ``(R, n)`` (class indices, or floats for a scalar output).
        lr, momentum, weight_decay, rho, dropout: Per-model values ``(R,)``.
        optimizer: ``"sgd"``, ``"sam"``, ``"usam"`` or ``"asam"`` (shared by the stack).
        generator: Source of the dropout masks.
    """

    def __init__(
        self,
        arch: Arch,
        params: dict[str, Tensor],
        X: Tensor,
        Y: Tensor,
        *,
        lr: Tensor,
        momentum: Tensor,
        weight_decay: Tensor,
        rho: Tensor,
        dropout: Tensor,
        optimizer: str = "sgd",
        generator: torch.Generator | None = None,
    ) -> None:
        self.arch, self.P, self.X, self.Y = arch, params, X, Y
        dt = X.dtype
        self.lr = lr.to(dt).clone()
        self.momentum, self.wd = momentum.to(dt), weight_decay.to(dt)
        self.rho, self.optimizer = rho.to(dt), optimizer
        self.keep = (1.0 - dropout.to(dt)).view(-1, 1, 1)
        self.use_dropout = bool((dropout > 0).any())
        self.generator = generator
        self.buf = {k: torch.zeros_like(v) for k, v in params.items()}
        self.active = torch.ones(X.shape[0], dtype=torch.bool)
        self.rows = torch.arange(X.shape[0])[:, None]
        self.steps = 0

    def freeze(self, mask: Tensor) -> None:
        """Stop the models in ``mask``: learning rate 0, weights unchanged from now on."""
        self.active &= ~mask
        self.lr[mask] = 0.0

    def outputs(self, P: dict[str, Tensor], X: Tensor, masks: list[Tensor] | None) -> Tensor:
        """Outputs ``(R, B, outputs)`` (``(R, B)`` for one output) on inputs ``(R, B, d)``."""
        h = X
        n_layers = len(self.arch.layers())
        for i in range(n_layers):
            w = P[f"weight{i}"].transpose(1, 2)
            b = P.get(f"bias{i}")
            h = torch.bmm(h, w) if b is None else torch.baddbmm(b.unsqueeze(1), h, w)
            if i < n_layers - 1:
                h = torch.relu(h)
                if masks is not None:
                    h = h * masks[i]
        return h.squeeze(-1) if self.arch.outputs == 1 else h

    def losses(self, f: Tensor, y: Tensor) -> Tensor:
        """Mean loss per model ``(R,)``: cross-entropy, or $(f - y)^2$ for one output."""
        if self.arch.outputs == 1:
            return (f - y).square().mean(1)
        R, B, C = f.shape
        return (
            F.cross_entropy(f.reshape(R * B, C), y.reshape(-1), reduction="none").view(R, B).mean(1)
        )

    def _masks(self, B: int) -> list[Tensor] | None:
        if not self.use_dropout:
            return None
        R, w = self.X.shape[0], self.arch.width
        shape = (R, B, w)
        out = []
        for _ in range(self.arch.depth):
            u = torch.rand(shape, dtype=self.X.dtype, generator=self.generator)
            out.append((u < self.keep).to(self.X.dtype) / self.keep)
        return out

    def _grads(self, P: dict[str, Tensor], Xb: Tensor, Yb: Tensor, masks) -> dict[str, Tensor]:
        leaves = {k: v.detach().requires_grad_() for k, v in P.items()}
        with torch.enable_grad():
            loss = self.losses(self.outputs(leaves, Xb, masks), Yb).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    def _ascent(self, g: dict[str, Tensor]) -> dict[str, Tensor]:
        r"""The perturbed parameters $w + \varepsilon$ of every model."""
        P = self.P
        if self.optimizer == "usam":
            return {k: torch.addcmul(P[k], _col(self.rho, g[k]), g[k]) for k in P}
        if self.optimizer == "asam":
            tg = {k: P[k].abs() * g[k] for k in P}
            d = {k: P[k].abs() * tg[k] for k in P}
        else:
            tg = d = g
        sq = sum(t.flatten(1).square().sum(1) for t in tg.values())
        s = ascent_scale(torch.as_tensor(sq), 1.0).mul_(self.rho)
        return {k: torch.addcmul(P[k], _col(s, d[k]), d[k]) for k in P}

    @torch.no_grad()
    def step(self, idx: Tensor) -> None:
        """One step of every model on its batch ``X[r, idx[r]]`` (``idx``: ``(R, B)``)."""
        Xb, Yb = self.X[self.rows, idx], self.Y[self.rows, idx]
        masks = self._masks(idx.shape[1])
        g = self._grads(self.P, Xb, Yb, masks)
        if self.optimizer != "sgd":
            g = self._grads(self._ascent(g), Xb, Yb, masks)
        for k, w in self.P.items():
            d = torch.addcmul(g[k], _col(self.wd, w), w)
            buf = self.buf[k].mul_(_col(self.momentum, w)).add_(d)
            w.sub_(_col(self.lr, w) * buf)
        self.steps += 1

    @torch.no_grad()
    def evaluate(self, X: Tensor, Y: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
        r"""Mean loss and 0-1 error ``(R,)`` of every model on its own set ``(R, n, d)``.

        Without dropout. The error counts a wrong argmax, or for one output
        $\operatorname{sign} f \ne \operatorname{sign} y$ (0 counts as wrong).
        """
        loss = torch.zeros(X.shape[0], dtype=torch.float64)
        wrong = torch.zeros(X.shape[0], dtype=torch.float64)
        n = X.shape[1]
        for start in range(0, n, chunk):
            Xc, Yc = X[:, start : start + chunk], Y[:, start : start + chunk]
            f = self.outputs(self.P, Xc, None)
            loss += self.losses(f, Yc).double() * Xc.shape[1]
            if self.arch.outputs == 1:
                bad = (torch.sign(f) != torch.sign(Yc)) | (f == 0)
            else:
                bad = f.argmax(-1) != Yc
            wrong += bad.double().sum(1)
        return loss / n, wrong / n


@dataclass(frozen=True)
class StackOutcome:
    """What `train_stack` did: per model the stop step (-1: not reached) and divergence."""

    stop_step: Tensor
    diverged: Tensor
    steps: int


def train_stack(
    trainer: StackedTrainer,
    order: Sequence[torch.Generator],
    *,
    batch_size: int,
    metric: str,
    threshold: float,
    max_steps: int,
    check_every: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> StackOutcome:
    """Train until every model met the stopping rule, diverged, or ``max_steps`` steps.

    Every epoch, model ``r`` visits its ``n`` training points in the order of
    ``torch.randperm(n, generator=order[r])`` in batches of ``batch_size`` (the last one
    smaller when ``batch_size`` does not divide ``n``); its draws do not depend on the other
    models of the stack. Every ``check_every`` steps (default: each epoch) the training
    ``metric`` (``"loss"`` or ``"error"``) is evaluated and models at or below ``threshold``
    are frozen at that step; models whose training loss is not finite are frozen as diverged.

    Args:
        trainer: The stack.
        order: One generator per model for its data order.
        batch_size: Examples per step.
        metric: ``"loss"`` or ``"error"``.
        threshold: Stop at ``metric <= threshold``.
        max_steps: Step cap.
        check_every: Steps between checks (None: once an epoch).
        progress: Called with the number of steps done since its last call.
    """
    R, n = trainer.Y.shape[:2]
    per_epoch = -(-n // batch_size)
    every = check_every or per_epoch
    stop = torch.full((R,), -1, dtype=torch.int64)
    diverged = torch.zeros(R, dtype=torch.bool)
    steps, reported = 0, 0
    while steps < max_steps and bool(trainer.active.any()):
        perm = torch.stack([torch.randperm(n, generator=g) for g in order])
        for start in range(0, n, batch_size):
            trainer.step(perm[:, start : start + batch_size])
            steps += 1
            if steps % every == 0 or steps == max_steps:
                loss, err = trainer.evaluate(trainer.X, trainer.Y)
                bad = ~torch.isfinite(loss) & trainer.active
                value = loss if metric == "loss" else err
                met = (value <= threshold) & trainer.active & ~bad
                stop[met] = steps
                diverged |= bad
                trainer.freeze(met | bad)
                if progress is not None:
                    progress(steps - reported)
                    reported = steps
                if not bool(trainer.active.any()):
                    break
            if steps >= max_steps:
                break
    return StackOutcome(stop, diverged, steps)
