r"""Bayesian SAM (bSAM, Moellenhoff & Khan 2023): SAM as an optimal relaxation of Bayes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sharpgen._validation import check_int, check_interval, check_positive, check_rho
from sharpgen.optim._base import SAMBase, copy_back
from sharpgen.optim._groups import PerturbSelector
from sharpgen.optim._state import _NONFINITE, _PERTURBED
from sharpgen.sharpness._sam_kernel import sam_grad_norms, total_norm

__all__ = ["BSAM"]

_S, _M = "bsam_s", "bsam_momentum"  # the keys of s and g_m in the optimizer state
_RNG = "bsam_generator"  # the key of the generator's state in the state dict


class _BayesStep(Optimizer):
    r"""bSAM's Adam-like step on $g_\varepsilon$ (``.grad``) and the noisy gradient $g$."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        damping: float = 0.1,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "damping": damping}
        )
        self.noisy: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            delta, damping = group["weight_decay"], group["damping"]
            for p in group["params"]:
                g = self.noisy.get(p)
                if p.grad is None or g is None:
                    continue
                state = self.state[p]
                m, s = state[_M], state[_S]
                m.mul_(beta1).add_(p.grad.add(p, alpha=delta), alpha=1.0 - beta1)
                s_new = s.sqrt().mul_(g.abs()).add_(delta + damping)
                s.mul_(beta2).add_(s_new, alpha=1.0 - beta2)
                p.addcdiv_(m, s, value=-float(group["lr"]))


