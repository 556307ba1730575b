"""Whether the latency batches fit in memory, estimated before any export or engine build.

A batch of B samples costs B times one sample's inputs and activations (the outputs of every leaf
module of the torch model, measured on one sample: an upper bound, since runtimes reuse
buffers), held by every engine that runs it. A batch size past what this machine has is refused
with the estimate, not attempted.
"""

from __future__ import annotations

import os

import torch

from deploycomp.errors import DataError
from deploycomp.modelspec import ModelSpec

ENGINE_COPIES = 3  # the engine's own buffers, the batch it is fed and the outputs kept
FALLBACK_ACTIVATION_FACTOR = 16  # an ONNX model: activations as a multiple of its inputs


def available_bytes() -> int:
    """Memory available to new allocations (MemAvailable), or free pages where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def bytes_per_sample(spec: ModelSpec) -> int:
    """Inputs plus every leaf module's outputs for one sample of ``spec``."""
    one = {name: arr[:1] for name, arr in spec.example_inputs.items()}
    inputs = sum(int(a.nbytes) for a in one.values())
    if spec.model is None or spec.onnx_path:
        return inputs * (1 + FALLBACK_ACTIVATION_FACTOR)
    total = [inputs]

    def count(module, args, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    leaves = [m for m in spec.model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            spec.model(*(torch.from_numpy(one[n]) for n in spec.input_names))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0]


def check_batch_memory(spec: ModelSpec) -> None:
    """Refuse latency batch sizes whose estimated memory exceeds what this machine has."""
    batch = max(spec.batch_sizes)
    per_sample = bytes_per_sample(spec)
    need, have = batch * per_sample * ENGINE_COPIES, available_bytes()
    if need > have:
        fits = max(1, have // (per_sample * ENGINE_COPIES))
        raise DataError(
            f"--batch-sizes {batch}: one batch would need about {need / 2**30:.1f} GiB ("
            f"{per_sample / 2**20:.2f} MiB of inputs and activations per sample, x{ENGINE_COPIES}"
            f"), and {have / 2**30:.1f} GiB is available; pass --batch-sizes of at most {fits}."
        )
