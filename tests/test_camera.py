import numpy as np
import pytest

from avatar import camera


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
