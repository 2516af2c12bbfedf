"""Getting a face in: frame sources (webcam, video file; :mod:`.sources`), streamed video I/O (:mod:`.video`),
MediaPipe tracking and the blendshape names (:mod:`.tracking`), camera and face-shape fit (:mod:`.camera`),
and mapping one tracked face onto another's conditioning (:mod:`.retarget`).

May import :mod:`avatar.base`, numpy, opencv, PyAV and MediaPipe.
"""
