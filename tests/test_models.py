"""Student networks, ResNet weights compatibility, equirect padding and the discriminator (CPU, tiny sizes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from student.models import (MODEL_NAMES, BiFusePP, DepthDiscriminator, RectNet, ResNet, UniFuse, build_discriminator,
                            build_model, build_resnet, discriminator_for, hf_to_torchvision, model_config)
from student.models.common import EquiConv2d, EquiConvTranspose2d, EquiMaxPool2d, to_disparity
from student.models.resnet import load_pretrained, read_pretrained

H, W = 64, 128
TINY = ("unifuse_tiny", "bifusepp_tiny", "rectnet_tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rgb(batch: int = 2, h: int = H, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, 2 * h, generator=torch.Generator().manual_seed(seed))


def _first_convs(model: nn.Module) -> list[nn.Conv2d]:
    if isinstance(model, RectNet):
        return [model.input0[0][0]]
    return [model.equi_encoder.conv1, model.cube_encoder.conv1]


# ------------------------------------------------------------------------------------------- registry


def test_registry_names_and_defaults():
    assert {"unifuse", "bifusepp", "rectnet", "unifuse_tiny", "bifusepp_tiny", "rectnet_tiny"} <= set(MODEL_NAMES)
    assert model_config("unifuse").encoder == "resnet18"
    assert model_config("bifusepp").encoder == "resnet34"  # the paper's default
    assert model_config("unifuse_tiny").encoder == "resnet_tiny"
    # empty values mean "default", so a generic configuration can always pass both
    assert model_config("bifusepp", encoder="", pretrained="").encoder == "resnet34"
    assert model_config("bifusepp", pretrained="").pretrained is None
    assert model_config("rectnet", encoder="", pretrained=None) == model_config("rectnet")
    assert model_config("unifuse", encoder="resnet34", fusion="cat").fusion == "cat"


@pytest.mark.parametrize("name, kwargs, match", [
    ("nope", {}, "unknown model"),
    ("unifuse", {"fusoin": "cee"}, "fusoin"),
    ("rectnet", {"encoder": "resnet18"}, "RectNet has no ResNet encoder"),
    ("unifuse_tiny", {"encoder": "resnet18"}, "fixes encoder"),
    ("unifuse", {"encoder": "resnet50"}, "unknown encoder"),
    ("unifuse", {"fusion": "sum"}, "fusion must be"),
    ("bifusepp_tiny", {"head": "relu"}, "head must be"),
])
def test_registry_refuses_bad_options(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_input_must_be_a_divisible_panorama():
    model = build_model("unifuse_tiny")
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(1, 3, 48, 96))
    with pytest.raises(ValueError, match="2:1"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="RGB"):
        build_model("rectnet_tiny")(torch.rand(1, 1, 64, 128))


# ------------------------------------------------------------------------------------------- students


@pytest.mark.parametrize("name, kwargs", [(n, {}) for n in TINY] + [("unifuse", {"encoder": "resnet18"})])
def test_shape_positive_finite_and_gradients_reach_first_conv(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    out = model(_rgb())
    assert out.shape == (2, 1, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out > 0).all()
    assert torch.isfinite(1.0 / out).all()  # evaluation converts disparity to depth
    assert out.std() > 0  # not a constant map
    out.log().mean().backward()
    for conv in _first_convs(model):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # every parameter takes part (DDP's reducer fails on parameters without gradients)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", TINY)
def test_deterministic_under_a_seed(name):
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model = build_model(name).eval()
        with torch.no_grad():
            outs.append(model(_rgb(1)))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])  # the seed does matter


@pytest.mark.parametrize("name", TINY)
def test_fits_a_fixed_batch(name):
    """The head is not saturated and BN/fusion/decoder train: L1 to a simple target drops quickly."""
    torch.manual_seed(0)
    model = build_model(name)
    x = _rgb(2)
    rows = torch.linspace(0, 1, H).view(1, 1, H, 1).expand(2, 1, H, W)
    target = 0.2 + 0.6 * rows * x.mean(dim=(1, 2, 3)).view(2, 1, 1, 1)  # depends on the row and the image
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = F.l1_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["unifuse_tiny", "bifusepp_tiny"])
def test_cube_branch_is_used(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = _rgb(1)
    with torch.no_grad():
        ref = model(x)
        hooks = [m.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
                 for m in (model.cube_encoder.layer1, model.cube_encoder.layer2, model.cube_encoder.layer3,
                           model.cube_encoder.layer4)]
        if isinstance(model, UniFuse):  # UniFuse also fuses the cube stem
            hooks.append(model.cube_encoder.relu.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out)))
        zeroed = model(x)
        for h in hooks:
            h.remove()
        again = model(x)
    assert torch.equal(ref, again)
    # random-init outputs are nearly flat: compare with the output's own spatial variation
    assert (ref - zeroed).abs().mean() > 0.2 * (ref - ref.mean()).abs().mean()


def test_bifuse_sends_equirect_features_to_the_cube_branch():
    """Bidirectional: the cube encoder's deeper stages see what the equirect branch computed."""
    torch.manual_seed(0)
    model = build_model("bifusepp_tiny").eval()
    seen = {}
    model.cube_encoder.layer4.register_forward_hook(lambda mod, inp, out: seen.__setitem__("in", inp[0].clone()))
    with torch.no_grad():
        model(_rgb(1))
        ref = seen["in"]
        model.equi_encoder.layer1.register_forward_hook(lambda mod, inp, out: out * 0)
        model(_rgb(1))
    assert (ref - seen["in"]).abs().max() > 1e-4


