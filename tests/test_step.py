"""The distillation step's geometry: augmentation undo, planar face disparity, masks, half/half."""

import numpy as np
import pytest
import torch
from torch import nn

from panorama import FACE_ROTATIONS, depth_to_disparity, equirect_to_cube, random_rotations
from sharding.synthetic import generate_panorama, make_scene, render_perspective
from student.augment import draw_augmentation
from student.losses import normalize_disparity
from student.step import distill_step, pseudo_loss, rotated_face_mask
from teacher_server.labels import PseudoLabels
from teacher_server.oracle import OracleLabels


class FirstChannel(nn.Module):
    """A 'student' that reads disparity written into the red channel: exact iff augmentation is undone."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x[:, :1] * self.w


def _scene_batch(n=2, h=64, seed=0, windows=False):
    rgb, depth, valid, keys = [], [], [], []
    for i in range(n):
        s = generate_panorama(seed + i, "apartment", h, windows=windows)
        rgb.append(torch.from_numpy(s["rgb"]).permute(2, 0, 1).float() / 255)
        depth.append(torch.from_numpy(s["depth"])[None])
        valid.append(torch.from_numpy(s["valid"])[None])
        keys.append(f"gen-{seed + i}")
    return {"key": keys, "rgb": torch.stack(rgb), "depth": torch.stack(depth), "valid": torch.stack(valid)}


def test_augmentation_undo_is_exact_inverse():
    x = torch.rand(5, 3, 8, 16)
    aug = draw_augmentation(5, 16, torch.Generator().manual_seed(0), color_jitter=0.0)
    assert aug.flips.any() and (~aug.flips).any() and (aug.shifts > 0).any()
    assert torch.equal(aug.undo(aug.apply(x)), x)  # RGB in, prediction-shaped maps back out
    assert torch.equal(aug.undo(aug.apply(x)[:, :1]), x[:, :1])
    assert not torch.equal(aug.apply(x), x)


def test_student_faces_match_perspective_renders_only_as_planar_disparity(monkeypatch):
    """The student side of the pseudo loss: exact radial disparity on the sphere vs rendered perspective
    faces. Planar conversion makes them agree; leaving depth radial does not."""
    scene = make_scene(3, "apartment", windows=False)
    from sharding.synthetic import render_panorama
    _, depth, valid = render_panorama(scene, 128)
    disp = depth_to_disparity(torch.from_numpy(depth))[None, None]
    rot = random_rotations(1, generator=torch.Generator().manual_seed(4))
    f = 32
    teacher = []
    for k in range(6):
        _, planar, ok = render_perspective(scene, rot[0] @ FACE_ROTATIONS[k], f)
        t = torch.from_numpy(np.where(ok, 1.0 / np.maximum(planar, 1e-6), np.nan)).float()
        teacher.append(normalize_disparity(t[None], torch.from_numpy(ok)[None]).where(torch.from_numpy(ok)[None], torch.tensor(float("nan"))))
    labels = PseudoLabels(rotations=rot, disparity=torch.stack(teacher)[None], face_valid=torch.ones(1, 6, dtype=torch.bool))
    valid_t = torch.from_numpy(valid)[None, None]
    good = pseudo_loss(disp, labels, valid_t, f)
    from student import step as step_mod  # now leave the student's disparity radial on the faces
    monkeypatch.setattr(step_mod, "equirect_to_planar_faces",
                        lambda e, size, rotation=None, quantity="disparity": equirect_to_cube(e, size, rotation))
    radial = pseudo_loss(disp, labels, valid_t, f)
    assert good.item() < 0.03
    assert radial.item() > 3 * good.item()


def test_distill_step_is_zero_for_a_perfect_student_under_augmentation():
    lab = _scene_batch(2, seed=0)
    unl = _scene_batch(2, seed=10)
    for half in (lab, unl):  # write the exact disparity into the red channel
        d = depth_to_disparity(half["depth"], half["valid"])
        half["rgb"] = torch.cat([d / d.amax(), half["rgb"][:, 1:]], 1)
    rots = random_rotations(2, generator=torch.Generator().manual_seed(1))
    labels = OracleLabels(affine=True).request(unl, rots, 16).result()
    out = distill_step(FirstChannel(), {"labeled": lab, "unlabeled": unl}, labels, face_size=16,
                       generator=torch.Generator().manual_seed(0), augment=True, color_jitter=0.0)
    assert out.parts["loss_labeled"].item() < 1e-4
    assert out.parts["loss_pseudo"].item() < 1e-4
    # the same student without undoing augmentation would be wrong: shuffle the prediction frame
    out_bad = distill_step(lambda x: x[:, :1].roll(7, -1), {"labeled": lab, "unlabeled": unl}, labels, face_size=16,
                           generator=torch.Generator().manual_seed(0), augment=False)
    assert out_bad.parts["loss"].item() > 0.05


def test_masks_rotate_with_the_cube_and_invalid_faces_are_dropped():
    valid = torch.ones(1, 1, 32, 64, dtype=torch.bool)
    valid[..., :11, :] = False  # sky above ~30 deg latitude; the U face reaches down to 35 deg at its corners
    up = rotated_face_mask(valid, 16, None)
    assert not up[0, 4].any() and up[0, 5].all()  # U face masked, D face kept
    pitch_down = torch.tensor([[[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]])  # looks down 90 deg: U face sees forward
    rotated = rotated_face_mask(valid, 16, pitch_down)
    assert 0.5 < rotated[0, 4].float().mean() < 1.0  # now mostly wall, sky only at its top
    assert not rotated[0, 2].any()  # and the B face now looks straight up into the sky
    pred = torch.rand(1, 1, 32, 64, requires_grad=True)
    labels = PseudoLabels(rotations=torch.eye(3)[None], disparity=torch.rand(1, 6, 1, 16, 16),
                          face_valid=torch.zeros(1, 6, dtype=torch.bool))
    loss = pseudo_loss(pred, labels, valid, 16)
    assert loss.item() == 0.0  # every face declared invalid by the teacher: nothing to learn from


def test_step_uses_both_halves_equally_and_refuses_neither():
    lab, unl = _scene_batch(2, seed=0), _scene_batch(2, seed=20)
    seen = []

    class Spy(FirstChannel):
        def forward(self, x):
            seen.append(x.shape[0])
            return torch.sigmoid(x[:, :1] * self.w)

    labels = OracleLabels(affine=False).request(unl, None, 16).result()
    out = distill_step(Spy(), {"labeled": lab, "unlabeled": unl}, labels, face_size=16,
                       generator=torch.Generator().manual_seed(0))
    assert seen == [4]  # one forward over 2 labeled + 2 unlabeled
    expected = (out.parts["loss_labeled"] + out.parts["loss_pseudo"]) / 2
    assert torch.allclose(out.parts["loss"], expected)
    with pytest.raises(ValueError, match="labeled half"):
        distill_step(Spy(), {"labeled": lab, "unlabeled": unl}, None, face_size=16,
                     generator=torch.Generator().manual_seed(0), labeled_weight=0.0)
