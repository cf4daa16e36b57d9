"""Time of Hessian-vector products and of the top eigenvalue on GPT-2, against PyHessian.

    PYTHONPATH=$PWD /work/venv-bench/bin/python benchmarks/bench_gpt2_time.py \\
        --size small [--pairs 4] [--rounds 1] [--threads 2] [--ref-tol 1e-5] \\
        [--basis-sizes 4,8,40] [--out gpt2_time.md]

Hugging Face ``GPT2LMHeadModel`` with random weights (``torch.manual_seed(0)``), eval mode,
float32, CPU, a ``--batch`` x ``--tokens`` batch of random token ids (default 2 x 64);
``--size`` ``small`` (12 layers x 768, 12 heads, 124M), ``medium`` (24 x 1024, 16 heads,
355M), ``quick`` (4 x 256, 4 heads, 16.3M) or ``tiny`` (2 x 128, 2 heads; a smoke test).
Both tools see the same loss, the mean cross-entropy of the next token
(``labels=input_ids``, Hugging Face's shift), and the same attention path, the math SDPA
backend: sharpgen switches to it itself for the products (its loss and gradient-only
passes keep the fused kernel); PyHessian runs inside
``torch.nn.attention.sdpa_kernel([SDPBackend.MATH])`` on a wrapper that returns the logits,
with the criterion ``cross_entropy(logits[:, :-1], ids[:, 1:])``. The script checks that
the two losses agree before timing.

Timed in one process, interleaved rounds (every call once per round, the order alternating
between rounds), medians:

* ``top_eigenvalues(model, loss, data, k=1, tol=1e-3)`` (sharpgen's defaults otherwise:
  kept graph, gradient start, residual certificate), end to end;
* PyHessian's ``hessian(model, criterion, data=(ids, ids), cuda=False)`` (its
  construction builds the kept graph) and ``.eigenvalues(top_n=1, tol=1e-3)`` (power
  iteration), end to end, with the global RNG seeded 0 for its start vector.

Inside each call the products are timed by wrapping them (sharpgen's
``CurvatureOperator.matvec``, PyHessian's ``hessian_vector_product``), and sharpgen's
gradient (``HessianOperator.gradient``, which builds the kept graph) separately, so the
table splits each call into graph build, products and the rest (Lanczos' orthogonalization
and basis I/O, PyHessian's normalizations). Per product: sharpgen's ``matvec`` against
PyHessian's power iteration (its ``eigenvalues`` time over its iterations). The true
relative error of both values is taken against a reference computed once: sharpgen at
``--ref-tol`` (default 1e-6, up to ``--ref-max-iter`` products). The load average is
printed at the start and the end; on a shared machine read the ratios. ``--basis-sizes``
first counts the products of sharpgen's top-1 with Lanczos bases of the given sizes
(``max_basis``, in memory; the iteration is the same in a file). ``--variants`` adds
sharpgen calls with other options to every round (e.g. ``'{"tol1e-2": {"tol": 0.01}}'``:
a looser certified tolerance, to compare the times at equal true errors), each with its
time ratio to PyHessian's call of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

SIZES = {
    "tiny": (2, 128, 2),
    "quick": (4, 256, 4),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
}


class Logits(nn.Module):
    """PyHessian calls ``model(inputs)``: the logits of the wrapped language model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=ids).logits


