"""Teacher models, the in-process backend and the online label source (no Ray here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from panorama import FACE_ROTATIONS, planar_faces_to_equirect, random_rotations
from teacher_server.inprocess import InProcessTeacher
from teacher_server.labels import OnlineLabels, PseudoLabels
from teacher_server.models import FrozenTeacher, TeacherUnavailableError, load_teacher, normalize_per_face
from teacher_server.testing import ToyFaceModel

F_SIZE, INPUT = 32, 42  # tiny faces, teacher input a multiple of 14


def _faces(n=6, f=F_SIZE, seed=0):
    return torch.rand(n, 3, f, f, generator=torch.Generator().manual_seed(seed))


def test_tiny_random_is_seeded_frozen_and_normalised():
    a = load_teacher("tiny-random", "cpu", "auto", INPUT, seed=0)
    b = load_teacher("tiny-random", "cpu", "fp32", INPUT, seed=0)
    c = load_teacher("tiny-random", "cpu", "fp32", INPUT, seed=1)
    assert a.dtype == torch.float32 and not a.training
    assert all(not p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training and not a.model.training  # stays frozen
    x = _faces()
    out = a(x)
    assert out.shape == (6, 1, F_SIZE, F_SIZE) and out.dtype == torch.float32
    flat = out.flatten(1)
    assert torch.allclose(flat.amin(1), torch.zeros(6)) and torch.allclose(flat.amax(1), torch.ones(6))
    assert torch.equal(out, b(x))  # same seed, same weights
    assert (out - c(x)).abs().max() > 1e-2  # another seed, other weights
    assert (out - a(x.flip(-1))).abs().max() > 1e-2  # the answer depends on the input
    assert not out.requires_grad


def test_input_size_must_be_a_multiple_of_the_patch():
    from sharding.cli import UserError

    # a setting the user can fix: the one-line user error (exit 2), not a traceback
    with pytest.raises(UserError, match=r"multiple of the model's patch size 14.*got 100"):
        load_teacher("tiny-random", "cpu", "fp32", 100)


def test_save_pretrained_folder_and_state_dicts_load_offline(tmp_path):
    ref = load_teacher("tiny-random", "cpu", "fp32", INPUT, seed=3)
    x = _faces(seed=1)
    want = ref(x)
    ref.model.save_pretrained(tmp_path / "teacher")
    assert torch.allclose(load_teacher(str(tmp_path / "teacher"), "cpu", "fp32", INPUT, local_files_only=True)(x),
                          want, atol=1e-6)
    torch.save({"model": ref.model.state_dict()}, tmp_path / "teacher" / "weights.pt")
    assert torch.allclose(load_teacher(str(tmp_path / "teacher" / "weights.pt"), "cpu", "fp32", INPUT)(x), want, atol=1e-6)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()}, tmp_path / "w.safetensors")
    got = load_teacher(str(tmp_path / "w.safetensors"), "cpu", "fp32", INPUT, architecture="tiny-random")(x)
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="needs its architecture"):
        load_teacher(str(tmp_path / "w.safetensors"), "cpu", "fp32", INPUT)


def test_own_teacher_folder_brings_its_input_size_and_normalisation(tmp_path):
    """A folder as student.perspective_teacher.train writes it (here a tiny GLPN, total stride 32)."""
    import json

    from transformers import GLPNConfig, GLPNForDepthEstimation

    torch.manual_seed(0)
    model = GLPNForDepthEstimation(GLPNConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                              num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16))
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "do_normalize": True}))
    (tmp_path / "pano_distill.json").write_text(json.dumps({"input_size": 64}))
    teacher = load_teacher(str(tmp_path), "cpu", "fp32", "auto")
    assert (teacher.input_size, teacher.patch_size) == (64, 32)
    assert torch.allclose(teacher.mean.flatten(), torch.full((3,), 0.5))
    assert torch.allclose(teacher.std.flatten(), torch.full((3,), 0.25))
    out = teacher(_faces(6, 32))
    assert out.shape == (6, 1, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple of the model's patch size 32"):
        load_teacher(str(tmp_path), "cpu", "fp32", 518)


def test_unreachable_model_names_the_id_and_how_to_use_a_local_copy(tmp_path):
    with pytest.raises(TeacherUnavailableError) as err:
        load_teacher("pano-distill-tests/no-such-teacher", "cpu", local_files_only=True)
    msg = str(err.value)
    assert "pano-distill-tests/no-such-teacher" in msg
    assert "teacher.model=/path/to/" in msg and "HF_HOME" in msg and "hf download" in msg
    missing = tmp_path / "nowhere" / "Depth-Anything-V2-Small-hf"
    with pytest.raises(TeacherUnavailableError, match=f"{missing}.*does not exist"):
        load_teacher(str(missing), "cpu")


def test_normalize_per_face_marks_nonfinite_and_constant_faces():
    raw = torch.rand(4, 1, 8, 8) * 5 + 1
    raw[1, 0, 3, 3] = float("inf")
    raw[2] = 7.0
    raw[3] = 7.0 + 1e-7 * torch.rand(1, 8, 8)  # constant up to float noise
    out, valid = normalize_per_face(raw)
    assert valid.tolist() == [True, False, False, False]
    assert torch.isnan(out[1:]).all() and torch.isfinite(out[0]).all()
    assert out[0].min() == 0 and out[0].max() == 1


class _Flaky(nn.Module):
    """Answers NaN on the right face (index 1) and a constant on the up face (4) of every cube."""

    def forward(self, faces):
        out = faces[:, :1] + 0.1
        out[1::6] = float("nan")
        out[4::6] = 3.0
        return out


def _panoramas(b=2, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, 3, h, 2 * h, generator=g)
    return {"key": [f"p{i}" for i in range(b)], "rgb": rgb, "valid": torch.ones(b, 1, h, 2 * h, dtype=torch.bool)}


def test_nan_and_constant_answers_are_invalid_faces_and_counted():
    src = OnlineLabels(InProcessTeacher(_Flaky(), device="cpu"))
    labels = src.request(_panoramas(), random_rotations(2, generator=torch.Generator().manual_seed(1)), 16).result()
    assert isinstance(labels, PseudoLabels)
    expected = torch.ones(2, 6, dtype=torch.bool)
    expected[:, [1, 4]] = False
    assert torch.equal(labels.face_valid, expected)
    assert torch.isnan(labels.disparity[:, [1, 4]]).all()
    good = labels.disparity[expected]
    assert torch.isfinite(good).all() and good.min() == 0 and good.max() == 1
    stats = src.stats()
    assert stats["invalid_faces"] == 4 and stats["backend_invalid_faces"] == 4 and stats["faces"] == 12
    for kind in ("nan", "constant"):
        teacher = InProcessTeacher(f"toy:{kind}", device="cpu")
        out = teacher.pseudo_label(_faces(6, 16))
        assert torch.isnan(out).all() and teacher.stats()["invalid_faces"] == 6


def test_online_labels_follow_the_scene_geometry():
    """An exact teacher through OnlineLabels reproduces a generated scene's ray-cast planar disparity on every
    face of the rotated cube, and its inverse projection reproduces the panorama's radial disparity."""
    from sharding.synthetic import generate_panorama, make_scene, render_perspective

    seed, h, f = 3, 128, 32
    sample = generate_panorama(seed, "apartment", h, windows=False)
    radial = torch.from_numpy(sample["depth"]).double()
    assert (radial > 0).all()
    rdisp = (1.0 / radial).float()
    rgb = torch.from_numpy(sample["rgb"]).permute(2, 0, 1).float() / 255.0
    # the exact face model reads radial disparity from a 4th channel projected like the RGB
    x = torch.cat([rgb, (rdisp / rdisp.max())[None]])[None].repeat(2, 1, 1, 1)
    batch = {"key": ["a", "b"], "rgb": x, "valid": torch.ones(2, 1, h, 2 * h, dtype=torch.bool)}
    rots = random_rotations(2, generator=torch.Generator().manual_seed(11))
    labels = OnlineLabels(InProcessTeacher(ToyFaceModel("depth-channel"), device="cpu")).request(batch, rots, f).result()
    assert labels.disparity.shape == (2, 6, 1, f, f) and labels.face_valid.all()
    assert torch.equal(labels.rotations, rots)

    scene = make_scene(seed, "apartment", windows=False)

    def fit_error(i, rotation):
        """Median relative error of the per-face affine fit of the labels to ray-cast planar disparity."""
        errs, fitted = [], []
        for k in range(6):
            _, planar, _ = render_perspective(scene, rotation.double() @ FACE_ROTATIONS[k].double(), f)
            want = torch.from_numpy(1.0 / planar).double().flatten()
            got = labels.disparity[i, k, 0].double().flatten()
            a = torch.stack([got, torch.ones_like(got)], 1)
            coef = torch.linalg.lstsq(a, want[:, None]).solution
            fit = (a @ coef)[:, 0]
            errs.append(((fit - want).abs() / want).median())
            fitted.append(fit.reshape(1, f, f))
        return max(errs), torch.stack(fitted).float()

    faces = []
    for i in range(2):
        err, fitted = fit_error(i, rots[i])
        assert err < 0.01, f"sample {i}: faces disagree with the scene by {err:.3f}"
        wrong, _ = fit_error(i, rots[i].T)  # the test can fail: the inverse rotation does not fit
        assert wrong > 10 * err
        faces.append(fitted)
    back = planar_faces_to_equirect(torch.stack(faces), h, 2 * h, rotation=labels.rotations, quantity="disparity")
    rel = (back[:, 0] - rdisp).abs() / rdisp
    assert rel.median() < 0.005 and rel.quantile(0.9) < 0.02


def test_frozen_teacher_batches_and_counts():
    teacher = load_teacher("tiny-random", "cpu", "fp32", INPUT, max_batch_faces=4)
    assert isinstance(teacher, FrozenTeacher)
    x = _faces(10)
    whole = load_teacher("tiny-random", "cpu", "fp32", INPUT)(x)
    assert torch.allclose(teacher(x), whole, atol=1e-5)
    assert teacher.faces_total == 10 and teacher.compute_seconds > 0
