"""The compression stage of ``compile``: plan from the target, train, back off, export.

Takes a torch ModelSpec, the target's profile and the user's budget; returns the QDQ ONNX model of
the trained student in the run directory, with ``plan.json`` and ``compression.json`` beside it.

1. Export the fp32 model and take its inventory at the planned batch size.
2. Calibrate each layer's input (sign and range) on the fp32 graph.
3. List each layer's options the target accelerates, score them (:mod:`deploycomp.plan.sensitivity`)
   and choose one per layer under the budget (:func:`deploycomp.plan.joint_planner.plan_joint`).
4. Train the compressed student against the fp32 model (joint, or sequential on request), then
   measure its accuracy on the eval set. While it misses ``max_accuracy_drop`` (at most
   ``max_rounds`` rounds), forbid the chosen option of the most sensitive compressed layers, plan
   again and resume training from the student's weights.
5. Fold the wrappers into plain layers and export them; the QDQ writer stores the learned weight
   steps (so trained weights land on the integer grid exactly) and the learned input steps.
6. Check the QDQ model against the compressed torch model on calibration data.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from deploycomp.artifacts import CompressionPlan, write_json_atomic
from deploycomp.compress.checkpoint_key import (
    CheckpointError,
    Checkpoints,
    check_checkpoint_dir,
    key_fields,
)
from deploycomp.compress.config import CompressConfig
from deploycomp.errors import DeployCompError, ExportError
from deploycomp.export.calibrate import TensorRange, calibrate
from deploycomp.export.check import ort_runner
from deploycomp.export.onnx_export import export_fp32
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq, weight_axis
from deploycomp.hw import HardwareProfile
from deploycomp.hw.detect import has_int8_dot_product
from deploycomp.measure.accuracy import compare_outputs
from deploycomp.modelspec import Batch, EvalSet, ModelSpec
from deploycomp.plan.inventory import Layer, build_inventory
from deploycomp.plan.joint_planner import Budget, JointPlanResult, layer_options, plan_joint
from deploycomp.plan.options import Option
from deploycomp.plan.sensitivity import measure_sensitivity, module_for_layers
from deploycomp.prune.schedule import StructuredPruning

Log = Callable[[str], None]
# The exported QDQ model against the compressed torch model, on calibration data. The engines
# requantize where torch keeps floats (int32 bias, fused requantization, int8 activations inside
# ONNX Runtime's weight-only MatMuls), and query/key/value share one input Q/DQ pair at the
# largest of their learned steps, so they agree to the rounding of a few outputs, not bit for bit.
# Measured on the zoo: cosine 0.999997 (fmnist-cnn, 2:4 + INT8), 0.99991 and 0.9956 (minilm-l6
# under a size target, planned for OpenVINO and for ONNX Runtime), 0.9996 with top-1 agreement
# 0.969 (efficientnet-lite0 pruned + INT8: 2 of 64 calibration views flip between close ImageNet
# classes; the cosine is what catches an export bug).
EXPORT_MIN_COSINE = 0.99
# Where ONNX Runtime's INT8 kernels saturate (no VNNI/AMX: hw.detect.has_int8_dot_product) the
# reference runtime itself departs: minilm-l6 at --size-target 0.16 measured cosine 0.9899.
EXPORT_MIN_COSINE_SATURATING = 0.98
EXPORT_MIN_TOP1_AGREEMENT = 0.95
# Share of the compressed layers whose option a back-off round forbids (at least one).
BACKOFF_FRACTION = 0.25
CHECKPOINT_EVERY = 50  # training steps between checkpoints, with --checkpoint-dir


def _torch_batch(batch: Batch, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[n])) for n in names)


def _forward(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def torch_accuracy(model: nn.Module, eval_set: EvalSet, names: Sequence[str]) -> float:
    """Top-1 of ``model`` on ``eval_set`` (agreement-free: needs labels)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        preds = np.concatenate(
            [_forward(model, _torch_batch(b, names)).argmax(-1).numpy() for b in eval_set.batches]
        )
    model.train(was)
    return float((preds == np.asarray(eval_set.labels)[: len(preds)]).mean())


