"""Small helpers shared by the shape/dtype rules of the op table."""
from __future__ import annotations

import math

import numpy as np

import ember.ir.dtypes as dtypes
from ember.errors import ShapeError
from ember.ir.types import TensorType

FLOAT_ACT = (dtypes.f32,)
F32_OR_F16 = (dtypes.f32, dtypes.f16)


def require(cond: bool, message: str):
    if not cond:
        raise ShapeError(message)


def require_finite(op: str, attrs: dict, *names: str):
    """A scale or cap of NaN or infinity has no meaning, and the backends' kernels would each
    turn it into something else (NaN rows on one, zero rows on another): refuse it."""
    for name in names:
        require(math.isfinite(attrs[name]), f"{op}: attribute {name}={attrs[name]!r} is not a finite number")


def expect_dtype(op: str, what: str, t: TensorType, allowed):
    require(t.dtype in allowed, f"{op}: {what} has dtype {t.dtype}, expected one of "
                                f"{', '.join(d.name for d in allowed)}")


def broadcasts_to(small: tuple, big: tuple) -> bool:
    if len(small) > len(big):
        return False
    for s, b in zip(reversed(small), reversed(big)):
        if s != b and s != 1:
            return False
    return True


def as_f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32, copy=False)


def f32(shape) -> TensorType:
    return TensorType(dtypes.f32, tuple(shape))
