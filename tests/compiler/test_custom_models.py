"""Models the zoo does not have: written here, in the style users bring."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import segfast


class TinyEncoderDecoder(nn.Module):
    """An FPN-ish encoder–decoder: F.interpolate, torch.cat, residual adds, GroupNorm, SiLU."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.lateral = nn.Conv2d(32, 16, 1)
        self.norm = nn.GroupNorm(4, 16)
        self.fuse = nn.Conv2d(32, 16, 3, padding=1)
        self.cls = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        s = self.stem(x)  # [N, 16, H/2, W/2]
        s = F.relu(self.block(s) + s)  # residual
        d = self.down(s)  # [N, 32, H/4, W/4]
        up = F.interpolate(self.lateral(d), size=s.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.fuse(torch.cat([self.norm(s), up], dim=1)))
        y = self.cls(y)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


def _randomise(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_custom_encoder_decoder_matches():
    model = _randomise(TinyEncoderDecoder()).eval()
    x = torch.randn(2, 3, 45, 67)
    for output in ("logits", "probs", "mask"):
        eng = segfast.compile(model, x, backend="torch", output=output)
        report = segfast.check(eng, model, [x, torch.randn_like(x)])
        assert report.passed, str(report)
    fused = eng.info.fusions
    assert fused["bn_fold"] == 3
    assert fused["conv_residual"] == 1
    assert fused["skip_concat_resize"] == 1
    assert fused["head_conv"] == 1


class TorchvisionStyle(nn.Module):
    """Returns {"out": ..., "aux": ...} like torchvision's segmentation models."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 3, 1)
        self.aux = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        f = F.relu(self.body(x))
        return OrderedDict(out=self.out(f), aux=self.aux(f))


def test_dict_output_uses_out_and_drops_aux():
    model = TorchvisionStyle().eval()
    x = torch.randn(1, 3, 16, 16)
    eng = segfast.compile(model, x, backend="torch")
    with torch.no_grad():
        assert torch.allclose(eng(x), model(x)["out"], atol=1e-6)
    gm = eng._runner.details["graph"]
    assert "aux" not in "".join(str(n.target) for n in gm.graph.nodes if n.op == "get_attr")


def test_tuple_output_and_plain_sequential():
    seq = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 2, 1)
    ).eval()
    x = torch.randn(3, 3, 11, 13)
    eng = segfast.compile(seq, x, backend="torch", output="mask")
    assert segfast.check(eng, seq, [x]).passed

    class Pair(nn.Module):
        def forward(self, x):
            return seq(x), x.mean()

    eng2 = segfast.compile(Pair().eval(), x, backend="torch")
    assert torch.allclose(eng2(x), seq(x), atol=1e-5)