def training_batches(spec: ModelSpec) -> list[dict[str, torch.Tensor]]:
    """The spec's training data (its calibration data when it has none) as named tensors."""
    batches = spec.train_data() if spec.train_data is not None else spec.calibration
    return [dict(zip(spec.input_names, _torch_batch(b, spec.input_names))) for b in batches]


def _site_ranges(
    fp32: onnx.ModelProto, layers: Sequence[Layer], spec: ModelSpec, seed: int, progress: bool
) -> tuple[dict[str, str], dict[str, TensorRange]]:
    sites = activation_sites(
        fp32, {la.node for la in layers if la.eligible and la.kind != "embedding"}
    )
    ranges = calibrate(
        fp32, sorted(set(sites.values())), spec.calibration, seed=seed, progress=progress
    )
    return sites, ranges


def _ratio_per_output(onnx_weight: np.ndarray, torch_weight: np.ndarray, axis: int) -> np.ndarray:
    """Per output channel, how much the exporter rescaled the weight (a BatchNorm folded into
    the convolution before it multiplies each output channel by gamma / sigma). ``axis`` is the
    ONNX weight's output axis, so moving it first gives the torch layout ``[out, ...]``."""
    onnx_rows = np.moveaxis(onnx_weight, axis, 0).reshape(onnx_weight.shape[axis], -1)
    torch_rows = torch_weight.reshape(torch_weight.shape[0], -1)
    if onnx_rows.shape != torch_rows.shape:  # not the same weight: leave the scales alone
        return np.ones(torch_weight.shape[0], np.float64)
    num = np.abs(onnx_rows).max(axis=1).astype(np.float64)
    den = np.abs(torch_rows).max(axis=1).astype(np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def export_student(
    student: nn.Module,
    folded: dict[str, dict[str, Any]],
    spec: ModelSpec,
    work_dir: Path,
) -> onnx.ModelProto:
    """Export the folded student and write its QDQ graph with the learned steps.

    An input tensor read by several layers (attention's query, key and value) gets one Q/DQ pair,
    at the largest of their learned steps, so no layer's input is clipped tighter than it learned.
    """
    plain = dataclasses.replace(spec, model=student)
    path = work_dir / "student_fp32.onnx"
    graph = export_fp32(plain, path)
    inventory = {la.name: la for la in build_inventory(graph, spec.dims(1))}
    inits = {i.name: i for i in graph.graph.initializer}
    quant: dict[str, LayerQuant] = {}
    for name, info in folded.items():
        layer = inventory.get(name)
        if layer is None or layer.weight is None:
            raise ExportError(
                f"the compressed layer {name!r} is missing from the exported graph; the model's "
                f"forward must call the module so the exporter sees it"
            )
        scale = (
            np.asarray(info["weight_scale"], np.float32)
            if info["weight_scale"] is not None
            else None
        )
        node = next(n for n in graph.graph.node if n.name == layer.node)
        if scale is not None:
            onnx_w = onnx.numpy_helper.to_array(inits[layer.weight])
            axis = 0 if node.op_type == "Gather" else weight_axis(node)
            ratio = _ratio_per_output(onnx_w, info["folded_weight"], axis).astype(np.float32)
            scale = scale * ratio.reshape((-1,) + (1,) * (scale.ndim - 1))
        quant[layer.node] = LayerQuant(
            layer, info["activation"], weight=info["weight"], weight_scale=scale
        )
    sites = activation_sites(graph, {n for n, q in quant.items() if q.activation != "fp32"})
    ranges: dict[str, TensorRange] = {}
    for node, q in quant.items():
        if q.activation == "fp32":
            continue
        info = folded[q.layer.name]
        qmax = 255 if q.activation == "uint8_per_tensor" else 127
        clip = float(info["activation_scale"]) * qmax
        tensor = sites[node]
        if tensor in ranges:
            clip = max(clip, ranges[tensor].clip)
        lo = 0.0 if q.activation == "uint8_per_tensor" else -clip
        ranges[tensor] = TensorRange(lo, clip, clip)
    # One scheme per shared tensor: uint8 only when every reader takes uint8.
    schemes: dict[str, set[str]] = {}
    for node, q in quant.items():
        if q.activation != "fp32":
            schemes.setdefault(sites[node], set()).add(q.activation)
    for node, q in list(quant.items()):
        if q.activation != "fp32" and len(schemes[sites[node]]) > 1:
            quant[node] = dataclasses.replace(q, activation="int8_sym_per_tensor")
            clip = ranges[sites[node]].clip
            ranges[sites[node]] = TensorRange(-clip, clip, clip)
    return insert_qdq(graph, quant, ranges)


def check_student_export(student: nn.Module, qdq_path: Path, spec: ModelSpec) -> dict[str, float]:
    """Compare the QDQ model with the compressed torch model on calibration batches.

    Not bit-exact by design: ONNX Runtime computes INT4/INT8 weight-only MatMuls with int8
    activations (MatMulNBits at accuracy level 4) and requantizes W8A8 outputs through int32.
    """
    run = ort_runner(str(qdq_path))
    names = spec.input_names
    student.eval()
    with torch.no_grad():
        ref = np.concatenate(
            [_forward(student, _torch_batch(b, names)).numpy() for b in spec.calibration]
        )
    out = np.concatenate([run(b) for b in spec.calibration])
    kept = np.isfinite(ref.reshape(len(ref), -1)).all(axis=1)  # the student's own overflow
    cmp = compare_outputs(ref[kept], out[kept])
    if not cmp["finite"]:
        raise ExportError(
            "the compressed QDQ model produced NaN or infinite outputs on calibration data"
        )
    min_cosine = EXPORT_MIN_COSINE if has_int8_dot_product() else EXPORT_MIN_COSINE_SATURATING
    checks = {
        "student_max_abs_error": float(np.abs(out - ref).max()),
        "student_cosine": float(cmp["cosine"]),
        "student_top1_agreement": float(cmp["top1_agreement"]),
        "student_sqnr_db": float(cmp["sqnr_db"]),
        "student_min_cosine": min_cosine,
        "student_min_top1_agreement": EXPORT_MIN_TOP1_AGREEMENT,
    }
    if cmp["cosine"] < min_cosine or cmp["top1_agreement"] < EXPORT_MIN_TOP1_AGREEMENT:
        raise ExportError(
            f"the exported model departs from the compressed torch model: cosine "
            f"{cmp['cosine']:.4f} (expected >= {min_cosine}), top-1 agreement "
            f"{cmp['top1_agreement']:.3f} (expected >= {EXPORT_MIN_TOP1_AGREEMENT}); this is an "
            f"export bug, please report it with the model"
        )
    return checks


def _backoff(
    plan: CompressionPlan,
    sensitivity: dict[str, dict[str, float]],
    exclude: dict[str, set[str]],
) -> tuple[dict[str, set[str]], list[str]]:
    """``exclude`` plus the chosen option of the most sensitive compressed layers (the top
    ``BACKOFF_FRACTION`` of them, at least one), and their "name (option)" labels."""
    chosen = []
    for d in plan.layers:
        option = Option(d.weight, d.activation, d.sparsity)
        if d.kind == "add" or option.is_fp32:
            continue
        chosen.append((sensitivity.get(d.name, {}).get(option.key, 0.0), d.name, option.key))
    chosen.sort(key=lambda t: (-t[0], t[1]))
    count = max(1, math.ceil(BACKOFF_FRACTION * len(chosen)))
    excluded = {name: set(keys) for name, keys in exclude.items()}
    for _, name, key in chosen[:count]:
        excluded.setdefault(name, set()).add(key)
    return excluded, [f"{name} ({key})" for _, name, key in chosen[:count]]


def _check_reachable(
    layers: list[Layer],
    hw: HardwareProfile,
    backend: str,
    options: dict[str, list[Option]],
    exclude: dict[str, set[str]],
    budget: Budget,
    batch_size: int,
    unsigned: dict[str, bool],
) -> None:
    """Raise the planner's "cannot be met" error now, before every option is scored: a plan
    that ignores accuracy (every sensitivity 0) is the easiest to fit under the budget."""
    if budget.latency_target is None and budget.size_target is None:
        return
    free = {name: {o.key: 0.0 for o in opts} for name, opts in options.items()}
    free.update({name: {"fp32": 0.0} for name in exclude})
    plan_joint(layers, hw, backend, sensitivity=free, budget=budget, batch_size=batch_size,
               model_name="reachability", seed=0, unsigned_inputs=unsigned, exclude=exclude)


def _warm_start(model: nn.Module, student: nn.Module) -> nn.Module:
    """A copy of ``model`` carrying the student's trained weights (the latent, unquantized ones:
    wrappers keep their layer's Parameter names, so the state dicts share those keys)."""
    start = copy.deepcopy(model)
    own = start.state_dict()
    trained = {
        k: v for k, v in student.state_dict().items() if k in own and v.shape == own[k].shape
    }
    start.load_state_dict(trained, strict=False)
    return start


def compress_and_export(
    spec: ModelSpec,
    hw: HardwareProfile,
    backend: str,
    run_dir: Path,
    config: CompressConfig,
    *,
    seed: int = 0,
    log: Log = print,
    progress: bool = True,
    measure_options: bool = False,
) -> tuple[CompressionPlan, dict[str, Any]]:
    """Run steps 1-6 of the module docstring; write model_fp32.onnx, model.onnx, plan.json and
    compression.json into ``run_dir``. Returns the final plan and the compression record.

    With ``measure_options`` (the target is this machine and ``backend`` runs here), every option
    of the model's linear and embedding shapes is first timed on ``backend``
    (:func:`deploycomp.hw.sweep.sweep`) and the plan is priced with those measurements instead of
    the roofline, so no option is chosen for speed that measured slower here.
    """
    from deploycomp.compress.joint import JointConfig
    from deploycomp.compress.sequential import compress_and_train

    if spec.onnx_path or spec.model is None:
        raise DeployCompError(
            "joint compression trains the torch model, and this model arrived as ONNX; pass a "
            "torch model (a zoo name or file.py:function), or drop the --latency-target / "
            "--size-target / --max-accuracy-drop options to quantize the ONNX model after training"
        )
    labelled = [e for e in spec.eval_sets if e.labels is not None]
    if config.budget.max_accuracy_drop is not None and not labelled:
        raise DeployCompError(
            "--max-accuracy-drop needs an evaluation set with labels; the model spec has none "
            "(give the spec an EvalSet with labels, or drop the option)"
        )
    if config.checkpoint_dir is not None:
        check_checkpoint_dir(config.checkpoint_dir)
    profile = hw  # as given: the options measured below change from run to run
    torch.manual_seed(seed)
    model = spec.model.eval()
    names = spec.input_names
    batch_size = spec.batch_sizes[0]
    log("export   fp32 ONNX for the inventory")
    fp32 = export_fp32(spec, run_dir / "model_fp32.onnx")
    layers = build_inventory(fp32, spec.dims(batch_size))
    budget, plan_spec, structured = config.budget, spec, None
    if config.prune is not None:
        structured, budget, plan_spec, layers, fp32 = _plan_structured(
            spec, hw, backend, layers, config, run_dir, log
        )
    plan_model = plan_spec.model.eval()
    sites, ranges = _site_ranges(fp32, layers, plan_spec, seed, progress)
    measured: list[dict[str, Any]] = []
    if measure_options:
        from deploycomp.hw.sweep import sweep

        log(f"measure  each layer option on {backend} here (linear and embedding shapes)")
        entries = sweep(
            hw,
            [la for la in layers if la.eligible],
            [backend],
            rounds=5,
            block_runs=10,
            warmup_runs=5,
            seed=seed,
            progress=progress,
            log=log,
        )
        hw = dataclasses.replace(hw, measured=tuple(hw.measured) + tuple(entries))
        measured = [e.to_dict() for e in entries]
    mapped = module_for_layers(plan_model, layers)
    options: dict[str, list[Option]] = {}
    unsigned: dict[str, bool] = {}
    clips: dict[str, float] = {}
    exclude: dict[str, set[str]] = {}
    for layer in layers:
        if not layer.eligible:
            continue
        rng = ranges.get(sites.get(layer.node, ""))
        unsigned[layer.name] = bool(rng is not None and rng.non_negative)
        opts, _ = layer_options(layer, hw, backend, unsigned_input=unsigned[layer.name])
        if layer.name not in mapped:
            exclude[layer.name] = {o.key for o in opts if not o.is_fp32}
            continue
        options[layer.name] = opts
        if rng is not None:
            clips[layer.name] = rng.clip
    if structured is None:  # (pruned shapes fall back to the fastest plan instead)
        _check_reachable(layers, hw, backend, options, exclude, budget, batch_size, unsigned)
    log(
        f"score    {sum(len(o) - 1 for o in options.values())} options of {len(options)} layers "
        "(loss increase with one layer compressed)"
    )
    cal = [_torch_batch(b, names) for b in spec.calibration]
    sensitivity = measure_sensitivity(
        plan_model, options, cal, _forward, input_clips=clips, progress=progress
    )
    for name in exclude:
        sensitivity.setdefault(name, {"fp32": 0.0})
    train = training_batches(spec)
    steps = config.steps or max(1, round(config.epochs * len(train)))
    joint_config = JointConfig(
        steps=steps,
        lr=config.lr,
        lr_quant=10 * config.lr,
        seed=seed,
        checkpoint_every=min(steps, CHECKPOINT_EVERY),
    )
    teacher = copy.deepcopy(model).eval()
    fp32_accuracy = torch_accuracy(model, labelled[0], names) if labelled else None
    rounds: list[dict[str, Any]] = []
    start = model

    def make_plan(excluded: dict[str, set[str]], budget: Budget = budget):
        try:
            return plan_joint(
                layers,
                hw,
                backend,
                sensitivity=sensitivity,
                budget=budget,
                batch_size=batch_size,
                model_name=spec.name,
                seed=seed,
                unsigned_inputs=unsigned,
                exclude=excluded,
            )
        except DeployCompError as err:
            if structured is None or budget.latency_target is None:
                raise
            # The amounts were priced by the roofline; the pruned shapes' measured options can
            # fall short of the rescaled target. Pruning has done its part: plan the fastest.
            log(f"warning  {err} With the pruned shapes the fastest plan is taken.")
            return make_plan(excluded, dataclasses.replace(budget, latency_target=None))

    store = _checkpoints(config, spec, profile, backend, steps, seed, measure_options, train)
    result, resume = _planned(store, "round1", lambda: make_plan(exclude), log)
    for round_index in range(config.max_rounds):
        plan = result.plan
        compressed = [
            d
            for d in plan.layers
            if d.kind != "add" and not Option(d.weight, d.activation, d.sparsity).is_fp32
        ]
        log(
            f"train    round {round_index + 1}: {len(compressed)} of {len(layers)} layers "
            f"compressed, {config.mode}, {steps} steps"
        )
        checkpoint = store.train_path(f"round{round_index + 1}") if store else None
        if resume and checkpoint is not None:
            log(f"resume   round {round_index + 1} from {checkpoint.name} in {store.folder}")
        pruning = None
        if structured is not None and start is model:  # later rounds start from pruned weights
            pruning = StructuredPruning(structured.amounts.plans, steps, cal, _forward)
        student, history = compress_and_train(
            start,
            teacher,
            plan,
            train,
            joint_config,
            mode=config.mode,
            progress=progress,
            checkpoint_path=checkpoint,
            resume=resume,
            pruning=pruning,
        )
        accuracy = torch_accuracy(student, labelled[0], names) if labelled else None
        drop = None if accuracy is None else 100 * (fp32_accuracy - accuracy)
        record = {
            "round": round_index + 1,
            "plan": {
                d.name: Option(d.weight, d.activation, d.sparsity).key
                for d in plan.layers
                if d.kind != "add"
            },
            "predicted_ms": result.predicted_ms,
            "fp32_predicted_ms": result.fp32_ms,
            "weight_bytes": result.bytes,
            "fp32_weight_bytes": result.fp32_bytes,
            "accuracy": accuracy,
            "fp32_accuracy": fp32_accuracy,
            "accuracy_drop_points": drop,
            "final_loss": _final_loss(history),
            "backed_off": [],
            "stopped": None,
        }
        rounds.append(record)
        limit = config.budget.max_accuracy_drop
        if limit is None or drop is None or drop <= limit:
            break
        if round_index + 1 == config.max_rounds:
            record["stopped"] = (
                f"accuracy drop {drop:.2f} points > {limit} after {config.max_rounds} rounds; "
                "raise --max-accuracy-drop, train longer (--epochs) or loosen the budget"
            )
            log(f"warning  {record['stopped']}")
            break
        excluded, backed = _backoff(plan, sensitivity, exclude)
        try:
            next_result, next_resume = _planned(
                store, f"round{round_index + 2}", lambda excluded=excluded: make_plan(excluded), log
            )
        except CheckpointError:
            raise
        except DeployCompError as err:
            record["stopped"] = (
                f"accuracy drop {drop:.2f} points > {limit}, but backing off "
                f"{', '.join(backed)} would break the budget ({err}); kept this round"
            )
            log(f"warning  {record['stopped']}")
            break
        record["backed_off"] = backed
        log(
            f"backoff  accuracy drop {drop:.2f} points > {limit}: "
            f"{', '.join(backed)} go back to a gentler option"
        )
        exclude, result, resume = excluded, next_result, next_resume
        start = _warm_start(plan_model, student)
    comparison = None
    if config.compare_sequential:
        # Both modes train the final plan from the fp32 weights for the same steps on the same
        # batches; after back-off rounds the main result had a warm start, so it is retrained.
        results = {}
        if len(rounds) == 1:
            results[config.mode] = (rounds[0]["accuracy"], rounds[0]["final_loss"])
        for mode in ("joint", "sequential"):
            if mode in results:
                continue
            log(f"compare  training the final plan {mode}, {steps} steps from the fp32 weights")
            rival, rival_history = compress_and_train(
                model, teacher, plan, train, joint_config, mode=mode, progress=progress
            )
            accuracy = torch_accuracy(rival, labelled[0], names) if labelled else None
            results[mode] = (accuracy, _final_loss(rival_history))
        comparison = {
            mode: {"accuracy": acc, "final_loss": loss} for mode, (acc, loss) in results.items()
        }
        comparison.update(
            fp32_accuracy=fp32_accuracy,
            steps=steps,
            eval_set=labelled[0].name if labelled else None,
        )
    plan.save(run_dir / "plan.json")
    checks = export_trained(student, spec, run_dir)
    record = {
        "mode": config.mode,
        "steps": steps,
        "budget": dataclasses.asdict(config.budget),
        "training_samples": sum(int(next(iter(b.values())).shape[0]) for b in train),
        "sensitivity_method": "KL of outputs from fp32, one layer compressed, calibration data",
        "sensitivity": sensitivity,
        "options": result.options,
        "rounds": rounds,
        "measured_options": measured,
        "comparison": comparison,
        "export_checks": checks,
    }
    write_json_atomic(run_dir / "compression.json", record)
    if structured is not None:
        _write_pruning_record(structured, spec.model, student, steps, result, run_dir)
    return plan, record


def _plan_structured(
    spec: ModelSpec,
    hw: HardwareProfile,
    backend: str,
    layers: list[Layer],
    config: CompressConfig,
    run_dir: Path,
    log: Log,
) -> tuple[Any, Budget, ModelSpec, list[Layer], onnx.ModelProto]:
    """Choose the pruning amounts; return them with the precision planner's budget (its latency
    target rescaled from the unpruned fp32 model to the pruned one), the spec of the one-shot
    pruned model, and that model's inventory and fp32 graph (the precisions are planned on the
    pruned shapes)."""
    from deploycomp.prune.stage import plan_structured

    target = config.budget.latency_target
    how = "amounts chosen under the latency target" if config.prune == "auto" else (
        f"keep {float(config.prune):.0%} of every group")
    log(f"prune    structured pruning inside joint compression: {how}")
    structured = plan_structured(spec, hw, backend, layers, config.prune, target)
    amounts = structured.amounts
    removed = sum(1 for p in amounts.plans if p.drop)
    log(
        f"prune    {removed} of {len(amounts.plans)} groups pruned; predicted fp32 "
        f"{amounts.fp32_ms:.4f} -> {amounts.pruned_fp32_ms:.4f} ms (roofline)"
    )
    if not amounts.reached:
        log(
            f"warning  pruning to the floor of every group reaches {amounts.pruned_fastest_ms:.4f}"
            f" ms at the fastest precisions, above the target {amounts.target_ms:.4f} ms"
        )
    # The precision planner's targets are fractions of its own (pruned) fp32 model's numbers.
    budget = config.budget
    if target is not None:
        rescaled = min(1.0, target * amounts.fp32_ms / amounts.pruned_fp32_ms)
        budget = dataclasses.replace(budget, latency_target=rescaled)
    if budget.size_target is not None:
        before = sum(la.weight_bytes_fp32 for la in structured.layers_before)
        after = sum(la.weight_bytes_fp32 for la in structured.layers_after)
        budget = dataclasses.replace(budget, size_target=min(1.0, budget.size_target * before / after))
    plan_spec = dataclasses.replace(spec, model=structured.model)
    fp32 = export_fp32(plan_spec, run_dir / "pruned_fp32.onnx")
    (run_dir / "pruned_fp32.onnx").unlink()
    batch_size = spec.batch_sizes[0]
    return structured, budget, plan_spec, build_inventory(fp32, spec.dims(batch_size)), fp32


def _write_pruning_record(
    structured: Any,
    model: nn.Module,
    student: nn.Module,
    steps: int,
    result: JointPlanResult,
    run_dir: Path,
) -> None:
    from deploycomp.prune.stage import pruning_record
    from deploycomp.report.load import PRUNING_FILE

    amounts = structured.amounts
    compiled = amounts.pruned_fp32_ms * result.predicted_ms / result.fp32_ms
    record = pruning_record(
        model, student, amounts.plans, structured.refused,
        keep_fraction=structured.keep_fraction,
        multiple=structured.multiple, steps=steps, joint=True,
        layers=(structured.layers_before, structured.layers_after, structured.batch_size),
        predicted={
            "batch_size": structured.batch_size,
            "fp32_ms": amounts.fp32_ms,
            "pruned_fp32_ms": amounts.pruned_fp32_ms,
            "compiled_ms": compiled,
            "target_ms": amounts.target_ms,
            "source": "the profile's roofline for the channel counts; the precision plan's "
            "predicted speedup over its fp32 (measured option timings where swept) on top",
        },
    )  # fmt: skip
    write_json_atomic(run_dir / PRUNING_FILE, record)


def _checkpoints(
    config: CompressConfig,
    spec: ModelSpec,
    profile: HardwareProfile,
    backend: str,
    steps: int,
    seed: int,
    measure_options: bool,
    train: Sequence[dict[str, torch.Tensor]],
) -> Checkpoints | None:
    """The run's checkpoint files with ``--checkpoint-dir``, keyed by everything they depend on."""
    if config.checkpoint_dir is None:
        return None
    fields = key_fields(
        model_name=spec.name,
        model=spec.model,
        profile=profile,
        backend=backend,
        batch_size=spec.batch_sizes[0],
        budget=config.budget,
        prune=config.prune,
        steps=steps,
        lr=config.lr,
        mode=config.mode,
        seed=seed,
        measure_options=measure_options,
        data=[*train, *spec.calibration],
    )
    return Checkpoints(Path(config.checkpoint_dir), fields, resume=config.resume)


def _planned(
    store: Checkpoints | None, label: str, make: Callable[[], JointPlanResult], log: Log
) -> tuple[JointPlanResult, bool]:
    """``make()``, or, with ``--checkpoint-dir``, the plan a checkpointed run of this round was
    trained on: measured option latencies vary from run to run, so a fresh plan could differ from
    the one the checkpoint holds and the resume would not fit. Also says whether to resume."""
    if store is None:
        return make(), False
    saved = store.saved_plan(label, log)
    if saved is not None:
        return saved, True
    result = make()
    store.save_plan(label, result)
    return result, False


def export_trained(student: nn.Module, spec: ModelSpec, run_dir: Path) -> dict[str, float]:
    """Fold the trained ``student``, write ``run_dir/model.onnx`` (QDQ with the learned steps) and
    return its checks against the student (see :func:`check_student_export`)."""
    from deploycomp.compress.fold import fold_

    folded_student = copy.deepcopy(student)
    folded = fold_(folded_student)
    for name, info in folded.items():
        info["folded_weight"] = folded_student.get_submodule(name).weight.detach().numpy()
    qdq = export_student(folded_student, folded, spec, run_dir)
    onnx.checker.check_model(qdq)
    onnx.save(qdq, str(run_dir / "model.onnx"))
    (run_dir / "student_fp32.onnx").unlink(missing_ok=True)
    return check_student_export(student, run_dir / "model.onnx", spec)


def _final_loss(history: dict[str, Any]) -> float | None:
    if "final_loss" in history:
        return history["final_loss"]
    phases = [h for h in history.values() if isinstance(h, dict) and "final_loss" in h]
    return phases[-1]["final_loss"] if phases else None