class BSAM(SAMBase):
    r"""Bayesian SAM: an Adam-like SAM on a Gaussian posterior $\mathcal N(w, 1/(N s))$.

    Algorithm 1 ("bSAM") of Moellenhoff & Khan (2023), elementwise, with $s$ the posterior
    precision per weight ($\sigma^2 = 1/(N s)$, $N$ the training-set size), $\delta$ the L2
    regularizer (``weight_decay``) and $\gamma$ the ``damping``:

    $$
    \begin{aligned}
    g &= \nabla L(w + e),\ e \sim \mathcal N\!\bigl(0, \tfrac{1}{N s}\bigr), &
    \varepsilon &= \rho\, g / s, &
    g_\varepsilon &= \nabla L(w + \varepsilon), \\
    g_m &\leftarrow \beta_1 g_m + (1 - \beta_1)(g_\varepsilon + \delta w), &
    s &\leftarrow \beta_2 s + (1 - \beta_2)\bigl(\sqrt s\, |g| + \delta + \gamma\bigr), &
    w &\leftarrow w - \eta\, g_m / s.
    \end{aligned}
    $$

    bSAM is its own optimizer (no ``base_optimizer``): the first pass is at the noisy point
    $w + e$ (BatchNorm statistics are updated there), the second at $w + \varepsilon$ (frozen),
    and the weights come back exactly to $w$ before the step. $s$ and $g_m$ live in the
    optimizer state (``"bsam_s"``, ``"bsam_momentum"``; $s_0$ = ``s_init``, $g_m = 0$), and the
    state dict also carries the generator's state, so a resume is bit for bit. The noise comes
    only from ``generator``; ``perturb`` restricts $\varepsilon$ (the noise is on every
    parameter). A non-finite $g$ or $g_\varepsilon$ skips the step (state unchanged).

    Two-call style: `sample_noise` (weights to $w + e$), backward, `first_step` (back to $w$,
    then to $w + \varepsilon$), backward, `second_step`. Without `sample_noise`, $g$ is taken
    at $w$ (the limit $N \to \infty$).

    Deviation from pytorch-optimizer's ``BSAM``: this follows the paper, whose noise has
    *variance* $1/(N s)$ and whose momentum averages $g_\varepsilon + \delta w$; that
    implementation uses $1/(N s)$ as the standard deviation, averages $\delta g_\varepsilon$,
    squares the new $s$ term and keeps the noise in the weights.

    Memory: $s$ and $g_m$ (two parameter copies, as Adam), plus one copy of the weights and
    one of $g$ during the step.

    Args:
        params: Parameters or param groups.
        num_data: $N$, the number of training examples.
        lr: $\eta$ (the paper uses 0.1 to 0.5 on CIFAR).
        rho: $\rho \ge 0$.
        betas: $(\beta_1, \beta_2)$, each in $[0, 1)$.
        weight_decay: $\delta \ge 0$ (an L2 regularizer, also part of the precision).
        damping: $\gamma \ge 0$.
        s_init: $s_0 > 0$, the initial precision.
        generator: The source of the noise; ``None``: a private CPU generator seeded with 0
            (the global RNG is never used).
        perturb: As for `SAM`.
        model: As for `SAM` (BatchNorm freeze in the second pass, parameter names).
        same_dropout: As for `SAM`.

    Raises:
        ValueError: ``num_data < 1``, ``betas`` outside $[0, 1)$, negative options.
        TypeError: ``generator`` not a `torch.Generator`.

    Examples:
        >>> import torch
        >>> from sharpgen.optim import BSAM
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = BSAM(model.parameters(), num_data=8, lr=0.1, rho=0.05,
        ...            generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> opt.state[model.weight]["bsam_s"].shape
        torch.Size([1, 3])

    References:
        Moellenhoff & Khan (2023), *SAM as an Optimal Relaxation of Bayes*, ICLR,
        arXiv:2210.01620 (Algorithm 1).
    """

    _generator_key = _RNG

    def __init__(
        self,
        params: Iterable[Any],
        num_data: int,
        lr: float = 0.1,
        rho: float = 0.05,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        damping: float = 0.1,
        s_init: float = 1.0,
        generator: torch.Generator | None = None,
        perturb: PerturbSelector = None,
        model: nn.Module | None = None,
        same_dropout: bool = False,
    ) -> None:
        self._num_data = check_int("num_data", num_data, hint="(The training-set size.)")
        self._s_init = check_positive("s_init", s_init)
        self._own_generator(generator)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
        for name, beta in zip(("betas[0]", "betas[1]"), betas, strict=True):
            check_interval(name, beta, 0, 1)
        base_kwargs = {
            "lr": check_positive("lr", lr, allow_zero=True),
            "betas": (float(betas[0]), float(betas[1])),
            "weight_decay": check_positive("weight_decay", weight_decay, allow_zero=True),
            "damping": check_positive("damping", damping, allow_zero=True),
        }
        self._noise_saved: dict[Tensor, Tensor] = {}
        self._init_common("l2", True, perturb, model, same_dropout, _BayesStep)
        self._build(params, _BayesStep, {"rho": check_rho(rho)}, base_kwargs)

    # -- the noise --------------------------------------------------------------------------
    def _state_of(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if _S not in state:
            state[_S] = torch.full_like(p, self._s_init, memory_format=torch.preserve_format)
            state[_M] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def sample_noise(self) -> None:
        r"""Move the weights to $w + e$, $e \sim \mathcal N(0, 1/(N s))$ (two-call style).

        A copy of $w$ is kept; `first_step` (or `restore_noise`) brings it back exactly.

        Raises:
            RuntimeError: the weights are already noisy or perturbed.
        """
        if self._noise_saved or self._phase == _PERTURBED:
            raise RuntimeError("sample_noise() called while the weights are noisy or perturbed.")
        gen = self._generator
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                s = self._state_of(p)[_S]
                e = torch.randn(p.shape, generator=gen, device=gen.device, dtype=p.dtype)
                self._noise_saved[p] = p.detach().clone()
                p.add_(e.to(p.device).div_((s * self._num_data).sqrt()))

    @torch.no_grad()
    def restore_noise(self) -> None:
        """Copy $w$ back after `sample_noise` (exactly); a no-op when the weights are not noisy."""
        saved, self._noise_saved = self._noise_saved, {}
        copy_back(saved)

    # -- the step ---------------------------------------------------------------------------
    def _first_pass(self, closure: Callable[[], Any]) -> Any:
        """The first pass at the noisy point $w + e$."""
        self.restore_noise()
        self.sample_noise()
        try:
            return super()._first_pass(closure)
        except BaseException:
            self.restore_noise()
            raise

    @torch.no_grad()
    def _perturb(self, grad_scale: float | None) -> bool:
        self.restore_noise()
        noisy = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._state_of(p)
                    noisy[p] = p.grad.detach().clone()
        self._base().noisy = noisy
        grads = list(noisy.values())
        total = float(total_norm(sam_grad_norms(grads, grads, foreach=True))) if grads else 0.0
        self._pending = {"grad_norm": total, "reason": None}
        if not grads:
            return self._skip_perturbation("no gradient")
        if not math.isfinite(total):
            self._nonfinite_reason = self._pending["reason"] = "non-finite gradient at w + e"
            self._phase = _NONFINITE
            return False
        for group in self.param_groups:
            rho = float(group["rho"])
            for p in group["params"]:
                if p in noisy and self._is_selected(p):
                    self._save_weights([p])
                    p.addcdiv_(noisy[p], self.state[p][_S], value=rho)
        return self._mark_perturbed()

    def _base(self) -> _BayesStep:
        base = self.base_optimizer
        assert isinstance(base, _BayesStep)
        return base

    def _also_finite(self) -> list[Tensor]:
        return list(self._base().noisy.values())

    def _discard_first_gradient(self) -> None:
        super()._discard_first_gradient()
        if getattr(self, "_base_ready", False):
            self._base().noisy = {}

    def _after_step(self, stepped: bool) -> None:
        self._base().noisy = {}

    def restore(self) -> None:
        r"""Copy the saved weights back (exactly), from $w + e$ or $w + \varepsilon$; idempotent."""
        self.restore_noise()
        super().restore()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state ($s$, $g_m$, the groups) and the generator's state."""
        if self._noise_saved:
            raise RuntimeError("state_dict() called while the weights are noisy; finish the step.")
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict` (the generator's state too, when present)."""
        if self._noise_saved:
            raise RuntimeError("load_state_dict() called while the weights are noisy.")
        super().load_state_dict(state_dict)

    def __repr__(self) -> str:
        g = self.param_groups[0]
        return (
            f"BSAM(num_data={self._num_data}, lr={g['lr']!r}, rho={g['rho']!r}, "
            f"betas={g['betas']!r}, weight_decay={g['weight_decay']!r}, damping={g['damping']!r})"
        )
