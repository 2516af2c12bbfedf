"""The live app: frame sources and tracking around ``LivePipeline.step(frame) -> frame`` (track → filter → retarget
→ render → compose, :mod:`.pipeline`), the sinks (file, virtual camera, window: :mod:`.sinks`; WebRTC server and
page: :mod:`.webrtc`), the command (:mod:`.app`) and the one-command workflow (:mod:`.workflow`).
May import :mod:`avatar`; never another app (the workflow runs the trainer and exporter as child processes)."""
