"""Channel groups of a dozen small architectures: zeroing a group equals removing it physically."""

import copy
import os

import pytest
import torch
from torch import nn

from deploycomp.compress.modules import CompressedConv2d, CompressedLinear
from deploycomp.prune import (
    AttentionSpec,
    build_groups,
    group_importance,
    prune_group,
    register_attention,
)
from deploycomp.prune.apply import scale_units

ATOL = 1e-5


def _conv_bn(cin: int, cout: int, k: int = 3, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(3, 8), _conv_bn(8, 12), nn.MaxPool2d(2), _conv_bn(12, 8))
        self.head = nn.Linear(8 * 4 * 4, 5)  # flatten of C x H x W: unit H * W per channel

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = _conv_bn(3, c)
        self.a, self.b = _conv_bn(c, c), _conv_bn(c, c, act=False)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.b(self.a(x)) + x)
        return self.fc(x.mean(dim=(2, 3)))


class Bottleneck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.reduce, self.mid = _conv_bn(8, 4, 1), _conv_bn(4, 4)
        self.expand, self.shortcut = _conv_bn(4, 16, 1, act=False), _conv_bn(8, 16, 1, act=False)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = nn.functional.relu(self.expand(self.mid(self.reduce(x))) + self.shortcut(x))
        return self.fc(self.pool(x).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block; ``se`` adds squeeze-excitation (EfficientNet), ``lite`` leaves it out."""

    def __init__(self, se: bool = False) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8)
        self.expand, self.dw = _conv_bn(8, 24, 1), _conv_bn(24, 24, groups=24)
        self.project = _conv_bn(24, 8, 1, act=False)
        self.se = (
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 6, 1), nn.SiLU(), nn.Conv2d(6, 24, 1)
            )
            if se
            else None
        )
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(self.expand(x))
        if self.se is not None:
            h = h * torch.sigmoid(self.se(h))
        x = x + self.project(h)
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class UNetBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = _conv_bn(3, 6), _conv_bn(6, 10)
        self.dec = _conv_bn(16, 8)  # reads cat([enc1, enc2]): offsets 0 and 6
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.enc1(x)
        return self.out(self.dec(torch.cat([a, self.enc2(a)], dim=1)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(32, 16),
            nn.Tanh(),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        return self.net(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape

        def split(y):
            return y.view(b, t, -1, self.head_dim).transpose(1, 2)

        attn = (split(self.q(x)) @ split(self.k(x)).transpose(-1, -2)) / self.head_dim**0.5
        out = attn.softmax(-1) @ split(self.v(x))
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


register_attention(SelfAttention, AttentionSpec("q", "k", "v", "heads", "head_dim", output="proj"))


class ViT(nn.Module):
    """Patch embedding + one pre-norm block + mean pooling; the hidden size goes through LayerNorm."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.ln1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads=4)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(dim=1))


class BertStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        config = BertConfig(
            hidden_size=16, num_attention_heads=4, intermediate_size=24, hidden_dropout_prob=0.0
        )
        config._attn_implementation = "eager"
        self.layers = nn.ModuleList([BertLayer(config, layer_idx=i) for i in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, hidden):
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _conv_bn(3, 8), _conv_bn(8, 8, groups=2), nn.Conv2d(8, 2, 1)
        self.d, self.e = _conv_bn(3, 4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x))) + self.e(self.d(x))


class ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _conv_bn(3, 8), _conv_bn(8, 6), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.c(self.b(y))


def _compressed_cnn() -> nn.Module:
    model = PlainCNN()
    for name, sparsity in (("0", "none"), ("1", "2:4"), ("3", "2:4")):
        block = model.body.get_submodule(name)
        block[0] = CompressedConv2d(
            block[0],
            weight="int8_sym_per_channel",
            activation="int8_sym_per_tensor",
            sparsity=sparsity,
        )
    model.head = CompressedLinear(model.head, weight="int4_sym_group16", sparsity="2:4")
    return model


def _randomize_bn(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))


