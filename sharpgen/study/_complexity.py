r"""Classical complexity measures of Jiang et al. (2020) and Dziugaite et al. (2020) (private).

Notation: $W_1, \dots, W_d$ are the layer weight matrices of the model (every parameter with
at least two dimensions, a convolution kernel read as ``W.reshape(out, -1)``; for the paper's
`sharpgen.models.TwoLayerNet` the output weights ``W2`` count as the $1 \times m$ matrix
they are), $W_i^0$ the same at initialization, $\|\cdot\|_F$ the Frobenius and
$\|\cdot\|_2$ the spectral norm, and $\gamma$ the 10th percentile of the training margins
$f(x)[y] - \max_{j \ne y} f(x)[j]$ (for a single-output model $y\,f(x)$ with labels
$\pm 1$, or $(2y-1) f(x)$ with labels $\{0, 1\}$), as Jiang et al. (2020, Sec. 4 and
Appendix C.1) take it, the margin being scale-sensitive and the 10th percentile more robust
than the minimum.

References:
    Jiang, Neyshabur, Mobahi, Krishnan & Bengio (2020), "Fantastic Generalization Measures
    and Where to Find Them", ICLR, arXiv:1912.02178 (Appendix C).
    Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas & Roy (2020), "In Search
    of Robust Measures of Generalization", NeurIPS, arXiv:2010.11924.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from sharpgen.curvature import preserve_model_state
from sharpgen.curvature._data import as_batches, call_model
from sharpgen.models import TwoLayerNet
from sharpgen.study._record import TrainedModel

__all__ = ["layer_weights", "margins", "path_norm_sq"]


def layer_weights(tm: TrainedModel, init: bool = False) -> list[Tensor]:
    """The layer weight matrices $W_i$ (or $W_i^0$ with ``init=True``), detached, float64."""
    if init and tm.init_params is None:
        raise ValueError(
            f"model {tm.name!r} has no init_params; this measure needs the parameters at "
            "initialization (TrainedModel(init_params=...))."
        )
    params = dict(tm.model.named_parameters())
    source = tm.init_params if init else {k: v for k, v in params.items()}
    assert source is not None
    weights = []
    for name, p in params.items():
        if p.ndim >= 2 or (isinstance(tm.model, TwoLayerNet) and name == "W2"):
            w = source[name].detach().to(torch.float64)
            weights.append(w.reshape(w.shape[0], -1) if w.ndim >= 2 else w.reshape(1, -1))
    if not weights:
        raise ValueError(f"model {tm.name!r} has no weight matrices (parameters with ndim >= 2).")
    return weights


def margins(tm: TrainedModel) -> Tensor:
    """The training margins of every sample (float64, eval mode, the model untouched)."""
    out = []
    with preserve_model_state(tm.model, copy_values=False), torch.no_grad():
        tm.model.eval()
        for inputs, targets in as_batches(tm.train_data):
            f = call_model(tm.model, inputs).to(torch.float64)
            if f.ndim >= 2 and f.shape[-1] > 1:
                y = targets.argmax(-1) if targets.ndim == f.ndim else targets
                true = f.gather(-1, y.long().reshape(-1, 1)).reshape(-1)
                other = f.scatter(-1, y.long().reshape(-1, 1), -math.inf).amax(-1)
                out.append(true - other)
            else:
                t = targets.reshape(-1).to(torch.float64)
                if bool(((t == 0) | (t == 1)).all()):
                    t = 2 * t - 1
                out.append(t * f.reshape(-1))
    return torch.cat(out)


def margin(tm: TrainedModel) -> float:
    r"""$\gamma$: the 10th percentile of the training margins; must be positive."""
    gamma = float(torch.quantile(margins(tm), 0.1))
    if not gamma > 0:
        raise ValueError(
            f"model {tm.name!r} has a 10th-percentile training margin {gamma:.3g} <= 0 (more "
            "than 10% of the training set misclassified); margin-based measures need a "
            "model that fits its training data."
        )
    return gamma


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


def _fro2(ws: list[Tensor]) -> list[float]:
    return [float(w.pow(2).sum()) for w in ws]


def _spec2(ws: list[Tensor]) -> list[float]:
    return [float(torch.linalg.matrix_norm(w, ord=2)) ** 2 for w in ws]


def num_params(tm: TrainedModel, generator: Any = None) -> float:
    r"""Number of trainable parameters $\sum_p \mathrm{numel}(p)$ (Jiang et al. 2020, App. C)."""
    return float(sum(p.numel() for p in tm.model.parameters() if p.requires_grad))


def inverse_margin(tm: TrainedModel, generator: Any = None) -> float:
    r"""$1/\gamma^2$ (Jiang et al. 2020, App. C)."""
    return 1.0 / margin(tm) ** 2


def param_norm(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\sum_i \|W_i\|_F^2$ (Jiang et al. 2020, App. C, "param-norm")."""
    return sum(_fro2(layer_weights(tm)))


