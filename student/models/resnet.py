"""ResNet-18/34 (and a tiny CI variant) with torchvision's state-dict key names, and ImageNet weight loading.

Our own implementation (torchvision does not import beside this CPU torch), laid out exactly like
``torchvision.models.resnet`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``)
so that a torchvision checkpoint loads with ``strict=True``. ``forward`` returns the five feature maps that
U-Net decoders consume: stem (/2), layer1 (/4), layer2 (/8), layer3 (/16), layer4 (/32).

Weights (``load_pretrained``) come from one of:

* a torchvision-format file (``resnet18-f37072fd.pth``, ``resnet34-b627a593.pth``; also ``.safetensors``);
* a Hugging Face id (``microsoft/resnet-18``, ``microsoft/resnet-34``) or a local folder holding such a
  checkpoint, loaded with ``transformers.ResNetModel`` and renamed by ``hf_to_torchvision``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .common import EquiMaxPool2d, conv_cls


@dataclass(frozen=True)
class ResNetArch:
    blocks: tuple[int, int, int, int]
    stem: int  # channels of conv1
    widths: tuple[int, int, int, int]  # channels of layer1..layer4
    hf_id: str | None = None  # Hugging Face checkpoint with ImageNet weights

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the five features returned by ``ResNet.forward``."""
        return (self.stem, *self.widths)


ARCHS = {
    "resnet18": ResNetArch((2, 2, 2, 2), 64, (64, 128, 256, 512), "microsoft/resnet-18"),
    "resnet34": ResNetArch((3, 4, 6, 3), 64, (64, 128, 256, 512), "microsoft/resnet-34"),
    # For CI: same topology (4 stages, /32), one block per stage, 16-32 channels; ~40k parameters.
    "resnet_tiny": ResNetArch((1, 1, 1, 1), 16, (16, 16, 32, 32)),
    # For CPU experiments that need more capacity than CI's: ResNet-18's blocks at half its width (7.6 M
    # parameters in a UniFuse, ~2.7x resnet_tiny's step time at 64x128). No pretrained weights exist.
    "resnet_small": ResNetArch((2, 2, 2, 2), 32, (32, 64, 128, 256)),
}
ENCODERS = tuple(ARCHS)


