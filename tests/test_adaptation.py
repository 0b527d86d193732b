"""Lee et al.'s recipe: normal/smoothness losses, adversarial signs, a tiny two-phase run."""

import json
from pathlib import Path

import torch

from panorama import depth_to_normals, equirect_directions
from sharding.synthetic import generate_panorama, make_scene
from student.losses import (depth_l2_loss, discriminator_loss, generator_adversarial_loss, gt_edges, normal_loss,
                            smoothness_loss)
from student.train import main

ROOT = Path(__file__).resolve().parents[1]


def _room(seed=1, h=64):
    s = generate_panorama(seed, "apartment", h, windows=False)
    return torch.from_numpy(s["depth"])[None, None], torch.from_numpy(s["valid"])[None, None]


def test_normal_loss_is_scale_free_and_sees_bending():
    depth, valid = _room()
    assert normal_loss(depth * 3.7, depth, None, valid).item() < 1e-5
    # bend the surfaces: a depth factor that varies with longitude is no global scale
    u = torch.linspace(-3.14159, 3.14159, 128)
    bent = depth * torch.exp(0.3 * torch.sin(3 * u))
    assert normal_loss(bent, depth, None, valid).item() > 0.02


def test_room_walls_and_floor_have_axis_aligned_normals():
    scene = make_scene(2, "apartment", windows=False)
    depth, valid = _room(2)
    n, ok = depth_to_normals(depth, valid)
    pts_y = equirect_directions(64, 128)[..., 1] * depth[0, 0]
    floor = ok[0, 0] & (pts_y < -scene.camera[1] + 0.01)  # points on the floor plane y = -camera height
    assert floor.sum() > 50
    # floor normals point up (the rest sit at floor/wall corners, where the stencil straddles two planes)
    assert (n[0, 1][floor] > 0.99).float().mean() > 0.9
    # most valid normals are (close to) one of the room's axes: walls, floor, ceiling, box faces
    axis = n[0].abs().amax(dim=0)
    assert (axis[ok[0, 0]] > 0.99).float().mean() > 0.8


def test_adversarial_losses_have_the_right_signs():
    fooled = torch.full((4, 1), 6.0)  # D says "synthetic" for real predictions: the generator is winning
    caught = torch.full((4, 1), -6.0)
    assert generator_adversarial_loss(fooled) < 0.01 < generator_adversarial_loss(caught)
    good = discriminator_loss(torch.full((4, 1), 6.0), torch.full((4, 1), -6.0))  # right on both domains
    bad = discriminator_loss(torch.full((4, 1), -6.0), torch.full((4, 1), 6.0))
    assert good < 0.01 < bad
    logits = torch.zeros(4, 1, requires_grad=True)
    generator_adversarial_loss(logits).backward()
    assert (logits.grad < 0).all()  # descent raises D's "synthetic" score of real predictions


def test_depth_and_edge_masked_smoothness_losses():
    depth, valid = _room(3)
    assert depth_l2_loss(depth, depth, valid) == 0
    assert depth_l2_loss(depth + 0.5, depth, valid).item() > 0.2
    edges = gt_edges(depth, valid)
    assert 0.01 < edges.float().mean() < 0.5
    # a prediction equal to the ground truth pays little: its jumps sit on masked edges
    assert smoothness_loss(depth, depth, valid) < smoothness_loss(depth + torch.randn_like(depth) * 0.2, depth, valid)


def test_tiny_two_phase_run_logs_discriminator_accuracy(tmp_path):
    run = tmp_path / "da"
    args = ["--config", str(ROOT / "configs" / "domain_adaptation.yaml"), f"run.out_dir={run}", "optim.steps=4",
            "adversarial.pretrain_steps=2", "run.log_every=2", "data.height=64", "data.generated.height=64",
            "data.generated.labeled=8", "data.generated.unlabeled=8", "data.generated.val=4",
            "data.generated.samples_per_shard=2", "model.name=rectnet_tiny", "adversarial.disc_encoder=resnet_tiny",
            "run.progress=false", "data.num_workers=1"]
    assert main(args) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "loss_adv" not in lines[0]["losses"] and "disc_acc_real" not in lines[0]["losses"]  # phase 1
    assert {"loss_adv", "loss_disc", "disc_acc_synthetic", "disc_acc_real"} <= set(lines[1]["losses"])  # phase 2
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "discriminator.pt").is_file()
    assert json.loads((run / "eval.json").read_text())["images"] == 4
