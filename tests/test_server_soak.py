"""bench/server_soak.py with tiny bounds: viewers, churn and junk against `run_live.py --sink webrtc`."""

import json

from tests.conftest import run_script


def test_server_soak_passes_with_tiny_bounds(fast_bundle, subject, tmp_path):
    out = tmp_path / "soak.json"
    r = run_script("bench/server_soak.py", "--bundle", str(fast_bundle), "--source", str(subject / "video.mp4"),
                   "--minutes", "0.15", "--viewers", "2", "--cycles", "5", "--junk", "300", "--warm-up", "3",
                   "--json", str(out),
                   timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "| measure | value |" in r.stdout and "| server errors (5xx + connection failures) | 0 |" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "PASS"
    figures = json.loads(out.read_text())
    assert figures["junk"]["requests"] == 300 and figures["junk"]["server_errors"] == 0
    assert figures["peers_end"] == 0 and figures["load"]["cycles_ok"] == 5
    assert all(v["frames"] > 0 for v in figures["load"]["viewers"])
    assert figures["exit_code"] == 0  # the server stopped on SIGTERM