def get_arch(name: str) -> ResNetArch:
    if name not in ARCHS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {ENCODERS}")
    return ARCHS[name]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv: type[nn.Conv2d]):
        super().__init__()
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Torchvision-compatible BasicBlock ResNet.

    ``circular=True`` wraps the padding of every 3x3/7x7 convolution and of the max-pool horizontally,
    for equirect inputs (see ``common``); the weights are the same either way. ``num_classes=0`` (the
    default) builds no ``fc``: a checkpoint's ``fc.*`` is then ignored on load.
    """

    def __init__(self, arch: str = "resnet18", *, in_channels: int = 3, circular: bool = False,
                 num_classes: int = 0):
        super().__init__()
        spec = get_arch(arch)
        self.arch, self.in_channels, self.channels = arch, in_channels, spec.channels
        conv = conv_cls(circular)
        self.conv1 = conv(in_channels, spec.stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (EquiMaxPool2d if circular else nn.MaxPool2d)(kernel_size=3, stride=2, padding=1)
        cin = spec.stem
        for i, (n, width) in enumerate(zip(spec.blocks, spec.widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin if j == 0 else width, width, stride if j == 0 else 1, conv) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = width
        self.fc = nn.Linear(cin, num_classes) if num_classes else None
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so that random-init runs behave like theirs.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self) -> tuple[nn.Module, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> relu (/2): the first of the five features."""
        return self.relu(self.bn1(self.conv1(x)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        x = self.maxpool(feats[0])
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (needs ``num_classes``); for checking loaded weights."""
        if self.fc is None:
            raise RuntimeError("this ResNet was built without fc (num_classes=0)")
        return self.fc(torch.flatten(self(x)[-1].mean(dim=(-2, -1)), 1))


# --------------------------------------------------------------------------------------------- weights

_HF_RULES = [
    (re.compile(r"^embedder\.embedder\.convolution\.(.+)$"), r"conv1.\1"),
    (re.compile(r"^embedder\.embedder\.normalization\.(.+)$"), r"bn1.\1"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(.+)$"), "{s}.{b}.downsample.0.{r}"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(.+)$"), "{s}.{b}.downsample.1.{r}"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.(.+)$"), "{s}.{b}.conv{k}.{r}"),
    (re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.(.+)$"), "{s}.{b}.bn{k}.{r}"),
    (re.compile(r"^classifier\.1\.(.+)$"), r"fc.\1"),
]


def hf_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``transformers`` ResNet (basic layers) state dict to torchvision's keys.

    ``embedder.embedder.{convolution,normalization}`` -> ``conv1`` / ``bn1``;
    ``encoder.stages.S.layers.B.layer.K.{convolution,normalization}`` -> ``layer{S+1}.B.conv{K+1}`` / ``bn{K+1}``;
    ``encoder.stages.S.layers.B.shortcut.{convolution,normalization}`` -> ``layer{S+1}.B.downsample.{0,1}``;
    ``classifier.1`` -> ``fc``. A ``resnet.`` prefix (``ResNetForImageClassification``) is dropped.
    Bottleneck layers (ResNet-50+) are not supported: the students use BasicBlock ResNets only.
    """
    out = {}
    for key, value in state.items():
        k = key[len("resnet."):] if key.startswith("resnet.") else key
        for pattern, repl in _HF_RULES:
            m = pattern.match(k)
            if not m:
                continue
            if "{" in repl:
                g = m.groups()
                fields = {"s": f"layer{int(g[0]) + 1}", "b": g[1], "r": g[-1]}
                if len(g) == 4:
                    if int(g[2]) > 1:
                        raise ValueError(f"{key}: a bottleneck ResNet; only BasicBlock ResNets (18/34) are supported")
                    fields["k"] = int(g[2]) + 1
                out[repl.format(**fields)] = value
            else:
                out[m.expand(repl)] = value
            break
        else:
            raise KeyError(f"unexpected key in a Hugging Face ResNet state dict: {key!r}")
    return out


def _help(source: str, arch: str | None) -> str:
    hf = ARCHS[arch].hf_id if arch in ARCHS and ARCHS[arch].hf_id else "microsoft/resnet-18"
    return (f"Point `pretrained` at a local copy: a torchvision file such as resnet18-f37072fd.pth / "
            f"resnet34-b627a593.pth, or a folder made once on a machine with network by "
            f"`huggingface-cli download {hf} --local-dir DIR` (then pretrained=DIR); HF_HUB_OFFLINE=1 "
            f"skips the network retries. Use an empty value for random initialisation.")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training checkpoints sometimes nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _read_hf(source: str, arch: str | None) -> dict[str, torch.Tensor]:
    try:
        from transformers import ResNetModel

        model = ResNetModel.from_pretrained(source)
    except Exception as exc:  # network, missing files, auth: all end the same way for the user
        raise OSError(f"could not load ImageNet ResNet weights from {source!r} ({type(exc).__name__}: {exc}). "
                      + _help(source, arch)) from exc
    return model.state_dict()


def read_pretrained(source: str | os.PathLike, arch: str | None = None) -> dict[str, torch.Tensor]:
    """A torchvision-keyed state dict from a ``.pth``/``.safetensors`` file, an HF folder, or an HF id."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        state = _read_file(path)
    elif path.is_dir():
        state = _read_hf(str(path), arch)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/", "~")):
        state = _read_hf(source, arch)
    else:
        raise FileNotFoundError(f"ImageNet ResNet weights not found: {source!r} is neither a file, a folder "
                                f"nor a Hugging Face id. " + _help(source, arch))
    if any(k.startswith(("embedder.", "encoder.stages.", "resnet.")) for k in state):
        state = hf_to_torchvision(state)
    return state


def load_pretrained(model: ResNet, source: str | os.PathLike,
                    state: dict[str, torch.Tensor] | None = None) -> ResNet:
    """Load ImageNet weights into ``model`` (strict, apart from ``fc`` when the model has none).

    ``state`` (from ``read_pretrained(source)``) avoids reading the same weights again for a second
    encoder. For a model with a different number of input channels (the 1-channel discriminator), conv1's
    RGB filters are summed over colour, which keeps each filter's response to a grey image.
    """
    state = dict(read_pretrained(source, model.arch) if state is None else state)
    if model.fc is None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = state.get("conv1.weight")
    if w is not None and w.shape[1] != model.in_channels:
        if model.in_channels == 1:
            state["conv1.weight"] = w.sum(dim=1, keepdim=True)
        else:
            raise ValueError(f"{source}: conv1 has {w.shape[1]} input channels, model has {model.in_channels}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{source}: weights do not fit {model.arch}: {exc}") from exc
    return model


def build_resnet(arch: str = "resnet18", *, pretrained: str | os.PathLike | None = None, in_channels: int = 3,
                 circular: bool = False, num_classes: int = 0,
                 state: dict[str, torch.Tensor] | None = None) -> ResNet:
    """A ResNet, ImageNet-initialised when ``pretrained`` names weights (None or "" -> random).

    ``state``: the already-read weights of ``pretrained`` (two-branch models read them once).
    """
    model = ResNet(arch, in_channels=in_channels, circular=circular, num_classes=num_classes)
    if pretrained:
        if get_arch(arch).hf_id is None:
            raise ValueError(f"{arch} has no ImageNet weights; leave `pretrained` empty")
        load_pretrained(model, pretrained, state)
    return model


def build_resnet_pair(arch: str, pretrained: str | os.PathLike | None, *,
                      circular: bool) -> tuple[ResNet, ResNet]:
    """The (equirect, cube) encoders of a two-branch model; only the equirect one pads circularly.

    Both start from the same ImageNet weights, read once.
    """
    if pretrained and get_arch(arch).hf_id is None:
        raise ValueError(f"{arch} has no ImageNet weights; leave `pretrained` empty")
    state = read_pretrained(pretrained, arch) if pretrained else None
    return (build_resnet(arch, pretrained=pretrained, circular=circular, state=state),
            build_resnet(arch, pretrained=pretrained, circular=False, state=state))
