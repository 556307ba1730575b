"""Sequential mode (prune and fine-tune, then quantize), compress_and_train, and set_mask."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from deploycomp.artifacts import CompressionPlan, LayerDecision
from deploycomp.compress.joint import JointConfig, compress_, train_joint
from deploycomp.compress.modules import CompressedLinear, _CompressedLayer
from deploycomp.compress.sequential import (
    compress_and_train,
    phase_checkpoint_paths,
    sparsity_only,
    train_sequential,
)
from deploycomp.errors import DeployCompError
from deploycomp.kernels.sparsity import is_2_4_sparse

INT8_W = "int8_sym_per_channel"


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    with torch.no_grad():  # confident logits, so that distillation has something to match
        model[4].weight.mul_(5.0)
    return model


def _decision(name, shape, weight=INT8_W, activation="uint8_per_tensor", sparsity="2:4"):
    return LayerDecision(name, f"/{name}/op", "linear", shape, 0, weight, activation, sparsity, "t")


PLAN = CompressionPlan(
    "mlp",
    "cpu",
    16,
    (
        _decision("0", (32, 16), activation="int8_sym_per_tensor"),
        _decision("2", (32, 32), weight="int4_sym_group8"),
        _decision("4", (10, 32), sparsity="none"),
    ),
    seed=0,
)
CONFIG = JointConfig(steps=16, lr=3e-3, mask_update_every=2, freeze_masks_at=0.5, log_every=2)


def _batches(n: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=generator) for _ in range(n)]


def _recorded(teacher: nn.Module) -> list[int]:
    """The batches (by storage address) the teacher sees, in order."""
    seen: list[int] = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0].data_ptr()))
    return seen


def test_sequential_uses_the_joint_data_order_and_labels_its_phases():
    batches = _batches()
    model = _mlp()
    config = dataclasses.replace(CONFIG, steps=7, log_every=3)
    runs = {}
    for mode in ("joint", "sequential"):
        teacher = copy.deepcopy(model)
        order = _recorded(teacher)
        _, history = compress_and_train(
            model, teacher, PLAN, batches, config, mode=mode, progress=False
        )
        runs[mode] = (order, history)
    assert runs["sequential"][0] == runs["joint"][0]
    assert len(runs["joint"][0]) == 7
    history = runs["sequential"][1]
    assert history["mode"] == "sequential" and runs["joint"][1]["mode"] == "joint"
    assert history["phase_steps"] == {"prune": 3, "quantize": 4}
    assert history["phases"]["prune"]["logged_steps"] == [3]
    assert history["phases"]["quantize"]["logged_steps"] == [3, 4]
    assert history["logged_steps"] == [3, 6, 7]
    assert history["losses"] == (
        history["phases"]["prune"]["losses"] + history["phases"]["quantize"]["losses"]
    )
    assert history["final_loss"] == history["phases"]["quantize"]["final_loss"]
    assert history["phases"]["quantize"]["mask_updates"] == []


def test_quantize_phase_keeps_the_prune_phase_masks_exactly():
    model, batches = _mlp(), _batches()
    with torch.no_grad():  # start measurably away from the teacher
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teacher = _mlp()

    pruned = copy.deepcopy(model)
    compress_(pruned, sparsity_only(PLAN))
    wrappers = [m for m in pruned.modules() if isinstance(m, _CompressedLayer)]
    assert all(m.weight_quant is None and m.input_quant is None for m in wrappers)
    prune_history = train_joint(
        pruned, teacher, batches, dataclasses.replace(CONFIG, steps=8), progress=False
    )
    assert prune_history["mask_updates"]  # the masks moved in the prune phase

    student = copy.deepcopy(model)
    history = train_sequential(student, teacher, PLAN, batches, CONFIG, progress=False)
    assert history["phases"]["prune"]["losses"] == pytest.approx(prune_history["losses"])
    for name in ("0", "2"):
        layer = student.get_submodule(name)
        assert torch.equal(layer.mask, pruned.get_submodule(name).mask), name
        assert bool(layer.mask_frozen)
        assert is_2_4_sparse(layer.effective_weight().detach())
        assert layer.weight_quant is not None and layer.input_quant is not None
    assert student.get_submodule("4").mask is None
    assert bool(student.get_submodule("2").input_quant.initialized)
    losses = history["losses"]
    assert losses[-1] < 0.7 * losses[0]


class _Interrupted(Exception):
    pass


def _interrupt_after(model: nn.Module, calls: int) -> None:
    seen = []

    def hook(module, inputs):
        seen.append(1)
        if len(seen) > calls:
            raise _Interrupted

    model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("interrupt_after", [5, 11], ids=["in_prune_phase", "in_quantize_phase"])
def test_sequential_resume_matches_an_uninterrupted_run(tmp_path, interrupt_after):
    config = dataclasses.replace(CONFIG, checkpoint_every=3)
    model, batches = _mlp(), _batches()
    straight = copy.deepcopy(model)
    expected = train_sequential(straight, _mlp(), PLAN, batches, config, progress=False)

    checkpoint = tmp_path / "seq.pt"
    teacher = _mlp()
    _interrupt_after(teacher, interrupt_after)
    with pytest.raises(_Interrupted):
        train_sequential(
            copy.deepcopy(model),
            teacher,
            PLAN,
            batches,
            config,
            progress=False,
            checkpoint_path=checkpoint,
        )
    paths = phase_checkpoint_paths(checkpoint)
    assert paths["prune"].is_file()
    assert paths["quantize"].is_file() == (interrupt_after > 8)

    resumed = copy.deepcopy(model)
    history = train_sequential(
        resumed,
        _mlp(),
        PLAN,
        batches,
        config,
        progress=False,
        checkpoint_path=checkpoint,
        resume=True,
    )
    assert history["logged_steps"] == expected["logged_steps"]
    assert history["losses"] == pytest.approx(expected["losses"], abs=1e-6)
    final = straight.state_dict()
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6, msg=key)
    assert torch.load(paths["quantize"], weights_only=True)["step"] == 8


def test_compress_and_train_leaves_the_model_and_matches_joint_training():
    model, batches = _mlp(), _batches()
    before = copy.deepcopy(model.state_dict())
    config = dataclasses.replace(CONFIG, steps=6)
    student, history = compress_and_train(model, None, PLAN, batches, config, progress=False)
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    manual = copy.deepcopy(model)
    compress_(manual, PLAN)
    expected = train_joint(manual, copy.deepcopy(model), batches, config, progress=False)
    assert history == {"mode": "joint", **expected}
    final = manual.state_dict()
    for key, value in student.state_dict().items():
        assert torch.equal(value, final[key]), key


def test_one_step_sequential_run_skips_the_prune_training():
    student, history = compress_and_train(
        _mlp(),
        None,
        PLAN,
        _batches(),
        dataclasses.replace(CONFIG, steps=1, log_every=1),
        mode="sequential",
        progress=False,
    )
    assert history["phase_steps"] == {"prune": 0, "quantize": 1}
    assert history["logged_steps"] == [1] and history["phases"]["prune"]["losses"] == []
    assert isinstance(student[0], CompressedLinear) and bool(student[0].mask_frozen)


def test_plan_errors_surface_before_any_training():
    model = _mlp()
    bad = dataclasses.replace(PLAN, layers=(_decision("0", (32, 16), weight="int4_sym_group32"),))
    teacher = copy.deepcopy(model)
    calls = _recorded(teacher)
    with pytest.raises(DeployCompError, match=r"'0'.*multiple of 32"):
        train_sequential(model, teacher, bad, _batches(), CONFIG, progress=False)
    assert calls == [] and type(model[0]) is nn.Linear
    with pytest.raises(DeployCompError, match="unknown compression mode 'sequental'.*'sequential'"):
        compress_and_train(model, None, PLAN, _batches(), CONFIG, mode="sequental")


def test_set_mask_adopts_and_freezes_a_pattern_and_refits_the_weight_steps():
    weight = torch.tensor([[4.0, -1.0, 0.5, 0.2, 0.1, 0.3, -0.6, 0.0]])
    linear = nn.Linear(8, 1)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = CompressedLinear(linear, weight="int4_sym_group4", sparsity="2:4")
    assert layer.weight_quant.scale()[0, 0].item() == pytest.approx(4.0 / 7)
    mask = torch.tensor([[False, True, True, False, True, False, True, False]])
    layer.set_mask(mask)
    assert torch.equal(layer.mask, mask) and bool(layer.mask_frozen)
    assert layer.update_mask() == 0
    torch.testing.assert_close(layer.weight_quant.scale(), torch.tensor([[1.0 / 7, 0.6 / 7]]))

    with pytest.raises(DeployCompError, match="keeping 2 of every 4"):
        layer.set_mask(torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(DeployCompError, match=r"shape \(1, 8\)"):
        layer.set_mask(mask.reshape(2, 4))
    with pytest.raises(DeployCompError, match="sparsity 'none'"):
        CompressedLinear(nn.Linear(8, 1)).set_mask(mask)
