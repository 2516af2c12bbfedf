"""Every command's options come from its config dataclass (avatar/base/cli.py): --help prints the true defaults,
renamed options still parse under their old spelling (with one warning line), bad values are one line and exit
code 2, and the options left out give the dataclass's (or the default preset's) config."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, replace

import pytest

from avatar.base.cli import CLI, cli_fields, config_from_namespace
from tests.conftest import ROOT


@dataclass(frozen=True)
class Command:
    name: str
    script: str
    module: str
    config: str  # the config class's name in the module
    required: tuple[str, ...]  # the least command line that parses
    bad: tuple[str, ...]  # an option with a value of the wrong kind


COMMANDS = (
    Command("record", "trainer/record.py", "trainer.record", "RecordConfig", ("--out", "R"), ("--seconds", "long")),
    Command("synth", "trainer/synth.py", "trainer.synth", "SynthConfig", ("--out", "S"), ("--frames", "many")),
    Command("prepare", "trainer/prepare.py", "trainer.prepare", "PrepareConfig", ("v.mp4", "--out", "D"),
            ("--size", "big")),
    Command("fit", "trainer/fit.py", "trainer.fit", "FitConfig", ("--data", "D", "--out", "A"), ("--preset", "huge")),
    Command("evaluate", "trainer/evaluate.py", "trainer.evaluate", "EvaluateConfig", ("B", "--data", "D"),
            ("--eval-pose-steps", "few")),
    Command("render", "trainer/render.py", "trainer.render", "RenderConfig", ("B", "--out", "x.mp4"),
            ("--render-size", "big")),
    Command("figure", "trainer/figure.py", "trainer.figure", "FigureConfig", ("--target", "T", "--source", "s.mp4"),
            ("--frame-index", "last")),
    Command("make_demo", "trainer/make_demo.py", "trainer.make_demo", "MakeDemoConfig", (), ("--minutes", "ten")),
    Command("export", "export/build.py", "export.build", "ExportConfig", ("B",), ("--build", "everything")),
    Command("live", "run_live.py", "streamer.app", "LiveConfig", ("--target", "T"), ("--render-size", "big")),
)
BY_NAME = {c.name: c for c in COMMANDS}

# One meaning per option name: the spellings that changed, by command (old → new).
RENAMED = {
    "live": {"--size": "--render-size", "--background": "--backdrop", "--preset": "--live-preset"},
    "render": {"--size": "--render-size"},
    "export": {"--size": "--render-size", "--engine": "--build"},
    "figure": {"--size": "--render-size", "--frame": "--frame-index"},
    "evaluate": {"--refine-poses": "--eval-pose-steps"},
}


def module_of(command: Command):
    return importlib.import_module(command.module)


def config_class(command: Command):
    return getattr(module_of(command), command.config)


def default_config(command: Command):
    """What a command line with only the required arguments must give, built without the parser."""
    module, cls = module_of(command), config_class(command)
    if command.name == "fit":
        from avatar.field.training import config_with_preset

        return replace(config_with_preset(cls.preset, cls.field), data="D", out="A")
    if command.name == "live":
        return replace(cls(), **module.PRESETS[cls.preset], target="T")
    positional = {"prepare": dict(video="v.mp4", out="D"), "evaluate": dict(bundle="B", data="D"),
                  "render": dict(bundle="B", out="x.mp4"), "export": dict(bundle="B"),
                  "figure": dict(target="T", source="s.mp4"), "record": dict(out="R"), "synth": dict(out="S")}
    return cls(**positional.get(command.name, {}))


def namespace_config(command: Command, argv):
    """The config a command line gives (fit and live: over the preset it names, as their mains do)."""
    module, cls = module_of(command), config_class(command)
    args = module.build_parser().parse_args(list(argv))
    if command.name == "fit":
        from avatar.field.training import config_with_preset

        return config_from_namespace(cls, args, base=config_with_preset(args.preset or cls.preset,
                                                                         args.field or cls.field))
    if command.name == "live":
        preset = args.preset or cls.preset
        return config_from_namespace(cls, args, base=replace(cls(), **module.PRESETS[preset], preset=preset))
    return config_from_namespace(cls, args)


def as_help_text(value, values=None) -> str:
    """How --help should print a default (written out here, not taken from avatar/base/cli.py)."""
    if values:
        value = next(word for word, v in values.items() if v == value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def help_entries(text: str) -> dict[str, str]:
    """``--flag`` → its help entry (whitespace collapsed) from an argparse --help page."""
    entries, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif current and line.startswith("    "):
            entries[current] += " " + stripped
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata[CLI]["flag"] or "--" + f.name.replace("_", "-")


def true_default(command: Command, cls, f: dataclasses.Field):
    """A field's default as the command applies it: fit's and live's from their default preset."""
    if command.name == "fit":
        from avatar.field.training import config_with_preset

        return getattr(config_with_preset(cls.preset, cls.field), f.name)
    if command.name == "live":
        return module_of(command).PRESETS[cls.preset].get(f.name, getattr(cls(), f.name))
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_help_runs_and_prints_the_true_defaults(command):
    r = subprocess.run([sys.executable, command.script, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr[-2000:]
    entries = help_entries(r.stdout)
    classes = [config_class(command)] + ([module_of(command).PoseTrackingConfig] if command.name == "prepare" else [])
    checked = 0
    for cls in classes:
        for f in cli_fields(cls):
            meta = f.metadata[CLI]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if meta["positional"] or required or meta["kwargs"].get("required"):
                continue
            if command.name == "synth" and f.name in ("frame", "size"):
                continue  # the command line's default is not SynthConfig's: below
            value = true_default(command, cls, f)
            if value is None or value == "":
                continue
            said = re.escape(f"(default: {as_help_text(value, meta['values'])}")
            assert re.search(said + "[) ]", entries[flag_of(f)]), (f.name, entries[flag_of(f)])
            checked += 1
    assert checked >= 3
    for old in RENAMED.get(command.name, {}):
        assert old not in entries, f"{command.script} --help still lists the deprecated {old}"
    if command.name == "synth":  # the command line's own default: camera-shaped frames
        from trainer.synth import DEFAULT_FRAME

        assert f"(default: {DEFAULT_FRAME})" in entries["--frame"]
    if command.name == "fit":  # preset defaults name the preset and give the others'
        from avatar.field.training import config_with_preset

        smoke = config_with_preset("smoke").max_steps
        assert f"with --preset cpu --field fast; paper 30000, smoke {smoke})" in entries["--max-steps"]


def deprecated_aliases():
    out = []
    for command in COMMANDS:
        for f in cli_fields(config_class(command)):
            out += [(command, f, old) for old in f.metadata[CLI]["deprecated"]]
    return out


def sample_value(f: dataclasses.Field) -> list[str]:
    meta, hint = f.metadata[CLI], str(f.type)
    if meta["kwargs"].get("choices"):
        return [meta["kwargs"]["choices"][-1]]
    return ["96"] if "int" in hint else ["3.25"] if "float" in hint else ["somewhere"]


@pytest.mark.parametrize("command,f,old", deprecated_aliases(), ids=lambda x: getattr(x, "name", x))
def test_a_deprecated_spelling_parses_to_the_same_config_and_warns(command, f, old, capsys):
    new = flag_of(f)
    assert RENAMED[command.name][old] == new
    value = sample_value(f)
    capsys.readouterr()
    expected = namespace_config(command, [*command.required, new, *value])
    assert capsys.readouterr().err == ""
    got = namespace_config(command, [*command.required, old, *value])
    assert got == expected and getattr(got, f.name) != getattr(default_config(command), f.name)
    assert capsys.readouterr().err.splitlines() == [f"warning: {old} is deprecated, use {new}"]


def test_every_rename_is_a_deprecated_alias():
    found = {(c.name, old): flag_of(f) for c, f, old in deprecated_aliases()}
    assert found == {(name, old): new for name, renames in RENAMED.items() for old, new in renames.items()}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_a_bad_value_is_one_line_and_exit_code_2(command, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # fit's main sets them first
    try:
        with pytest.raises(SystemExit) as exc:
            module_of(command).main([*command.required, *command.bad])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert command.bad[0] in err[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_options_left_out_give_the_default_config(command):
    assert namespace_config(command, command.required) == default_config(command)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_option_given_reaches_the_config(command):
    """Each option, given a value other than its default, changes that field and no other."""
    base = default_config(command)
    for f in cli_fields(config_class(command)):
        meta = f.metadata[CLI]
        if meta["positional"] or f.name in ("preset", "field"):  # presets change other fields too
            continue
        if meta["values"]:
            word, value = next((w, v) for w, v in meta["values"].items() if v != getattr(base, f.name))
            argv = [flag_of(f), word]
        elif "bool" in str(f.type):
            value = not getattr(base, f.name)
            argv = [("--" if value else "--no-") + flag_of(f)[2:]]
        else:
            argv, value = [flag_of(f), *sample_value(f)], None
        got = namespace_config(command, [*command.required, *argv])
        changed = {k for k in dataclasses.asdict(got) if getattr(got, k) != getattr(base, k)}
        if f.name in ("data", "out", "target", "source", "bundle") and changed == set():
            continue  # the required value given again
        assert changed == {f.name}, (command.name, argv, changed)
        if value is not None:
            assert getattr(got, f.name) == value


def test_presets_then_explicit_options():
    """fit and live: the named preset's values, and an explicit option over them."""
    from avatar.field.training import config_with_preset

    fit = BY_NAME["fit"]
    got = namespace_config(fit, [*fit.required, "--preset", "smoke", "--max-steps", "12"])
    assert got == replace(config_with_preset("smoke"), data="D", out="A", max_steps=12)
    from streamer.app import PRESETS, LiveConfig, build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--target", "T", "--live-preset", "gpu", "--fps", "0"]))
    assert cfg == replace(LiveConfig(), **{**PRESETS["gpu"], "fps": 0.0}, preset="gpu", target="T")


def test_live_sinks_repeat_instead_of_adding_to_the_default():
    from streamer.app import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--target", "T", "--sink", "window", "--sink", "virtualcam"]))
    assert cfg.sinks == ["window", "virtualcam"]
