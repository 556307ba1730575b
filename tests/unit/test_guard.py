"""The accuracy guard: which (engine, eval set) pairs miss it, and why."""

from deploycomp.artifacts import AccuracyRow
from deploycomp.measure.guard import AccuracyGuard, guard_misses


def row(backend, variant, eval_set, value=None, cosine=1.0, finite=True):
    return AccuracyRow(backend, variant, eval_set, "top1" if value is not None else "", value,
                       100, 1.0, cosine, 40.0, finite)


REFERENCE = [row("torch", "fp32", "labelled", 0.90), row("torch", "fp32", "pool")]


def test_a_small_drop_and_a_kept_direction_pass():
    rows = [*REFERENCE, row("onnxruntime", "compiled", "labelled", 0.86),
            row("onnxruntime", "compiled", "pool", cosine=0.95)]
    assert guard_misses(rows, AccuracyGuard()) == []


def test_a_labelled_drop_past_the_limit_misses():
    rows = [*REFERENCE, row("openvino", "compiled", "labelled", 0.80)]
    (miss,) = guard_misses(rows, AccuracyGuard())
    assert "openvino on labelled drops 10.00 points (allowed 5)" == miss
    assert guard_misses(rows, AccuracyGuard(max_drop_points=12.0)) == []


def test_an_unlabelled_set_misses_on_cosine_and_non_finite_outputs_always_miss():
    rows = [*REFERENCE, row("openvino", "compiled", "pool", cosine=0.21),
            row("onnxruntime", "compiled", "labelled", 0.90, finite=False)]
    misses = guard_misses(rows, AccuracyGuard())
    assert any("cosine 0.210" in m for m in misses)
    assert any("non-finite" in m for m in misses)


def test_only_compiled_engines_are_judged():
    rows = [*REFERENCE, row("openvino", "default_precision", "labelled", 0.10)]
    assert guard_misses(rows, AccuracyGuard()) == []


def test_a_drop_exactly_at_the_limit_passes():
    rows = [row("torch", "fp32", "labelled", 0.905), row("onnxruntime", "compiled", "labelled",
                                                          0.855)]
    assert guard_misses(rows, AccuracyGuard()) == []  # 100 * (0.905 - 0.855) = 5.000000000000004
