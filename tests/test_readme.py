"""The README's commands must keep working: every `python script …` line names a script that exists and
options that script accepts; the cheap ones (the --help pages, the demo recording to a file) really run."""

import re
import shlex
from functools import lru_cache

import pytest

from tests.conftest import ROOT, run_script

README = (ROOT / "README.md").read_text()
DEMO = ROOT / "assets" / "demo" / "avatar" / "avatar.json"


def readme_commands() -> list[str]:
    """Shell lines from the README's ```bash blocks (comments stripped, continuation lines joined)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def python_commands() -> list[list[str]]:
    out = []
    for line in readme_commands():
        for part in line.split("&&"):
            words = shlex.split(part.strip())
            if "torchrun" in words[:1]:
                words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
            if len(words) >= 2 and words[0] in ("python", "python3") and words[1].endswith(".py"):
                out.append(words[1:])
    return out


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    r = run_script(script, "--help", timeout=120)
    assert r.returncode == 0, f"{script} --help failed: {r.stderr[-1000:]}"
    return r.stdout


def test_readme_has_install_run_and_test_commands():
    cmds = readme_commands()
    assert any("pip install torch==2.13.0" in c for c in cmds)
    assert any("run_live.py --demo" in c for c in cmds)
    assert any("pytest" in c for c in cmds)


@pytest.mark.parametrize("words", python_commands(), ids=lambda w: " ".join(w)[:60])
def test_readme_command_names_a_real_script_and_real_options(words):
    script = words[0]
    assert (ROOT / script).is_file(), f"README runs {script}, which does not exist"
    text = help_text(script)
    for w in words[1:]:
        if w.startswith("--"):
            option = w.split("=")[0]
            assert option in text, f"README passes {option} to {script}, which does not accept it"


def test_readme_demo_recording_runs(tmp_path):
    if not DEMO.is_file():
        pytest.skip("no bundled demo avatar (python trainer/make_demo.py builds it)")
    line = next(c for c in readme_commands() if "--demo" in c and "--sink file:" in c)
    words = shlex.split(line)[1:]
    words = [f"file:{tmp_path / 'demo.mp4'}" if w.startswith("file:") else w for w in words]
    r = run_script(*words, "--quiet", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from avatar.capture.video import iter_frames

    frames = list(iter_frames(tmp_path / "demo.mp4"))
    n = int(words[words.index("--max-frames") + 1])
    assert len(frames) == n and frames[0].std() > 5
