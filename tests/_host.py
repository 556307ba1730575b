"""What this machine's CPU can do, for tests whose claim holds only on some CPUs."""

import pytest

from deploycomp.hw.detect import has_int8_dot_product

# Without an INT8 dot-product instruction ONNX Runtime's x86 INT8 kernels saturate (see
# has_int8_dot_product): their results then differ from the QDQ graph's arithmetic.
INT8_DOT_PRODUCT = has_int8_dot_product()

needs_int8_dot_product = pytest.mark.skipif(
    not INT8_DOT_PRODUCT,
    reason="exact only with an INT8 dot-product instruction (VNNI or AMX): this CPU has neither, "
    "so ONNX Runtime's u8 x s8 kernels saturate int16 pair sums (AVX2 vpmaddubsw)",
)
