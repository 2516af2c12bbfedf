import numpy as np
import pytest

from avatar.capture import camera


def random_pose(rng, yaw=20, dist=60):
    rot = camera.euler_to_matrix(*rng.uniform(-yaw, yaw, 3))
    return camera.make_pose(rot, np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), -dist]))


def test_project_backproject_round_trip():
    rng = np.random.default_rng(0)
    k = camera.mediapipe_intrinsics(640, 480)
    pts = np.c_[rng.uniform(-10, 10, (50, 2)), rng.uniform(-80, -30, 50)]
    px = camera.project(pts, k)
    np.testing.assert_allclose(camera.backproject(px, -pts[:, 2], k), pts, atol=1e-9)


def test_mediapipe_intrinsics_field_of_view():
    fx, fy, cx, cy = camera.mediapipe_intrinsics(640, 480)
    assert (cx, cy) == (320, 240)
    assert np.degrees(2 * np.arctan(240 / fy)) == pytest.approx(63.0)


def test_invert_pose_and_euler_round_trip():
    rng = np.random.default_rng(1)
    pose = random_pose(rng)
    np.testing.assert_allclose(camera.invert_pose(pose) @ pose, np.eye(4), atol=1e-12)
    angles = (12.0, -7.0, 3.0)
    assert camera.matrix_to_euler(camera.euler_to_matrix(*angles)) == pytest.approx(angles)


def test_crop_intrinsics_moves_pixels_like_the_crop():
    k = camera.mediapipe_intrinsics(400, 300)
    pts = np.array([[1.0, 2.0, -50.0], [-4.0, 0.5, -40.0]])
    x0, y0, scale = 50, 20, 2.5
    np.testing.assert_allclose(camera.project(pts, camera.crop_intrinsics(k, x0, y0, scale)),
                               (camera.project(pts, k) - [x0, y0]) * scale)


def test_similarity_align_recovers_transform():
    rng = np.random.default_rng(2)
    src = rng.normal(size=(30, 3))
    rot = camera.euler_to_matrix(30, -10, 5)
    dst = 1.7 * src @ rot.T + [1, 2, 3]
    s, r, t = camera.similarity_align(src, dst)
    assert s == pytest.approx(1.7)
    np.testing.assert_allclose(r, rot, atol=1e-9)
    np.testing.assert_allclose(t, [1, 2, 3], atol=1e-9)


def test_pnp_recovers_pose():
    rng = np.random.default_rng(3)
    k = camera.mediapipe_intrinsics(256, 256)
    shape = rng.normal(scale=5, size=(60, 3))
    pose = random_pose(rng)
    px = camera.project(camera.transform_points(pose, shape), k)
    est = camera.solve_pose_pnp(shape, px, k, camera.make_pose(np.eye(3), [0, 0, -55]))
    np.testing.assert_allclose(est, pose, atol=1e-5)


def test_refine_subject_fits_a_shape_the_canonical_face_misses():
    rng = np.random.default_rng(4)
    k = camera.mediapipe_intrinsics(256, 256)
    canonical = rng.normal(scale=5, size=(80, 3))
    true_shape = canonical + rng.normal(scale=0.6, size=canonical.shape)  # another person's face
    poses = np.stack([random_pose(rng, yaw=25) for _ in range(40)])
    px = np.stack([camera.project(camera.transform_points(p, true_shape), k) for p in poses])
    before = np.median(camera.reprojection_errors(canonical, poses, px, k))
    shape, fitted = camera.refine_subject(px, poses, k, canonical, np.ones(len(canonical)))
    after = np.median(camera.reprojection_errors(shape, fitted, px, k))
    assert after < 0.2 * before
    assert after < 0.3  # pixels (from several)


def test_align_canonical_rotations_recovers_a_known_rotation():
    rng = np.random.default_rng(5)
    truth = np.stack([camera.euler_to_matrix(*rng.uniform(-30, 30, 3)) for _ in range(40)])
    frames_offset = camera.euler_to_matrix(25, -12, 7)  # another tracker's canonical frame
    noise = np.stack([camera.euler_to_matrix(*rng.normal(0, 0.3, 3)) for _ in range(40)])
    fitted = noise @ truth @ frames_offset
    a = camera.align_canonical_rotations(fitted, truth)
    assert camera.rotation_angle_deg(a, frames_offset) < 0.2
    errors = camera.head_rotation_errors(truth @ frames_offset, truth)  # exact up to the frame change
    np.testing.assert_allclose(errors, 0, atol=1e-6)
    nodded = truth @ frames_offset
    nodded[0] = truth[0] @ camera.euler_to_matrix(0, 4.0, 0) @ frames_offset  # one frame nods 4° more
    errors = camera.head_rotation_errors(nodded, truth)
    assert errors[0, 0] == pytest.approx(4.0, abs=0.3)  # pitch, in the head's frame
    assert np.abs(errors[1:]).max() < 0.3


