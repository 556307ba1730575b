"""What this machine's CPU can do, for tests whose claim holds only on some CPUs."""

import pytest

from deploycomp.hw.detect import detect_host

_FLAGS = set(detect_host(include_gpu=False).cpu_flags)
# Without an INT8 dot-product instruction (VNNI, AMX), ONNX Runtime's x86 u8 x s8 kernels multiply
# with AVX2's vpmaddubsw, which saturates the int16 sum of each pair of products: its integer
# results then differ from the QDQ graph's arithmetic by up to a few percent of the output.
INT8_DOT_PRODUCT = bool(_FLAGS & {"avx512_vnni", "avx_vnni", "amx_int8"})

needs_int8_dot_product = pytest.mark.skipif(
    not INT8_DOT_PRODUCT,
    reason="exact only with an INT8 dot-product instruction (VNNI or AMX): this CPU has neither, "
    "so ONNX Runtime's u8 x s8 kernels saturate int16 pair sums (AVX2 vpmaddubsw)",
)
