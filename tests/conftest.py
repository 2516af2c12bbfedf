import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# This checkout first on the path of every script the tests start: an editable install (pip install -e .) of
# another checkout would otherwise win, and tests/mutations.py's broken copies would run the unbroken code.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a repo script the way users do (``python trainer/x.py …`` from the repo root)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="session")
def subject(tmp_path_factory) -> Path:
    """A short synthetic talking-head subject (48 frames, 128²) shared by the tests."""
    from trainer.synth import SynthConfig, make_subject

    out = tmp_path_factory.mktemp("synth") / "subject"
    make_subject(SynthConfig(out=str(out), frames=48, size=128, novel=6, seed=3))
    return out


@pytest.fixture(scope="session")
def dataset64(subject, tmp_path_factory) -> Path:
    """The synthetic subject prepared at 64² (with its true background plate)."""
    from avatar.data.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("data") / "d64"
    prepare_dataset(PrepareConfig(video=str(subject / "video.mp4"), out=str(out), size=64,
                                  background=str(subject / "background.png")), progress=False, log=lambda s: None)
    return out


TINY_FIT = ["--field", "nerface", "--width", "32", "--rays-per-step", "64", "--coarse-samples", "8", "--fine-samples", "8"]


@pytest.fixture(scope="session")
def fast_bundle(dataset64, tmp_path_factory) -> Path:
    """A fast-field avatar trained briefly on the 64² subject (shared by the fit, export and live tests)."""
    out = tmp_path_factory.mktemp("fast") / "avatar"
    r = run_script("trainer/fit.py", "--data", str(dataset64), "--field", "fast", "--preset", "smoke",
                   "--max-steps", "200", "--eval-frames", "3", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def linear_density_bundle(dataset64, tmp_path_factory) -> Path:
    """A deferred-shading avatar with a linear density head (--density-hidden 0), trained briefly on the 64²
    subject, its bundle grid refined to 128³ (the smoke preset keeps 64³): the fused engine marches it in one pass
    per ray through both levels of the grid."""
    out = tmp_path_factory.mktemp("linear") / "avatar"
    r = run_script("trainer/fit.py", "--data", str(dataset64), "--field", "fast", "--preset", "smoke", "--shading",
                   "deferred", "--density-hidden", "0", "--bundle-occupancy-resolution", "128", "--max-steps", "200",
                   "--eval-frames", "2", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def deferred_bundle(dataset64, tmp_path_factory) -> Path:
    """A deferred-shading fast-field avatar (--shading deferred) trained briefly on the 64² subject."""
    out = tmp_path_factory.mktemp("deferred") / "avatar"
    r = run_script("trainer/fit.py", "--data", str(dataset64), "--field", "fast", "--preset", "smoke", "--shading",
                   "deferred", "--max-steps", "200", "--eval-frames", "2", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out