def frob_distance(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\sum_i \|W_i - W_i^0\|_F^2$ (Jiang et al. 2020, App. C, "frob-distance")."""
    ws, w0 = layer_weights(tm), layer_weights(tm, init=True)
    return sum(float((w - v).pow(2).sum()) for w, v in zip(ws, w0, strict=True))


def dist_spec_init(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\sum_i \|W_i - W_i^0\|_2^2$ (Jiang et al. 2020, App. C, "dist-spec-init")."""
    ws, w0 = layer_weights(tm), layer_weights(tm, init=True)
    return sum(_spec2([w - v for w, v in zip(ws, w0, strict=True)]))


def log_prod_of_fro(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\log \prod_i \|W_i\|_F^2$ (Jiang et al. 2020, App. C)."""
    return sum(math.log(v) for v in _fro2(layer_weights(tm)))


def log_sum_of_fro(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\log\bigl(d\,(\prod_i \|W_i\|_F^2)^{1/d}\bigr)$ (Jiang et al. 2020, App. C)."""
    v = _fro2(layer_weights(tm))
    return math.log(len(v)) + sum(math.log(x) for x in v) / len(v)


def log_prod_of_fro_over_margin(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\log\bigl(\prod_i \|W_i\|_F^2 / \gamma^2\bigr)$ (Jiang et al. 2020, App. C)."""
    return log_prod_of_fro(tm) - 2 * math.log(margin(tm))


def log_prod_of_spec(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\log \prod_i \|W_i\|_2^2$ (Jiang et al. 2020, App. C)."""
    return sum(math.log(v) for v in _spec2(layer_weights(tm)))


def log_sum_of_spec(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\log\bigl(d\,(\prod_i \|W_i\|_2^2)^{1/d}\bigr)$ (Jiang et al. 2020, App. C)."""
    v = _spec2(layer_weights(tm))
    return math.log(len(v)) + sum(math.log(x) for x in v) / len(v)


def log_spec_over_margin(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\log\bigl(\prod_i \|W_i\|_2^2 / \gamma^2\bigr)$ (Jiang et al. 2020, App. C)."""
    return log_prod_of_spec(tm) - 2 * math.log(margin(tm))


def log_spec_orig_main(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\log\bigl(\prod_i \|W_i\|_2^2 \sum_i \frac{\|W_i\|_F^2}{\|W_i\|_2^2} / \gamma^2\bigr)$.

    The main term of the spectral bound of Bartlett et al. (2017) / Neyshabur et al. (2018)
    as Jiang et al. (App. C, "spec-orig-main") state it.
    """
    ws = layer_weights(tm)
    s, f = _spec2(ws), _fro2(ws)
    ratio = sum(a / b for a, b in zip(f, s, strict=True))
    return sum(math.log(v) for v in s) + _log(ratio) - 2 * math.log(margin(tm))


def log_spec_init_main(tm: TrainedModel, generator: Any = None) -> float:
    r"""The spectral bound with the distance from initialization ("spec-init-main").

    $\log\bigl(\prod_i \|W_i\|_2^2 \sum_i \|W_i - W_i^0\|_F^2 / \|W_i\|_2^2 / \gamma^2\bigr)$
    (Jiang et al. 2020, App. C): the spectral bound with the distance from initialization in
    place of the norm.
    """
    ws, w0 = layer_weights(tm), layer_weights(tm, init=True)
    s = _spec2(ws)
    dist = _fro2([w - v for w, v in zip(ws, w0, strict=True)])
    ratio = sum(a / b for a, b in zip(dist, s, strict=True))
    return sum(math.log(v) for v in s) + _log(ratio) - 2 * math.log(margin(tm))


def path_norm_sq(tm: TrainedModel) -> float:
    r"""$\sum_j f_{w^2}(\mathbf 1)[j]$: the network with every parameter squared, on ones.

    For a ReLU network (positively homogeneous, all parameters squared so every
    pre-activation is non-negative) this is the squared $\ell_2$ path norm, the sum over
    input-output paths of the product of squared weights (biases count as weights of
    paths that start at a unit); exact only for ReLU / linear layers.
    """
    x, _ = as_batches(tm.train_data).first()
    if not isinstance(x, Tensor):
        raise TypeError(f"path_norm needs tensor inputs; model {tm.name!r} takes {type(x)}.")
    ones = torch.ones((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    squared = {n: p.detach() ** 2 for n, p in tm.model.named_parameters()}
    with preserve_model_state(tm.model, copy_values=False), torch.no_grad():
        tm.model.eval()
        out = functional_call(tm.model, squared, (ones,))
    return float(out.to(torch.float64).sum())


def path_norm(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\sum_j f_{w^2}(\mathbf 1)[j]$ (Jiang et al. 2020, App. C, "path-norm"), ReLU networks."""
    return path_norm_sq(tm)


def path_norm_over_margin(tm: TrainedModel, generator: Any = None) -> float:
    r"""$\sum_j f_{w^2}(\mathbf 1)[j] / \gamma^2$ (Jiang et al. 2020, App. C)."""
    return path_norm_sq(tm) / margin(tm) ** 2