@torch.no_grad()
def _zero_units(model: nn.Module, group, drop: list[int]) -> None:
    scale_units(model, group, drop, 0.0)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_every_group(model: nn.Module, x: torch.Tensor, seed: int = 0, block: int = 1):
    """Zeroed == pruned (zero-invariant groups) and fewer parameters, one random drop per group.

    ``block`` drops aligned blocks of that many units, so 2:4 groups are removed whole.
    """
    generator = torch.Generator().manual_seed(seed)
    _randomize_bn(model, generator)
    model.eval()
    graph = build_groups(model, (x,))
    assert graph.prunable(), graph.refused
    for group in graph.prunable():
        scores = group_importance(model, group)
        assert scores.shape == (group.size,) and bool((scores >= 0).all())
        blocks = group.size // block
        drop_count = int(torch.randint(1, blocks, (1,), generator=generator)) if blocks > 1 else 0
        order = torch.randperm(blocks, generator=generator).tolist()
        drop = [b * block + i for b in order[:drop_count] for i in range(block)]
        keep = sorted(set(range(group.size)) - set(drop))
        zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
        _zero_units(zeroed, group, drop)
        prune_group(pruned, group, keep)
        out = pruned(x)
        if drop:
            assert _params(pruned) < _params(model), group
        if group.zero_invariant:
            torch.testing.assert_close(out, zeroed(x), atol=ATOL, rtol=ATOL)
    return graph


def _roles(graph) -> set[tuple[str, str]]:
    return {(s.module, s.role) for g in graph.prunable() for s in g.slots}


IMAGE = (1, 3, 8, 8)


@pytest.mark.parametrize(
    "factory",
    [
        PlainCNN,
        BasicBlock,
        Bottleneck,
        InvertedResidual,
        lambda: InvertedResidual(se=True),
        UNetBlock,
    ],
    ids=["cnn", "resnet_basic", "resnet_bottleneck", "mobilenetv2", "efficientnet_se", "unet"],
)
def test_cnn_groups_prune_like_zeroing(factory):
    torch.manual_seed(0)
    model = factory()
    graph = _check_every_group(model, torch.randn(IMAGE))
    assert all(
        not g.prunable
        for g in graph.groups
        if any(s.role == "out" and s.module in ("fc", "head", "out") for s in g.slots)
    )


def test_plain_cnn_flatten_expands_to_spatial_columns():
    graph = build_groups(PlainCNN(), (torch.randn(IMAGE),))
    last = next(
        g for g in graph.prunable() if ("head", "in") in {(s.module, s.role) for s in g.slots}
    )
    assert next(s for s in last.slots if s.module == "head").unit == 16


def test_residual_ties_all_producers_and_consumers():
    graph = build_groups(Bottleneck(), (torch.randn(IMAGE),))
    tied = next(g for g in graph.prunable() if g.size == 16)
    assert {(s.module, s.role) for s in tied.slots} == {
        ("expand.0", "out"),
        ("expand.1", "bn"),
        ("shortcut.0", "out"),
        ("shortcut.1", "bn"),
        ("fc", "in"),
    }


def test_unet_concat_offsets():
    graph = build_groups(UNetBlock(), (torch.randn(IMAGE),))
    offsets = {
        g.size: s.offset
        for g in graph.prunable()
        for s in g.slots
        if (s.module, s.role) == ("dec.0", "in")
    }
    assert offsets == {6: 0, 10: 6}


def test_mlp():
    torch.manual_seed(1)
    graph = _check_every_group(MLP(), torch.randn(4, 10))
    assert sorted(g.size for g in graph.prunable()) == [16, 32]


def test_vit_heads_mlp_and_layernormed_hidden():
    torch.manual_seed(2)
    graph = _check_every_group(ViT(), torch.randn(2, 3, 16, 16))
    by_unit = {(g.unit, g.size): g for g in graph.prunable()}
    assert ("head", 4) in by_unit and ("channel", 32) in by_unit
    hidden = by_unit[("channel", 16)]
    assert not hidden.zero_invariant and ("ln1", "ln") in {(s.module, s.role) for s in hidden.slots}