def test_forward_features_and_encoder_arch():
    torch.manual_seed(0)
    for name in TINY:
        model = build_model(name).eval()
        with torch.no_grad():
            feats = model.forward_features(_rgb(1))
        assert isinstance(feats, list) and all(f.ndim == 4 and f.shape[0] == 1 for f in feats)
        assert all(f.shape[-1] == 2 * f.shape[-2] for f in feats)  # equirect grids
    assert build_model("unifuse_tiny").encoder_arch == "resnet_tiny"
    assert isinstance(build_model("bifusepp_tiny"), BiFusePP)


@pytest.mark.parametrize("name", TINY)
def test_autocast_bf16_output_stays_float32_positive(name):
    torch.manual_seed(0)
    model = build_model(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_rgb(2))
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out > 0).all()


def test_disparity_heads():
    x = torch.tensor([-1e4, -20.0, 0.0, 20.0, 1e4])
    s = to_disparity(x, "sigmoid", 1e-3, 1.0)
    assert s.min() >= 1e-3 and s.max() <= 1.0 and torch.all(s[1:] >= s[:-1])
    assert torch.isfinite(1 / to_disparity(x.half(), "sigmoid", 1e-3, 1.0)).all()
    p = to_disparity(x, "softplus", 1e-3, 1.0)
    assert p.min() >= 1e-3 and p[-1] > 1e3  # unbounded above
    torch.manual_seed(0)
    out = build_model("rectnet_tiny", head="softplus", min_disp=0.01)(_rgb(1))
    assert out.min() >= 0.01


# ------------------------------------------------------------------------------------------- equirect padding


def test_equi_conv_is_roll_equivariant_and_differs_from_zero_padding_only_at_the_seam():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 16)
    conv = EquiConv2d(4, 5, (3, 5), padding=(1, 2))
    assert torch.allclose(conv(torch.roll(x, 3, -1)), torch.roll(conv(x), 3, -1), atol=1e-5)
    plain = F.conv2d(x, conv.weight, conv.bias, padding=(1, 2))
    diff = (conv(x) - plain).abs().amax(dim=(0, 1, 2))
    assert diff[:2].min() > 0 and diff[-2:].min() > 0 and diff[2:-2].max() < 1e-6
    strided = EquiConv2d(4, 5, 3, stride=2, padding=1)
    assert torch.allclose(strided(torch.roll(x, 4, -1)), torch.roll(strided(x), 2, -1), atol=1e-5)
    dilated = EquiConv2d(4, 4, 3, padding=20, dilation=20)  # pad wider than the map: wraps twice
    assert dilated(x).shape == x.shape[:1] + (4,) + x.shape[2:]
    assert torch.allclose(dilated(torch.roll(x, 5, -1)), torch.roll(dilated(x), 5, -1), atol=1e-5)


