"""SmoothQuant: exact in fp32, chosen per site, and it lowers INT8 error on outlier channels."""

import numpy as np
import onnx
import torch
from _qdq_models import qdq_arithmetic
from torch import nn

from deploycomp.export.calibrate import calibrate
from deploycomp.export.check import ort_runner
from deploycomp.export.onnx_export import export_fp32, torch_outputs
from deploycomp.export.qdq import LayerQuant, activation_sites, insert_qdq
from deploycomp.export.smooth import channel_statistics, choose_alphas, smooth, smoothable_sites
from deploycomp.measure.accuracy import sqnr_db
from deploycomp.modelspec import ModelSpec
from deploycomp.plan.inventory import build_inventory


class OutlierEncoder(nn.Module):
    """A LayerNorm whose gain blows up two channels, as in trained transformers."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        with torch.no_grad():
            self.norm.weight[:2] = 40.0
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 8)

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.norm(x)))).mean(dim=1)


def _setup(tmp_path):
    rng = np.random.default_rng(0)
    batches = [{"input": rng.standard_normal((4, 16, 64)).astype(np.float32)} for _ in range(3)]
    model = OutlierEncoder().eval()
    spec = ModelSpec("m", model, {"input": batches[0]["input"][:1]}, batches)
    fp32 = export_fp32(spec, tmp_path / "fp32.onnx")
    layers = [la for la in build_inventory(fp32, {"batch": 1}) if la.eligible]
    sites = activation_sites(fp32, {la.node for la in layers})
    return model, batches, fp32, layers, sites


def _quantized_sqnr(tmp_path, graph, layers, model, batches, name):
    sites = activation_sites(graph, {la.node for la in layers})
    ranges = calibrate(graph, list(set(sites.values())), batches, progress=False)
    plan = {la.node: LayerQuant(la, "uint8_per_tensor" if ranges[sites[la.node]].non_negative
                                else "int8_sym_per_tensor") for la in layers}
    onnx.save(insert_qdq(graph, plan, ranges), tmp_path / name)
    test = {"input": np.random.default_rng(9).standard_normal((4, 16, 64)).astype(np.float32)}
    return sqnr_db(torch_outputs(model, test, ["input"]), qdq_arithmetic(tmp_path / name, test))


def test_smoothing_is_exact_in_fp32_and_chosen_for_the_outlier_site(tmp_path):
    model, batches, fp32, layers, sites = _setup(tmp_path)
    groups = smoothable_sites(layers, sites)
    stats = channel_statistics(fp32, list(groups), batches)
    alphas = choose_alphas(fp32, groups, stats)
    norm_site = sites[layers[0].node]
    assert norm_site in alphas  # the LayerNorm output with two huge channels is smoothed
    smoothed, new_sites = smooth(fp32, groups, stats, alphas)
    onnx.checker.check_model(smoothed)
    onnx.save(smoothed, tmp_path / "smoothed.onnx")
    x = batches[0]
    np.testing.assert_allclose(ort_runner(str(tmp_path / "smoothed.onnx"))(x),
                               ort_runner(str(tmp_path / "fp32.onnx"))(x), rtol=1e-4, atol=1e-4)
    plain = _quantized_sqnr(tmp_path, fp32, layers, model, batches, "plain.onnx")
    better = _quantized_sqnr(tmp_path, smoothed, layers, model, batches, "smooth_q.onnx")
    assert better > plain + 3.0, (plain, better)