def criterion(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, the loss Hugging Face computes for ``labels=input_ids``."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def lm_loss(out: Any, _: Any) -> torch.Tensor:
    """sharpgen's loss: the model's own (``labels`` in the inputs)."""
    return out.loss


class Clock:
    """Wraps ``owner.name`` to add up the calls' wall time and count them."""

    def __init__(self, owner: Any, name: str) -> None:
        self.seconds, self.calls = 0.0, 0
        orig = getattr(owner, name)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def build(size: str, batch: int, tokens: int) -> tuple[nn.Module, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, embd, heads = SIZES[size]
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=embd, n_head=heads)
    model = GPT2LMHeadModel(cfg).eval()  # dropout off
    ids = torch.randint(
        0, cfg.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(1)
    )
    return model, ids


def pairs(n: int, model: nn.Module, data: Any, ids: torch.Tensor, ph: Any) -> list[str]:
    """Per product, strictly alternating: sharpgen's kept-graph ``matvec`` and one PyHessian
    power iteration (its loop body: ``orthnormal``, ``zero_grad``, the product, the Rayleigh
    quotient, ``normalization``) on the graphs both keep, ``n`` pairs after one warm-up."""
    from sharpgen.curvature import HessianOperator

    H = HessianOperator(model, lm_loss, data, backend="autograd", cache_graph=True)
    t0 = time.perf_counter()
    H.gradient()  # builds and keeps the graph, as top_eigenvalues' gradient start does
    build_s = time.perf_counter() - t0
    with sdpa_kernel([SDPBackend.MATH]):
        t0 = time.perf_counter()
        h = ph.hessian(Logits(model), criterion, data=(ids, ids), cuda=False)
        build_p = time.perf_counter() - t0
    utils = sys.modules["pyhessian.utils"]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(H.shape[0], generator=g)
    v /= v.norm()
    w = [torch.randn(p.shape, generator=g) for p in h.params]
    w = utils.normalization(w)
    ts: list[float] = []
    tp: list[float] = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        out = H.matvec(v)
        t1 = time.perf_counter()
        v = out / out.norm()
        del out
        t2 = time.perf_counter()
        w = utils.orthnormal(w, [])
        model.zero_grad()
        hv = ph.hessian_vector_product(h.gradsH, h.params, w)
        _ = utils.group_product(hv, w).cpu().item()
        w = utils.normalization(hv)
        del hv
        t3 = time.perf_counter()
        if i:  # the first pair is the warm-up
            ts.append(t1 - t0)
            tp.append(t3 - t2)
        print(json.dumps({"pair": i, "sharpgen_matvec": t1 - t0, "pyhessian_iteration": t3 - t2,
                          "load": load()}), flush=True)  # fmt: skip
    model.zero_grad(set_to_none=True)
    del h, w, H
    ratios = [a / b for a, b in zip(ts, tp, strict=True)]
    return [
        "| per product, alternating | sharpgen kept-graph matvec | PyHessian power iteration "
        "| ratio (median of pairs, range) |",
        "|---|---|---|---|",
        f"| {n} pairs, graph build {build_s:.1f} s / {build_p:.1f} s | "
        f"{statistics.median(ts):.2f} s | {statistics.median(tp):.2f} s | "
        f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) |",
    ]