@pytest.mark.parametrize("k, s, p", [(4, 2, 1), (3, 2, 1), (3, 1, 1)])
def test_equi_conv_transpose_is_roll_equivariant(k, s, p):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 12)
    up = EquiConvTranspose2d(3, 2, k, stride=s, padding=p, output_padding=s - 1 if k == 3 and s == 2 else 0)
    ref = nn.ConvTranspose2d(3, 2, k, stride=s, padding=p, output_padding=up.output_padding)
    ref.load_state_dict(up.state_dict())
    y = up(x)
    assert y.shape == ref(x).shape
    assert torch.allclose(up(torch.roll(x, 1, -1)), torch.roll(y, s, -1), atol=1e-5)
    # away from the seam it is the plain transposed convolution
    assert torch.allclose(y[..., 2 * s:-2 * s], ref(x)[..., 2 * s:-2 * s], atol=1e-5)
    assert not torch.allclose(y, ref(x), atol=1e-4)


def test_equi_maxpool_wraps():
    x = torch.zeros(1, 1, 4, 8)
    x[..., 0] = 1.0  # a column at the left edge: the pooled right edge must see it across the seam
    y = EquiMaxPool2d(3, stride=2, padding=1)(x)
    assert y.shape == (1, 1, 2, 4) and (y[..., 0] == 1).all() and (y[..., -1] == 0).all()
    y2 = EquiMaxPool2d(3, stride=1, padding=1)(x)
    assert (y2[..., -1] == 1).all() and (nn.MaxPool2d(3, 1, 1)(x)[..., -1] == 0).all()


def test_rectnet_is_equivariant_to_longitude_rotation():
    """With circular padding everywhere, rotating the panorama by 8 columns rotates the prediction."""
    torch.manual_seed(0)
    x = _rgb(1)
    for circular in (True, False):
        model = build_model("rectnet_tiny", circular=circular).eval()
        with torch.no_grad():
            err = (model(torch.roll(x, 8, -1)) - torch.roll(model(x), 8, -1)).abs().max()
        assert (err < 1e-5) if circular else (err > 1e-4)


def test_circular_resnet_features_are_equivariant():
    torch.manual_seed(0)
    net = build_resnet("resnet_tiny", circular=True).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        a, b = net(torch.roll(x, 32, -1)), net(x)
    for level, (fa, fb) in enumerate(zip(a, b)):
        shift = 32 // (2 ** (level + 1))
        assert torch.allclose(fa, torch.roll(fb, shift, -1), atol=1e-5)


# ------------------------------------------------------------------------------------------- ResNet weights


