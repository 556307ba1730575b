"""PyTorch on an NVIDIA GPU: the QDQ ONNX run with INT8, 2:4 sparse and INT4 kernels.

The same engine runs on the CPU (fp32, int8 through ``torch._int_mm``'s CPU kernel, 2:4 and INT4
layers dense): not a deployment target, but how the backend's build, load and run are tested on
machines without a GPU.

``build`` lowers the ONNX file with :mod:`deploycomp.backends.onnx_torch` at the engine's input
shapes and, like TensorRT's tactic selection, times every kernel a linear layer can run (a 2:4
int8 layer: cuSPARSELt's sparse GEMM against cuBLASLt's dense int8 GEMM) on the layer's real
input, keeping the fastest: a sparse kernel that measured slower than dense is never kept. It
writes the ONNX file, ``kernels.json`` (the choice per layer) and ``layers.json`` (per layer:
precision, sparse kernel or not, both timings). ``load`` lowers again with those choices and
returns a session that runs the graph compiled by ``torch.compile`` (``runtime="compile"``, the
default: elementwise chains and the activation quantization fuse into a few kernels) or op by op
(``runtime="eager"``), captured in a CUDA graph per input shape when timed.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploycomp.artifacts import Engine, EngineLayer, write_json_atomic
from deploycomp.backends.base import Availability, Backend, BuildConfig, Session
from deploycomp.errors import BackendError
from deploycomp.report.engine_layers import write_engine_layers

ENGINE_FILE = "model.onnx"
KERNELS_FILE = "kernels.json"
RUNTIMES = ("compile", "eager")
TIMING_REPEATS = 25


def _float_dtype(name: str):
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in dtypes:
        raise BackendError(
            f"float_dtype {name!r} is not supported by the torch backend; expected one of "
            f"{sorted(dtypes)}."
        )
    return dtypes[name]


def _input_shapes(model: Any, config: BuildConfig) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape: given in ``config.extra["input_shapes"]``, or the ONNX shape
    with a symbolic first axis set to ``config.extra["batch_size"]`` (default 1)."""
    given = config.extra.get("input_shapes") or {}
    batch = int(config.extra.get("batch_size", 1))
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        if value.name in given:
            shapes[value.name] = tuple(int(d) for d in given[value.name])
            continue
        dims = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            elif axis == 0:
                dims.append(batch)
            else:
                raise BackendError(
                    f"input {value.name!r} has a symbolic axis {axis} ({dim.dim_param!r}); pass "
                    f"its shape in BuildConfig.extra['input_shapes'] (e.g. {{'{value.name}': "
                    f"[{batch}, 128]}}) to build a torch engine for it."
                )
        shapes[value.name] = tuple(dims)
    return shapes


def _example_inputs(model: Any, shapes: dict[str, tuple[int, ...]], config: BuildConfig, device):
    """The inputs the build times kernels on: the caller's (``extra["example_inputs"]``), else
    seeded normal floats and zeros for integer inputs (token ids; 0 is a valid index)."""
    import torch

    from deploycomp.backends.onnx_torch import _ONNX_DTYPES

    given = config.extra.get("example_inputs") or {}
    generator = torch.Generator().manual_seed(0)
    out = {}
    for value in model.graph.input:
        if value.name not in shapes:
            continue
        if value.name in given:
            out[value.name] = torch.from_numpy(np.ascontiguousarray(given[value.name]))
            continue
        dtype = _ONNX_DTYPES.get(value.type.tensor_type.elem_type, torch.float32)
        shape = shapes[value.name]
        if dtype.is_floating_point:
            out[value.name] = torch.randn(shape, generator=generator).to(dtype)
        else:
            out[value.name] = torch.zeros(shape, dtype=dtype)
    return {n: t.to(device) for n, t in out.items()}


