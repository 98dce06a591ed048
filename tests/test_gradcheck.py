"""The gradient checker itself: it passes correct ops, catches wrong ones, reports clearly."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.autograd import Function


class WrongSquare(Function):
    """x^2 with a deliberately wrong backward (x instead of 2x)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad * a,)


class SlightlyWrongExp(Function):
    """exp with a backward that is off by 1e-3 relative: small but real."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.exp(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad * np.exp(a) * (1 + 3e-3),)


def x64(shape, seed=0):
    return tm.tensor(np.random.default_rng(seed).standard_normal(shape) + 2.0, requires_grad=True)


def test_correct_op_passes_and_report_is_truthy():
    report = tm.gradcheck(lambda a: (a * a).sum(axis=0), [x64((3, 2))])
    assert report and report.ok
    assert report.inputs[0].mode == "every element" and report.inputs[0].checks == 6


def test_wrong_backward_is_caught_with_a_readable_report():
    with pytest.raises(tm.GradcheckError) as info:
        tm.gradcheck(lambda a: WrongSquare.apply(a), [x64((2, 2))], names=["x"])
    report = info.value.report
    assert not report.ok and len(report.mismatches) == 4
    m = report.mismatches[0]
    assert m.input == "x" and m.where == "(0, 0)"
    assert abs(m.numeric - 2 * m.analytic) < 1e-4 * abs(m.numeric) + 1e-6  # 2x vs x
    assert "MISMATCH x at (0, 0)" in str(info.value)


def test_small_error_is_caught_and_return_false_mode():
    report = tm.gradcheck(lambda a: SlightlyWrongExp.apply(a), [x64((3,))],
                          raise_exception=False)
    assert not report and report.mismatches
    assert 1e-3 < report.mismatches[0].rel_error < 1e-2


def test_large_inputs_use_random_directions_and_still_catch_errors():
    big = x64((30, 30))
    ok = tm.gradcheck(lambda a: a.tanh(), [big], max_elements=100, n_directions=4)
    assert ok.inputs[0].mode == "4 random directions"
    with pytest.raises(tm.GradcheckError):
        tm.gradcheck(lambda a: WrongSquare.apply(a), [x64((30, 30))], max_elements=100)


def test_checker_restores_inputs_and_grads():
    x = x64((2, 3))
    before = x.numpy().copy()
    x.grad = np.full((2, 3), 7.0)
    tm.gradcheck(lambda a: a.exp(), [x])
    np.testing.assert_array_equal(x.numpy(), before)
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 7.0))


def test_float32_inputs_are_refused():
    x = tm.tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    with pytest.raises(TypeError, match="float64"):
        tm.gradcheck(lambda a: a * 2.0, [x])


def test_nondeterministic_function_is_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="different outputs on two calls"):
        tm.gradcheck(lambda a: a * rng.standard_normal(), [x64((2,))])


def test_nothing_to_check_is_an_error():
    with pytest.raises(ValueError, match="no input has requires_grad"):
        tm.gradcheck(lambda a: a * 2.0, [tm.tensor(np.ones(2))])


def test_tuple_outputs_are_all_checked():
    with pytest.raises(tm.GradcheckError):
        tm.gradcheck(lambda a: (a * 2.0, WrongSquare.apply(a)), [x64((2,))])
