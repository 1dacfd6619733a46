"""The tolerance rule of fusedrnn.testing (design.md §4), which the CPU and CUDA tests and the
GPU check share: its bounds at their edges, and the assertion built on it."""

import pytest
import torch

from fusedrnn.testing import (
    BF16_FLOOR,
    FP16_FLOOR,
    FP32_TOL,
    FP64_TOL,
    assert_close,
    within_tolerance,
)

F64 = torch.float64


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, FP64_TOL), (torch.float32, FP32_TOL)], ids=["float64", "float32"]
)
def test_float_rule_is_tol_plus_tol_times_ref(dtype, tol):
    ref = torch.tensor([0.0, 1.0, -3.0], dtype=F64)
    edge = ref + (tol + tol * ref.abs()) * 0.999
    assert within_tolerance(edge, ref, dtype)[0]
    assert_close(edge, ref, dtype, "edge")
    over = ref.clone()
    over[2] += (tol + tol * 3.0) * 1.001
    ok, bound = within_tolerance(over, ref, dtype)
    assert not ok and bound == f"{tol} + {tol}|ref|"
    with pytest.raises(AssertionError, match=r"^over: max abs err .*, bound "):
        assert_close(over, ref, dtype, "over")


@pytest.mark.parametrize(
    "dtype, floor",
    [(torch.bfloat16, BF16_FLOOR), (torch.float16, FP16_FLOOR)],
    ids=["bfloat16", "float16"],
)
def test_half_rule_is_twice_the_lowp_error_plus_floor(dtype, floor):
    ref = torch.tensor([0.5, -2.0, 1.0], dtype=F64)
    lowp = ref + torch.tensor([0.0, 0.01, 0.0], dtype=F64)
    bound = 2 * 0.01 + floor * 2.0
    assert within_tolerance(ref + 0.999 * bound, ref, dtype, lowp)[0]
    assert not within_tolerance(ref + 1.001 * bound, ref, dtype, lowp)[0]
    with pytest.raises(ValueError, match="lowp"):
        within_tolerance(ref, ref, dtype)


def test_results_must_be_finite_of_the_shape_and_half_dtype():
    ref = torch.zeros(2, 3, dtype=F64)
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert within_tolerance(nan, ref, torch.float32) == (False, "finite values")
    assert not within_tolerance(ref[:1], ref, torch.float32)[0]
    with pytest.raises(AssertionError, match="dtype torch.float64"):
        assert_close(ref, ref, torch.bfloat16, "half", ref)  # a bf16 result must be bf16
    assert_close(ref.bfloat16(), ref, torch.bfloat16, "half", ref)