def summary(
    names: list[str], runs: dict[str, list[dict[str, Any]]], refs: dict[str, float]
) -> list[str]:
    """The Markdown table of the calls and the time ratios against PyHessian."""

    def med(name: str, key: str) -> float:
        return statistics.median(float(o[key]) for o in runs[name])

    def error(v: float) -> str:
        ref = refs.get("smallest" if v < 0 else "largest")
        return "-" if ref is None else f"{abs(v - ref) / abs(ref):.1e}"

    rows = [
        "| call | total s | graph build s | products | s per product | s per iteration "
        "| rest s | value | true rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = [n for n in names if runs[n]]
    for name in names:
        per = med(name, "product_s") / max(1, runs[name][0]["products"])
        it = med(name, "iteration_s") if name == "pyhessian" else (
            (med(name, "total") - med(name, "build")) / runs[name][0]["products"])  # fmt: skip
        rest = med(name, "total") - med(name, "build") - med(name, "product_s")
        vals = [o["value"] for o in runs[name]]
        errs = "/".join(error(v) for v in vals)
        prods = "/".join(str(o["products"]) for o in runs[name])
        rows.append(f"| {name} | {med(name, 'total'):.1f} | {med(name, 'build'):.1f} | {prods} "
                    f"| {per:.2f} | {it:.2f} | {rest:.1f} | {vals[0]:.6g} | {errs} |")  # fmt: skip
    if "pyhessian" in names:
        for name in names:
            if name.startswith("sharpgen "):
                ratio = [a["total"] / b["total"] for a, b in zip(runs[name], runs["pyhessian"],
                                                                 strict=True)]  # fmt: skip
                rows.append(f"\n{name} / PyHessian per round: "
                            f"{', '.join(f'{x:.2f}' for x in ratio)}")  # fmt: skip
    if {"sharpgen", "pyhessian"} <= set(names):
        t_ratio = [a["total"] / b["total"] for a, b in zip(runs["sharpgen"], runs["pyhessian"],
                                                           strict=True)]  # fmt: skip
        s_per = [o["product_s"] / o["products"] for o in runs["sharpgen"]]
        p_it = [o["iteration_s"] for o in runs["pyhessian"]]
        p_prod = [o["product_s"] / o["products"] for o in runs["pyhessian"]]
        rows.append("")
        rows.append(
            f"top-1 time, sharpgen / PyHessian per round: "
            f"**{', '.join(f'{x:.2f}' for x in t_ratio)}** (target <= 0.33)  "
        )
        rows.append(f"per product inside the calls, sharpgen matvec / PyHessian power iteration: "
                    f"{statistics.median(s_per) / statistics.median(p_it):.2f} (target <= 1); "
                    f"/ PyHessian's bare product: "
                    f"{statistics.median(s_per) / statistics.median(p_prod):.2f}")  # fmt: skip
    return rows


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of whole top-1 calls")
    ap.add_argument("--pairs", type=int, default=4, help="alternating per-product pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--ref-tol", type=float, default=1e-5)
    ap.add_argument("--ref-max-iter", type=int, default=300)
    ap.add_argument("--no-ref", action="store_true", help="skip the reference (no errors)")
    ap.add_argument("--calls", default="sharpgen,pyhessian")
    ap.add_argument("--basis-sizes", default="", help="e.g. 4,8,40: products per basis size")
    ap.add_argument("--options", default="", help="JSON: extra keyword arguments of sharpgen")
    ap.add_argument(
        "--variants",
        default="",
        help="JSON {name: options}: more sharpgen calls per round, e.g. "
        '\'{"tol1e-2": {"tol": 0.01}, "gap": {"bound": "gap"}}\'',
    )
    ap.add_argument("--out", default=None, help="also write the Markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pyhessian  # noqa: F401  (registers pyhessian.hessian)

    from sharpgen import ModelObjective, top_eigenvalues
    from sharpgen.curvature import HessianOperator
    from sharpgen.curvature._base import CurvatureOperator

    ph = sys.modules["pyhessian.hessian"]
    hvp = Clock(ph, "hessian_vector_product")
    matvec = Clock(CurvatureOperator, "matvec")
    grad = Clock(HessianOperator, "gradient")
    model, ids = build(args.size, args.batch, args.tokens)
    data = ({"input_ids": ids, "labels": ids}, None)
    extra = json.loads(args.options) if args.options else {}
    params = sum(p.numel() for p in model.parameters())
    load0 = load()
    print(f"GPT-2 {args.size}: {params / 1e6:.1f}M parameters, load {load0}", flush=True)

    with torch.no_grad():
        ours = float(ModelObjective(model, lm_loss, data).loss())
        with sdpa_kernel([SDPBackend.MATH]):
            theirs = float(criterion(Logits(model)(ids), ids))
    if abs(ours - theirs) > 1e-5 * abs(ours):
        raise SystemExit(f"the losses differ: sharpgen {ours}, PyHessian's criterion {theirs}")
    print(f"loss: sharpgen {ours:.6f}, PyHessian criterion {theirs:.6f}", flush=True)

    def run_sharpgen(**variant: Any) -> dict[str, Any]:
        matvec.reset()
        grad.reset()
        t0 = time.perf_counter()
        opts = {"tol": args.tol, **extra, **variant}
        r = top_eigenvalues(model, lm_loss, data, k=1,
                            generator=torch.Generator().manual_seed(0), **opts)  # fmt: skip
        total = time.perf_counter() - t0
        return dict(total=total, build=grad.seconds, products=r.num_matvecs,
                    product_s=matvec.seconds, product_calls=matvec.calls,
                    value=float(r.eigenvalues[0]), converged=bool(r.converged),
                    residual=float(r.residuals[0]), plan=repr(r.memory))  # fmt: skip

    def run_pyhessian() -> dict[str, Any]:
        hvp.reset()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with sdpa_kernel([SDPBackend.MATH]):
            h = ph.hessian(Logits(model), criterion, data=(ids, ids), cuda=False)
            t1 = time.perf_counter()
            vals, vecs = h.eigenvalues(top_n=1, tol=args.tol)
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)  # PyHessian leaves .grad (with its graph) filled
        del h, vecs
        return dict(total=t2 - t0, build=t1 - t0, products=hvp.calls, product_s=hvp.seconds,
                    iteration_s=(t2 - t1) / hvp.calls, value=float(vals[0]))  # fmt: skip

    if args.basis_sizes:  # products against the basis size (load-independent counts)
        for m in (int(x) for x in args.basis_sizes.split(",")):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(0)
            r = top_eigenvalues(model, lm_loss, data, k=1, tol=args.tol, max_basis=m,
                                memory_budget=None, generator=gen)  # fmt: skip
            print(json.dumps({"max_basis": m, "products": r.num_matvecs,
                              "restarts": r.num_restarts, "value": float(r.eigenvalues[0]),
                              "seconds": time.perf_counter() - t0}), flush=True)  # fmt: skip
    pair_rows = pairs(args.pairs, model, data, ids, ph) if args.pairs else []
    calls: dict[str, Any] = {"sharpgen": run_sharpgen, "pyhessian": run_pyhessian}
    names = [c for c in args.calls.split(",") if c]
    for vname, vopts in (json.loads(args.variants) if args.variants else {}).items():
        calls[f"sharpgen {vname}"] = lambda vopts=vopts: run_sharpgen(**vopts)
        names.append(f"sharpgen {vname}")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            out = calls[name]()
            out["load"] = load()
            runs[name].append(out)
            print(json.dumps({"round": i, "call": name, **out}), flush=True)

    refs: dict[str, float] = {}
    if not args.no_ref:  # PyHessian's power iteration finds the eigenvalue of largest modulus
        negative = any(o["value"] < 0 for o in runs.get("pyhessian", []))
        extra = {k: v for k, v in extra.items() if k not in ("tol", "bound")}
        for which in ("largest", "smallest") if negative else ("largest",):
            t0 = time.perf_counter()
            r = top_eigenvalues(model, lm_loss, data, k=1, tol=args.ref_tol, which=which,
                                max_iter=args.ref_max_iter,
                                generator=torch.Generator().manual_seed(1), **extra)  # fmt: skip
            refs[which] = float(r.eigenvalues[0])
            print(json.dumps({"reference": refs[which], "which": which, "tol": args.ref_tol,
                              "products": r.num_matvecs, "converged": bool(r.converged),
                              "residual": float(r.residuals[0]),
                              "seconds": time.perf_counter() - t0}), flush=True)  # fmt: skip
    load1 = load()

    rows = summary(names, runs, refs)
    head = (f"GPT-2 {args.size} ({params / 1e6:.1f}M), batch {args.batch} x {args.tokens}, "
            f"float32, {args.threads} threads, torch {torch.__version__}; medians of "
            f"{args.rounds} interleaved rounds; load average {load0} (start) / {load1} (end); "
            f"references {refs} (sharpgen, tol {args.ref_tol}).")  # fmt: skip
    text = head + "\n\n" + "\n".join(pair_rows) + "\n\n" + "\n".join(rows) + "\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
