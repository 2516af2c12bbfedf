"""Pose corrections (avatar/posefit.py): the rigid-transform maths and the photometric refinement of one frame."""

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from avatar.field import posefit
from avatar.render import rays as ray_utils


def test_correction_matches_rodrigues_and_is_identity_at_zero():
    torch.manual_seed(0)
    assert torch.allclose(posefit.correction(torch.zeros(6)), torch.eye(4))
    delta = torch.randn(5, 6, dtype=torch.float64) * 0.3
    m = posefit.correction(delta)
    want = Rotation.from_rotvec(delta[:, :3].numpy()).as_matrix()
    assert np.allclose(m[:, :3, :3].numpy(), want, atol=1e-10)
    assert np.allclose(m[:, :3, 3].numpy(), delta[:, 3:].numpy() * posefit.TRANSLATION_UNIT_CM)
    # differentiable at zero (where the closed form is 0/0)
    d = torch.zeros(6, requires_grad=True)
    posefit.correction(d)[:3, :].sum().backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0
    rot, trans = posefit.delta_size(delta)
    assert np.allclose(rot, np.degrees(np.linalg.norm(delta[:, :3].numpy(), axis=1)))


def _plane_scene():
    """A textured plane z = 0 in canonical space seen from 40 cm: render_fn for refine_frame_pose."""
    def colour(rays, px):
        t = -rays["origins"][:, 2] / rays["dirs"][:, 2]
        hit = rays["origins"] + rays["dirs"] * t[:, None]
        x, y = hit[:, 0], hit[:, 1]
        return torch.stack([0.5 + 0.25 * torch.sin(0.7 * x) + 0.2 * torch.cos(0.45 * y),
                            0.5 + 0.3 * torch.sin(0.5 * y + 0.3 * x),
                            0.5 + 0.3 * torch.cos(0.8 * x - 0.2 * y)], -1)
    return colour


def _pixels(pose, k, pts):
    cam = pts @ pose[:3, :3].T + pose[:3, 3]
    return torch.stack([k[0] * cam[:, 0] / -cam[:, 2] + k[2], -k[1] * cam[:, 1] / -cam[:, 2] + k[3]], -1)


def test_refine_frame_pose_recovers_a_perturbed_pose():
    size, k = 64, torch.tensor([90.0, 90.0, 32.0, 32.0])
    box_min, box_max = torch.tensor([-12.0, -12.0, -1.0]), torch.tensor([12.0, 12.0, 1.0])
    true = torch.eye(4)
    true[:3, :3] = torch.as_tensor(Rotation.from_euler("xyz", [8, -5, 3], degrees=True).as_matrix(), dtype=torch.float32)
    true[:3, 3] = torch.tensor([0.5, -0.3, -40.0])
    render = _plane_scene()
    px = ray_utils.pixel_grid(size, size)
    image = render(ray_utils.frame_rays(px, k, true, box_min, box_max), px).reshape(size, size, 3)
    start = posefit.apply(true, torch.tensor([0.03, -0.02, 0.01, 0.04, -0.03, 0.02]))  # ~2°, ~5 mm off
    pts = torch.stack(torch.meshgrid(torch.linspace(-8, 8, 5), torch.linspace(-8, 8, 5), indexing="ij"), -1).reshape(-1, 2)
    pts = torch.cat([pts, torch.zeros(len(pts), 1)], 1)
    before = (_pixels(start, k, pts) - _pixels(true, k, pts)).norm(dim=1).mean()
    refined, delta = posefit.refine_frame_pose(render, start, image, k, box_min, box_max, iterations=150, rays=1024,
                                               lr=5e-3)
    after = (_pixels(refined, k, pts) - _pixels(true, k, pts)).norm(dim=1).mean()
    assert before > 1.0, before
    assert after < 0.25 * before, (float(before), float(after))
    assert torch.allclose(refined, posefit.apply(start, delta))
