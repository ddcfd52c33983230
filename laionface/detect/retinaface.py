"""RetinaFace (MobileNet-0.25 and ResNet-50), laid out so the official biubug6 checkpoints load.

The module and parameter names match biubug6/Pytorch_Retinaface's state dicts exactly
(`body.*`, `fpn.*`, `ssh1..3.*`, `ClassHead.i.conv1x1.*`, `BboxHead.*`, `LandmarkHead.*`), so
`load_state_dict` takes the published files as they are. The ResNet-50 body is written here
(torchvision is not a dependency) with torchvision's module names, because biubug6 wrapped
torchvision's resnet50 in an IntermediateLayerGetter that keeps those names.

Facts that change results and are easy to get wrong:
- the MobileNet body uses LeakyReLU(0.1); FPN and SSH use LeakyReLU(0.1) when they have at most
  64 channels (MobileNet) and plain ReLU at 256 (ResNet-50);
- the input is BGR minus the mean (104, 117, 123), not divided by any std;
- anchors: min sizes [[16, 32], [64, 128], [256, 512]] at strides [8, 16, 32], two per cell,
  regressions scaled by the variances (0.1, 0.2).

`forward` returns raw (boxes, scores, landmarks) regressions; decoding against the priors is
done by `decode`, so the exported ONNX graph stays shape-agnostic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BGR_MEAN = (104.0, 117.0, 123.0)
VARIANCES = (0.1, 0.2)
ANCHOR_MIN_SIZES = ((16, 32), (64, 128), (256, 512))
ANCHOR_STEPS = (8, 16, 32)
ANCHORS_PER_CELL = 2


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    fpn_in_channels: tuple[int, int, int]
    fpn_out_channels: int


NETWORKS = {
    "mobilenet0.25": NetworkSpec("mobilenet0.25", (64, 128, 256), 64),
    "resnet50": NetworkSpec("resnet50", (512, 1024, 2048), 256),
}


def _conv_bn(inp: int, out: int, stride: int = 1, leaky: float | None = 0.0) -> nn.Sequential:
    """3x3 conv + BN (+ LeakyReLU unless leaky is None); indices 0, 1, 2 as in the checkpoints."""
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out),
    ]
    if leaky is not None:
        layers.append(nn.LeakyReLU(negative_slope=leaky, inplace=True))
    return nn.Sequential(*layers)


def _conv_bn_1x1(inp: int, out: int, leaky: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _depthwise_separable(inp: int, out: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


class MobileNetV1Body(nn.Module):
    """MobileNetV1 x0.25 without its classifier; returns the stride 8, 16 and 32 features."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2, leaky=0.1),
            _depthwise_separable(8, 16, 1),
            _depthwise_separable(16, 32, 2),
            _depthwise_separable(32, 32, 1),
            _depthwise_separable(32, 64, 2),
            _depthwise_separable(64, 64, 1),
        )
        self.stage2 = nn.Sequential(
            _depthwise_separable(64, 128, 2),
            *[_depthwise_separable(128, 128, 1) for _ in range(5)],
        )
        self.stage3 = nn.Sequential(
            _depthwise_separable(128, 256, 2),
            _depthwise_separable(256, 256, 1),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return [c3, c4, c5]


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (stride on the 3x3 conv), same attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50Body(nn.Module):
    """ResNet-50 up to layer4 (no avgpool/fc); returns layer2, layer3 and layer4 outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
        ):
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out_channels: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        self.output1 = _conv_bn_1x1(in_channels[0], out_channels, leaky)
        self.output2 = _conv_bn_1x1(in_channels[1], out_channels, leaky)
        self.output3 = _conv_bn_1x1(in_channels[2], out_channels, leaky)
        self.merge1 = _conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(
        self, features: list[torch.Tensor], sides_multiple_of_32: bool = False
    ) -> list[torch.Tensor]:
        """`sides_multiple_of_32`: the input's sides are, so each level is exactly twice the next
        and a constant 2x upsample equals the nearest upsample to the level's size."""
        out1 = self.output1(features[0])
        out2 = self.output2(features[1])
        out3 = self.output3(features[2])
        out2 = self.merge2(out2 + _upsample(out3, out2, sides_multiple_of_32))
        out1 = self.merge1(out1 + _upsample(out2, out1, sides_multiple_of_32))
        return [out1, out2, out3]


def _upsample(x: torch.Tensor, like: torch.Tensor, double: bool) -> torch.Tensor:
    if double:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        quarter = out_channels // 4
        self.conv3X3 = _conv_bn(in_channels, out_channels // 2, leaky=None)
        self.conv5X5_1 = _conv_bn(in_channels, quarter, leaky=leaky)
        self.conv5X5_2 = _conv_bn(quarter, quarter, leaky=None)
        self.conv7X7_2 = _conv_bn(quarter, quarter, leaky=leaky)
        self.conv7x7_3 = _conv_bn(quarter, quarter, leaky=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5_1 = self.conv5X5_1(x)
        out = torch.cat(
            [
                self.conv3X3(x),
                self.conv5X5_2(branch5_1),
                self.conv7x7_3(self.conv7X7_2(branch5_1)),
            ],
            dim=1,
        )
        return F.relu(out)


class _Head(nn.Module):
    def __init__(self, in_channels: int, values_per_anchor: int) -> None:
        super().__init__()
        self.values_per_anchor = values_per_anchor
        self.conv1x1 = nn.Conv2d(in_channels, ANCHORS_PER_CELL * values_per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values_per_anchor)


class RetinaFace(nn.Module):
    """The detector network; input is (N, 3, H, W) float BGR minus `BGR_MEAN`.

    Returns `(box_regressions (N, A, 4), face_probability (N, A), landmark_regressions (N, A, 10))`
    for the A anchors of `priors(H, W)`.
    """

    def __init__(self, network: str = "mobilenet0.25") -> None:
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}; choose one of {sorted(NETWORKS)}")
        spec = NETWORKS[network]
        self.network = network
        self.body = MobileNetV1Body() if network == "mobilenet0.25" else ResNet50Body()
        self.fpn = FPN(spec.fpn_in_channels, spec.fpn_out_channels)
        channels = spec.fpn_out_channels
        self.ssh1 = SSH(channels, channels)
        self.ssh2 = SSH(channels, channels)
        self.ssh3 = SSH(channels, channels)
        self.ClassHead = nn.ModuleList([_Head(channels, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(channels, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(channels, 10) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(self.body(x))
        features = [self.ssh1(levels[0]), self.ssh2(levels[1]), self.ssh3(levels[2])]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features, strict=True)], dim=1)
        logits = torch.cat(
            [head(f) for head, f in zip(self.ClassHead, features, strict=True)], dim=1
        )
        landmarks = torch.cat(
            [head(f) for head, f in zip(self.LandmarkHead, features, strict=True)], dim=1
        )
        face_probability = F.softmax(logits, dim=-1)[..., 1]
        return boxes, face_probability, landmarks


class FusedHeadsRetinaFace(nn.Module):
    """A RetinaFace's function in the form exported to ONNX, for inputs whose sides are multiples
    of 32 px (the detector's canvases): the same outputs, and ONNX Runtime keeps its blocked
    (NCHWc) layout from the input to the heads, ~3 % less CPU per image. The FPN upsamples by a
    constant 2x (not to a size computed from shapes), and each level's class, box and landmark
    1x1 convs run as one conv (in ONNX Runtime each was padded to 16 channels and reordered)."""

    def __init__(self, model: RetinaFace) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleList()
        for level in range(len(ANCHOR_STEPS)):
            convs = [
                heads[level].conv1x1
                for heads in (model.ClassHead, model.BboxHead, model.LandmarkHead)
            ]
            fused = nn.Conv2d(convs[0].in_channels, sum(c.out_channels for c in convs), 1)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([c.weight for c in convs]))
                fused.bias.copy_(torch.cat([c.bias for c in convs]))
            self.heads.append(fused)
        self.splits = [ANCHORS_PER_CELL * values for values in (2, 4, 10)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        levels = model.fpn(model.body(x), sides_multiple_of_32=True)
        features = [model.ssh1(levels[0]), model.ssh2(levels[1]), model.ssh3(levels[2])]
        per_level = [
            head(f).permute(0, 2, 3, 1).split(self.splits, dim=-1)
            for head, f in zip(self.heads, features, strict=True)
        ]
        logits, boxes, landmarks = (
            torch.cat([level[i].reshape(x.shape[0], -1, width) for level in per_level], dim=1)
            for i, width in enumerate((2, 4, 10))
        )
        return boxes, F.softmax(logits, dim=-1)[..., 1], landmarks


# 128 shapes: the 108 canvas shapes of the benchmark's images at 32 px buckets fit.
@lru_cache(maxsize=128)
def priors(height: int, width: int) -> np.ndarray:
    """Anchors for an (height, width) input: float32 (A, 4) rows of (cx, cy, w, h) in input pixels.

    Order matches the heads' output: level by level, row-major over cells, then min size. The
    array is cached per shape and read-only.
    """
    rows = []
    for step, min_sizes in zip(ANCHOR_STEPS, ANCHOR_MIN_SIZES, strict=True):
        cells_y, cells_x = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid(
            (np.arange(cells_y, dtype=np.float64) + 0.5) * step,
            (np.arange(cells_x, dtype=np.float64) + 0.5) * step,
            indexing="ij",
        )
        level = np.empty((cells_y, cells_x, len(min_sizes), 4), dtype=np.float64)
        level[..., 0] = cx[..., None]
        level[..., 1] = cy[..., None]
        level[..., 2] = level[..., 3] = min_sizes
        rows.append(level.reshape(-1, 4))
    anchors = np.concatenate(rows).astype(np.float32)
    anchors.setflags(write=False)
    return anchors


def decode(
    box_regressions: np.ndarray, landmark_regressions: np.ndarray, anchors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float32 regressions (..., A, 4) and (..., A, 10) to corner boxes and landmark points in
    pixels, for anchors (..., A, 4)."""
    centers, sizes = anchors[..., :2], anchors[..., 2:]
    box_centers = centers + box_regressions[..., :2] * np.float32(VARIANCES[0]) * sizes
    box_sizes = sizes * np.exp(box_regressions[..., 2:] * np.float32(VARIANCES[1]))
    half = box_sizes / 2
    boxes = np.concatenate([box_centers - half, box_centers + half], axis=-1)
    points = landmark_regressions.reshape(*landmark_regressions.shape[:-1], 5, 2)
    landmarks = centers[..., None, :] + points * np.float32(VARIANCES[0]) * sizes[..., None, :]
    return boxes, landmarks.reshape(*landmarks.shape[:-2], 10)