def test_bert_layers_heads_and_ffn():
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(3)
    model = BertStack()
    graph = _check_every_group(model, torch.randn(2, 5, 16))
    units = sorted((g.unit, g.size) for g in graph.prunable())
    assert units == [("channel", 24)] * 2 + [("head", 4)] * 2
    assert "reach the model output" in graph.refused["head"]
    heads = next(g for g in graph.prunable() if g.unit == "head")
    prune_group(model, heads, [1, 3])
    attention = model.layers[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (2, 8)


def test_grouped_conv_is_refused_with_reason():
    graph = _check_every_group(GroupedConv(), torch.randn(IMAGE))
    assert "grouped convolution (groups=2" in graph.refused["b.0"]
    assert not any(s.module == "a.0" for g in graph.prunable() for s in g.slots)


def test_channel_consuming_reshape_is_refused():
    graph = build_groups(ChannelShuffle(), (torch.randn(IMAGE),))
    reason = graph.refused["a.0"]
    assert "splits or moves channel axis 1" in reason
    assert [g.size for g in graph.prunable()] == [6]


def test_compressed_layers_keep_groups_and_prune_masks_and_steps():
    torch.manual_seed(4)
    model = _compressed_cnn()
    model.train()(torch.randn(IMAGE))  # initialise the activation quantizers
    graph = _check_every_group(model, torch.randn(IMAGE), block=4)
    assert ("body.3.0", "out") in _roles(graph) and ("head", "in") in _roles(graph)
    last = next(
        g for g in graph.prunable() if ("head", "in") in {(s.module, s.role) for s in g.slots}
    )
    prune_group(model, last, [0, 2, 5])
    head = model.head
    assert head.mask.shape == head.weight.shape == (5, 48)
    assert head.weight_quant.step.shape == (5, 3)  # whole int4 groups of 16 removed: steps sliced
    assert head.in_features == 48


@pytest.mark.zoo
@pytest.mark.parametrize(("name", "groups"), [("fmnist-cnn", 3), ("efficientnet-lite0", 24)])
def test_zoo_cnns_prune_like_zeroing(name, groups):
    """The built-in CNNs: EfficientNet-Lite's same-padding Conv2d subclasses stay layers and its
    activation module, reused by every block, does not refuse them."""
    from deploycomp.zoo import load

    spec = load(name)
    x = torch.from_numpy(spec.example_inputs[spec.input_names[0]])
    graph = _check_every_group(spec.model, x)
    assert len(graph.prunable()) == groups
    assert all("reach the model output" in why for why in graph.refused.values()), graph.refused


@pytest.mark.zoo
def test_zoo_minilm_heads_and_ffn_prune_like_zeroing():
    """HF's embeddings and attention-mask builder stay opaque, so the BertModel traces; the hidden
    size, tied through embeddings, residuals and LayerNorm, is refused, heads and FFN are not."""
    from deploycomp.zoo import load

    spec = load("minilm-l6", eval_limit=50)
    model = spec.model
    inputs = tuple(torch.from_numpy(spec.example_inputs[n][:2]) for n in spec.input_names)
    graph = build_groups(model, inputs)
    units = sorted((g.unit, g.size) for g in graph.prunable())
    assert units == [("channel", 1536)] * 6 + [("head", 12)] * 6, graph.refused
    assert "opaque input module" in graph.refused["encoder.embeddings"]
    assert "never read" in graph.refused["encoder.pooler.dense"]
    residual = "encoder.encoder.layer.0.attention.output.dense"
    assert "'encoder_embeddings', an untracked tensor" in graph.refused[residual]
    heads = next(g for g in graph.prunable() if g.unit == "head")
    ffn = next(g for g in graph.prunable() if g.unit == "channel")
    for group, drop in ((heads, [0, 5, 11]), (ffn, list(range(0, 1536, 3)))):
        assert group.zero_invariant
        keep = sorted(set(range(group.size)) - set(drop))
        zeroed, pruned = copy.deepcopy(model), copy.deepcopy(model)
        _zero_units(zeroed, group, drop)
        prune_group(pruned, group, keep)
        with torch.no_grad():
            torch.testing.assert_close(pruned(*inputs), zeroed(*inputs), atol=1e-4, rtol=1e-4)
        assert _params(pruned) < _params(model), group