def test_weighted_pnp_ignores_points_that_move_with_expression():
    rng = np.random.default_rng(6)
    k = camera.mediapipe_intrinsics(256, 256)
    shape = rng.normal(scale=5, size=(60, 3))
    jaw = shape[:, 1] < -3  # the points an open mouth moves
    poses = np.stack([random_pose(rng, yaw=20) for _ in range(6)])
    opened = shape + np.where(jaw[:, None], [0.0, -1.2, -0.4], 0.0)  # jaw dropped by 1.2 cm
    px = np.stack([camera.project(camera.transform_points(p, opened), k) for p in poses])
    px[:, np.nonzero(~jaw)[0][:3]] += 15.0  # three mistracked rigid points
    start = np.stack([camera.make_pose(np.eye(3), [0, 0, -55])] * len(poses))
    rigid = camera.solve_poses_weighted(shape, px, k, (~jaw).astype(float), start)
    uniform = camera.solve_poses_weighted(shape, px, k, np.ones(60), start)
    rigid_err = max(camera.rotation_angle_deg(a[:3, :3], b[:3, :3]) for a, b in zip(rigid, poses))
    uniform_err = max(camera.rotation_angle_deg(a[:3, :3], b[:3, :3]) for a, b in zip(uniform, poses))
    assert rigid_err < 0.05
    assert uniform_err > 0.5


def test_calibrate_depth_relief_finds_a_flatter_face():
    rng = np.random.default_rng(7)
    k = camera.mediapipe_intrinsics(256, 256)
    shape = rng.normal(scale=[5, 6, 2.5], size=(50, 3))
    weights = np.ones(50)
    flat = camera.scale_depth(shape, 0.8, weights)  # what the landmarks show
    poses = np.stack([random_pose(rng, yaw=25) for _ in range(30)])
    px = np.stack([camera.project(camera.transform_points(p, flat), k) for p in poses])
    start = np.stack([camera.make_pose(np.eye(3), [0, 0, -60])] * len(poses))
    assert camera.calibrate_depth_relief(shape, px, start, k, weights) == pytest.approx(0.8, abs=0.02)


def test_blend_rotations_takes_the_midpoint_in_the_first_trackers_frame():
    rng = np.random.default_rng(8)
    primary = np.stack([camera.euler_to_matrix(*rng.uniform(-30, 30, 3)) for _ in range(20)])
    nods = np.where(np.arange(20) % 2, 4.0, -4.0)  # the other tracker nods ±4° more, in its own frame
    offset = camera.euler_to_matrix(10, 5, -3)
    other = np.stack([r @ camera.euler_to_matrix(0, n, 0) for r, n in zip(primary, nods)]) @ offset
    mid = camera.blend_rotations(primary, other, 0.5)
    errors = camera.head_rotation_errors(mid, primary)  # mid against primary, both in primary's frame
    np.testing.assert_allclose(errors[:, 0], nods / 2, atol=0.05)
    np.testing.assert_allclose(camera.blend_rotations(primary, other, 0.0), primary, atol=1e-9)


def test_weighted_pnp_can_keep_the_rotation():
    rng = np.random.default_rng(9)
    k = camera.mediapipe_intrinsics(256, 256)
    shape = rng.normal(scale=5, size=(40, 3))
    poses = np.stack([random_pose(rng) for _ in range(4)])
    px = np.stack([camera.project(camera.transform_points(p, shape), k) for p in poses])
    start = poses.copy()
    start[:, :3, :3] = start[:, :3, :3] @ camera.euler_to_matrix(3, 0, 0)  # a rotation we are told to keep
    start[:, :3, 3] += [1.0, -1.0, 4.0]
    est = camera.solve_poses_weighted(shape, px, k, np.ones(40), start, fix_rotation=True)
    np.testing.assert_allclose(est[:, :3, :3], start[:, :3, :3], atol=1e-12)
    np.testing.assert_allclose(est[:, :3, 3], poses[:, :3, 3], atol=0.5)  # translation found again
