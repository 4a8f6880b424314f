"""Float tolerances from the precision and the scale of what is compared, one helper per kind of comparison.

A fixed `atol=1e-6` is a guess that holds on one CPU: summation order follows the SIMD kernels (AVX2 here,
AVX-512 elsewhere), so a bound must come from the dtype's epsilon and the size of the values. Comparisons
that must be exact (resume, bit-for-bit round trips) stay `torch.equal`; none of these helpers is for them.
"""
import math

import pytest
import torch


def eps(dtype: torch.dtype = torch.float32) -> float:
    return torch.finfo(dtype).eps


def scale(values) -> float:
    """The largest magnitude among `values` (a tensor, a number or a list of numbers)."""
    return torch.as_tensor(values, dtype=torch.float64).abs().max().item()


def reordered(expected, ulps: float = 64) -> dict:
    """Same math in float32, rounded in another order: another kernel, batch size, padding length, SIMD width,
    fused or compiled kernels, rank count, or a float64 reference of the same formulas. A reordered sum errs
    by a few roundings of its largest terms, not of each element, so every element gets `ulps` ulps of the
    largest value compared (a small element next to large ones errs as much as they do); rtol matches."""
    return dict(rtol=ulps * eps(), atol=ulps * eps() * scale(expected))


def lower_precision(expected, dtype: torch.dtype = torch.bfloat16, ulps: float = 8) -> dict:
    """A result computed in `dtype` (bf16 autocast, bf16 features) against float32 or against another run in
    `dtype`: every layer rounds its activations to `dtype`, so the error is a few eps(dtype) of the values'
    scale, whatever float32 does; rtol matches."""
    return dict(rtol=ulps * eps(dtype), atol=ulps * eps(dtype) * scale(expected))


def rounded(dtype: torch.dtype = torch.float32, ulps: float = 4, roundings: int = 1) -> float:
    """Relative error of values that are `dtype` roundings of exact ones, elementwise with no sum mixing large
    and small elements (float32 tables of float64 ones): each rounding errs by eps/2 relative, and a chain of
    n roundings (a cumulative product) errs as a random walk, ~sqrt(n) of them. Use as rtol (atol 0) or as a
    bound on `rel_err`."""
    return ulps * eps(dtype) * math.sqrt(roundings)


def conditioned(amplified, ulps: float = 8) -> dict:
    """A float32 formula that amplifies the rounding of its inputs: x0 from eps divides x_t by sqrt(a_t)
    (0.006 at t = 999); float32 `1 - a_t` cancels at small t. Errors are a few ulps of each input times the
    formula's condition number, so pass `amplified` = |input| x condition number, per element; rtol 0."""
    return dict(rtol=0.0, atol=ulps * eps() * scale(amplified))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||: the whole output's relative error."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def reimplemented(ulps: float = 64) -> float:
    """Bound on `rel_err` between two implementations of the same network (ours and diffusers'), both in
    float32: they round in different orders through every layer, so the output's relative error is some ulps
    of float32, while a wrong mask, key or missing term gives a relative error of order one."""
    return ulps * eps()


def adam_steps(lr: float, steps: float, fraction: float = 0.05) -> dict:
    """Weights after AdamW steps whose gradients differ only by rounding (another rank count, compiled
    kernels). Adam normalises each update to about lr, so a gradient near zero, whose sign or size is set by
    rounding, moves its weight by up to ~lr per step either way: the scale is lr x steps (warmup's partial
    steps as fractions), not the weights. `fraction` of it is far above what rounding moves (measured
    <= 0.008 of lr x steps in float32) and far below a wrong gradient or update, which moves weights by ~all."""
    return dict(rtol=0.0, atol=fraction * lr * steps)


def approx(expected, tol: dict):
    """`pytest.approx` with one of the dicts above, as assert_close reads it at the largest value: approx takes
    the larger of rel and abs, where assert_close adds atol and rtol |expected|."""
    return pytest.approx(expected, rel=0, abs=tol["atol"] + tol["rtol"] * scale(expected))