def event_times_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, by CUDA events on the current
    stream (each call waited for before the next)."""
    import torch

    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_ms(
    fn: Callable[[], Any], device: Any, repeats: int = TIMING_REPEATS, warmup: int = 3
) -> float:
    """Median milliseconds of ``fn``: by CUDA events on a GPU, by the wall clock on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return statistics.median(event_times_ms(fn, repeats))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def choose_kernels(
    program: Any, inputs: dict[str, Any], force_sparse: bool = False
) -> list[EngineLayer]:
    """Time every candidate kernel of every linear layer on its real input; keep the fastest.

    A candidate must also compute what the dense kernel computes (relative error under 2e-2 in
    the run's float dtype) to be kept. ``force_sparse`` keeps a layer's 2:4 kernel even where
    dense measured faster (for sweeps that time the sparse kernel itself). Returns one
    :class:`EngineLayer` per linear layer.
    """
    import torch

    from deploycomp.backends.onnx_torch import LinearOp

    captured: dict[str, torch.Tensor] = {}
    hooks = [
        op.register_forward_pre_hook(lambda m, args: captured.setdefault(m.name, args[0]))
        for op in program.linears.values()
        if len(op.candidates()) > 1
    ]
    try:
        with torch.no_grad():
            program.specialize(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for name, op in program.linears.items():
        op: LinearOp
        timings: dict[str, float] = {}
        note = ""
        if name in captured:
            x = captured[name]
            with torch.no_grad():
                reference = None
                for kernel in op.candidates():
                    op.use(kernel, program.float_dtype)
                    out = op(x).float()
                    if reference is None:
                        reference = out
                    else:
                        error = float((out - reference).norm() / reference.norm().clamp_min(1e-12))
                        if not error < 2e-2:
                            note = f"{kernel} rejected: relative error {error:.2e} against dense"
                            continue
                    timings[kernel] = time_ms(lambda op=op, x=x: op(x), program.device)
            sparse = [k for k in timings if k.startswith("2:4")]
            best = min(timings, key=lambda k: (timings[k], k.startswith("2:4")))
            if force_sparse and sparse:
                best = sparse[0]
            op.use(best, program.float_dtype)
            measured = ", ".join(f"{k} {ms:.4f} ms" for k, ms in timings.items())
            note = "; ".join(filter(None, [f"measured {measured}", note]))
        elif op.sparse_weights:
            note = "2:4 weights, but no sparse kernel runs here (cuSPARSELt, sm_80+)"
        layers.append(
            EngineLayer(
                name=name,
                op="linear",
                precision=op.precision,
                sparse=op.kernel.startswith("2:4"),
                sparse_weights=op.sparse_weights,
                kernel=op.kernel,
                note=note,
            )
        )
    return layers


class TorchCudaSession(Session):
    """A lowered program on the GPU; one specialization (and compiled graph) per input shape."""

    def __init__(self, program: Any, runtime: str) -> None:
        self.program = program
        self.runtime = runtime
        self.input_names = list(program.input_names)
        self._runners: dict[tuple, Callable] = {}

    def _runner(self, tensors: dict[str, Any]) -> Callable:
        import torch

        key = tuple((n, tuple(tensors[n].shape), tensors[n].dtype) for n in self.input_names)
        if key not in self._runners:
            with torch.no_grad():
                specialized = self.program.specialize(tensors)
            fn = specialized
            if self.runtime == "compile":
                fn = torch.compile(specialized, dynamic=False)
            self._runners[key] = fn
        return self._runners[key]

    def _device_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise BackendError(
                f"inputs {missing} are missing; the engine takes {self.input_names}."
            )
        return {
            n: torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.program.device)
            for n in self.input_names
        }

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        tensors = self._device_inputs(inputs)
        runner = self._runner(tensors)
        with torch.no_grad():
            outs = runner(*[tensors[n] for n in self.input_names])
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in outs]

    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], None]:
        """The inputs copied to the GPU once, the run captured in a CUDA graph; the call replays
        it and waits for the GPU."""
        import torch

        tensors = self._device_inputs(inputs)
        runner = self._runner(tensors)
        args = [tensors[n] for n in self.input_names]
        if self.program.device.type != "cuda":

            def call_cpu() -> None:
                with torch.no_grad():
                    call_cpu.outputs = runner(*args)

            return call_cpu
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(3):  # compile, autotune and allocate outside the capture
                runner(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            outputs = runner(*args)

        def call() -> None:
            graph.replay()
            torch.cuda.synchronize()

        call.outputs = outputs  # the graph writes here; kept alive as long as the call

        return call


class TorchCudaBackend(Backend):
    name = "torch"
    engine_file = ENGINE_FILE
    devices = ("cuda", "cpu")

    def default_device(self) -> str:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def availability(self) -> Availability:
        try:
            import torch
        except ImportError as exc:  # never raises
            return Availability(False, f"PyTorch does not import: {exc}")
        if not torch.cuda.is_available():
            return Availability(
                True, f"PyTorch {torch.__version__} on the CPU only: no CUDA GPU is visible, so "
                "INT8 GEMMs run torch._int_mm's CPU kernel and 2:4 / INT4 layers run dense "
                "(their kernels need an NVIDIA GPU)", torch.__version__,
            )  # fmt: skip
        capability = torch.cuda.get_device_capability()
        if capability < (7, 5):
            return Availability(
                False, f"{torch.cuda.get_device_name()} is sm_{capability[0]}{capability[1]}; "
                "INT8 tensor-core GEMMs need sm_75 or newer"
            )  # fmt: skip
        from deploycomp.kernels.gemm import sparse_kernels_available

        sparse = "2:4 via cuSPARSELt" if sparse_kernels_available() else "no 2:4 kernels"
        return Availability(
            True,
            f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()} "
            f"(sm_{capability[0]}{capability[1]}, {sparse})",
            torch.__version__,
        )

    def _build(
        self, onnx_path: Path, out_dir: Path, config: BuildConfig
    ) -> tuple[str, dict[str, Any], list[str]]:
        import onnx
        import torch

        from deploycomp.backends.onnx_torch import lower
        from deploycomp.backends.onnxruntime import onnx_precision, validate_onnx

        precision = onnx_precision(validate_onnx(onnx_path))
        runtime = config.extra.get("runtime", "compile")
        if runtime not in RUNTIMES:
            raise BackendError(f"runtime {runtime!r} is not one of {RUNTIMES}.")
        device = torch.device(config.device if config.device != "cuda" else "cuda:0")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(
                f"device {config.device!r} asked for, but no CUDA GPU is visible to PyTorch; "
                "build for device 'cpu' or on a machine with an NVIDIA GPU."
            )
        float_name = config.extra.get("float_dtype", "fp16" if device.type == "cuda" else "fp32")
        if runtime == "compile" and device.type != "cuda":
            runtime = "eager"  # torch.compile on the CPU needs a C++ toolchain; eager is exact
        model = onnx.load(str(onnx_path))
        shapes = _input_shapes(model, config)
        program = lower(model, device, _float_dtype(float_name))
        inputs = _example_inputs(model, shapes, config, device)
        layers = choose_kernels(program, inputs, bool(config.extra.get("force_sparse")))
        shutil.copyfile(onnx_path, out_dir / ENGINE_FILE)
        write_json_atomic(out_dir / KERNELS_FILE, {op.name: op.kernel for op in layers})
        write_engine_layers(out_dir, self.name, layers)
        sparse = sum(la.sparse for la in layers)
        dense_24 = sum(la.sparse_weights and not la.sparse for la in layers)
        notes = [f"{sparse} linear layers run 2:4 sparse kernels"] if sparse else []
        if dense_24:
            notes.append(f"{dense_24} layers with 2:4 weights run dense (measured faster)")
        build_config = {
            "runtime": runtime,
            "float_dtype": float_name,
            "input_shapes": {n: list(s) for n, s in shapes.items()},
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        return (
            f"{precision}+{float_name}" if precision != "fp32" else float_name,
            build_config,
            notes,
        )

    def _load(self, engine: Engine, threads: int) -> Session:
        import onnx
        import torch

        from deploycomp.backends.onnx_torch import lower

        path = Path(engine.path)
        device = torch.device(engine.device if engine.device != "cuda" else "cuda:0")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(
                f"engine {str(path)!r} was built for {engine.device!r}, but no CUDA GPU is "
                "visible to PyTorch here; load it on a machine with an NVIDIA GPU."
            )
        program = lower(
            onnx.load(str(path / ENGINE_FILE)),
            device,
            _float_dtype(engine.build_config.get("float_dtype", "fp16")),
        )
        choices = json.loads((path / KERNELS_FILE).read_text())
        for name, kernel in choices.items():
            if name not in program.linears:
                raise BackendError(f"engine {str(path)!r} names layer {name!r} its model lacks.")
            program.linears[name].use(kernel, program.float_dtype)
        return TorchCudaSession(program, engine.build_config.get("runtime", "compile"))