def _perturb_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_resnet_state_dict_uses_torchvision_names():
    keys = list(ResNet("resnet18", num_classes=1000).state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked", "layer1.0.conv1.weight",
              "layer1.0.bn1.running_mean", "layer1.1.bn2.running_var", "layer2.0.downsample.0.weight",
              "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert k in keys
    # torchvision resnet18: 20 BatchNorms x 5 tensors + 20 convolutions + fc.weight/bias
    assert len(keys) == 122
    assert "layer1.0.downsample.0.weight" not in keys
    enc = ResNet("resnet34").state_dict()
    assert not any(k.startswith("fc.") for k in enc)
    assert "layer3.5.conv2.weight" in enc and "layer3.6.conv1.weight" not in enc  # 3-4-6-3 blocks


def test_resnet_small_is_resnet18_at_half_width():
    """The bench's mid-size encoder: ResNet-18's blocks and key names, half its channels, no weights."""
    small, r18 = ResNet("resnet_small").state_dict(), ResNet("resnet18").state_dict()
    assert list(small) == list(r18)
    for k, v in small.items():
        if v.ndim == 4:  # conv weights: every channel count halved (RGB input excepted)
            out_c, in_c = r18[k].shape[:2]
            assert v.shape[:2] == (out_c // 2, in_c if in_c == 3 else in_c // 2), k
    model = build_model("unifuse", encoder="resnet_small")
    assert model.encoder_arch == "resnet_small" and 7.0e6 < sum(p.numel() for p in model.parameters()) < 8.0e6
    with torch.no_grad():
        out = model(_rgb(1))
    assert out.shape == (1, 1, *_rgb(1).shape[-2:]) and (out > 0).all()
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_resnet("resnet_small", pretrained="resnet18-f37072fd.pth")


def test_torchvision_checkpoint_loads_into_both_unifuse_encoders(tmp_path):
    torch.manual_seed(1)
    ref = ResNet("resnet18", num_classes=1000)  # a stand-in for resnet18-f37072fd.pth (same keys)
    _perturb_bn(ref)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("unifuse", encoder="resnet18", pretrained=str(path))
    for enc in (model.equi_encoder, model.cube_encoder):
        assert torch.equal(enc.conv1.weight, ref.conv1.weight)
        assert torch.equal(enc.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    # an encoder without fc ignores the checkpoint's fc; a 1-channel net sums conv1 over RGB
    disc = build_discriminator(encoder="resnet18", pretrained=str(path))
    assert torch.allclose(disc.encoder.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    classifier = load_pretrained(ResNet("resnet18", num_classes=1000), path)  # with fc: loaded too
    assert torch.equal(classifier.fc.weight, ref.fc.weight)
    with pytest.raises(RuntimeError, match="do not fit"):
        build_resnet("resnet34", pretrained=str(path))


def _hf_resnet(depths, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                    depths=list(depths), layer_type="basic", hidden_act="relu")
    hf = transformers.ResNetModel(cfg).eval()
    _perturb_bn(hf, seed)
    return hf


def test_hf_resnet_maps_onto_ours_with_identical_features():
    hf = _hf_resnet([2, 2, 2, 2])
    ours = ResNet("resnet18").eval()
    ours.load_state_dict(hf_to_torchvision(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        feats = ours(x)
        pooled = ours.maxpool(feats[0])
    assert torch.allclose(pooled, out.hidden_states[0], atol=1e-5)
    for level in range(1, 5):
        assert torch.allclose(feats[level], out.hidden_states[level], atol=1e-4), level
    assert torch.allclose(feats[4], out.last_hidden_state, atol=1e-4)


def test_hf_folder_loads_through_transformers(tmp_path):
    hf = _hf_resnet([3, 4, 6, 3], seed=2)
    hf.save_pretrained(tmp_path / "resnet-34")
    model = build_resnet("resnet34", pretrained=str(tmp_path / "resnet-34"))
    mapped = hf_to_torchvision(hf.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, mapped[k]), k
    # ResNetForImageClassification keys ("resnet." prefix, classifier.1) map to fc
    cls_state = {"resnet." + k: v for k, v in hf.state_dict().items()}
    cls_state["classifier.1.weight"], cls_state["classifier.1.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    full = ResNet("resnet34", num_classes=1000)
    full.load_state_dict(hf_to_torchvision(cls_state), strict=True)


def test_missing_weights_error_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_model("unifuse", pretrained=str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "huggingface-cli download microsoft/resnet-18" in msg and ".pth" in msg
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(OSError) as info:
        read_pretrained(empty, "resnet34")
    assert str(empty) in str(info.value) and "microsoft/resnet-34" in str(info.value)
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_resnet("resnet_tiny", pretrained=str(missing))


# ------------------------------------------------------------------------------------------- discriminator


def test_discriminator_shape_and_encoder_choice():
    disc = build_discriminator(encoder="resnet_tiny")
    assert isinstance(disc, DepthDiscriminator)
    assert disc(torch.rand(3, 1, 32, 64)).shape == (3, 1)
    assert disc(torch.rand(2, 1, 40, 72)).shape == (2, 1)  # any size: global pooling
    with pytest.raises(ValueError, match="expects"):
        disc(torch.rand(2, 3, 32, 64))
    assert discriminator_for(build_model("unifuse_tiny")).cfg.encoder == "resnet_tiny"
    assert discriminator_for(build_model("rectnet_tiny")).cfg.encoder == "resnet18"
    assert discriminator_for(build_model("unifuse_tiny"), encoder="resnet34").cfg.encoder == "resnet34"


def test_discriminator_learns_to_separate_two_depth_distributions():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    h = 16
    ramp = torch.linspace(0.2, 1.0, h).view(1, 1, h, 1).expand(1, 1, h, 2 * h)

    def batch(n):  # "real": smooth vertical ramps at random scales; "fake": speckle noise of the same mean
        real = ramp * (torch.rand(n, 1, 1, 1, generator=g) + 0.5)
        fake = real.mean(dim=(-2, -1), keepdim=True) * (0.5 + torch.rand(n, 1, h, 2 * h, generator=g))
        return torch.cat([real, fake]), torch.cat([torch.ones(n, 1), torch.zeros(n, 1)])

    disc = build_discriminator(encoder="resnet_tiny")
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        x, y = batch(8)
        loss = F.binary_cross_entropy_with_logits(disc(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    x, y = batch(16)
    with torch.no_grad():
        logits = disc(x)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert ((logits > 0).float() == y).float().mean() > 0.9
