"""The command line's front door: the command listing, every command's --help, `list`, --version."""
import argparse
import importlib
import re

import pytest

from bench.cli import COMMANDS, PROG, describe, main, version


def call(argv: list[str]) -> int:
    """main(argv)'s exit code, whether it returns it or argparse exits (--help, --version)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code or 0


def flat(text: str) -> str:
    return " ".join(text.split())


def command_parser(name: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"bench.cli.{COMMANDS[name].module}").parser()


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_no_command_lists_the_commands(argv, capsys):
    assert call(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG}")
    for name, command in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(command.help)}$", out, re.M), name
    same = [line.index("= `") for line in out.splitlines() if "= `" in line]
    assert len(same) == 2 and same[0] == same[1]  # the equivalent command lines line up


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_exits_0_writes_nothing_and_describes(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert call([name, "--help"]) == 0
    assert list(tmp_path.iterdir()) == []
    out = flat(capsys.readouterr().out)
    assert out.startswith(f"usage: {PROG} {name}")
    assert describe(name)[:-1] in out  # its line in the listing, as the description
    for action in command_parser(name)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and flat(action.help) in out.replace("%%", "%"), action.dest


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_flag_states_its_default_once(name):
    for action in command_parser(name)._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        said = action.help.lower().count("default")
        if action.required:
            assert said == 0 and "required" in action.help, action.dest
        else:
            assert said == 1, (action.dest, action.help)
            if action.default not in (None, "") and "(default: " + str(action.default) in action.help:
                continue
            # a default explained in words (e.g. "the model's") is the field's None (or empty) default
            assert action.default in (None, "") or isinstance(action.default, bool), (action.dest, action.help)


def test_serve_help_shows_only_what_a_server_uses(capsys):
    assert call(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--num-runs", "--warmup", "--batch-size", "--output-dir", "--fidelity", "--wide", "--text-prompt"):
        assert flag not in out, flag
    assert "stopped (Ctrl-C or SIGTERM)" in out and "runs.csv" not in out  # its own exit codes, not run's


def test_run_help_lists_every_registered_name():
    from bench.models.presets import PRESETS
    from bench.models.templates import TEMPLATES
    from variants import registry

    helps = {a.dest: a.help for a in command_parser("run")._actions}
    assert all(re.search(rf"\b{re.escape(p)}\b", helps["preset"]) for p in PRESETS)
    assert all(re.search(rf"(?<![\w-]){re.escape(t)}(?![\w-])", helps["conv_mode"]) for t in TEMPLATES)
    for name, part in registry().items():
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", helps["variants"]), name
        if part.kind == "engine":
            assert name in helps["engine"]


def test_list_shows_every_registry_entry(capsys):
    from bench.models.presets import PRESETS
    from bench.models.registry import families
    from bench.models.templates import TEMPLATES
    from variants import registry

    assert call(["list"]) == 0
    words = set(capsys.readouterr().out.split())
    for name in [*PRESETS, *registry(), *TEMPLATES, *families()]:
        assert name in words, name
    for part in registry().values():  # with its description
        assert part.description.split()[0] in words


def test_int4_kernels_lists_every_kernel_once_per_row(capsys, monkeypatch, tmp_path):
    from bench.quant.w4a16.registry import KERNELS

    monkeypatch.setenv("HOME", str(tmp_path))  # no measurements file yet
    assert call(["int4-kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("int4 kernels (") and "torch." not in lines[0]
    for name in KERNELS:  # the row names its kernel once, the reason it cannot run here does not repeat it
        row = next(line for line in lines if line.split()[:1] == [name])
        assert row.split().count(name) == 1, row


def test_unknown_command_is_one_line_naming_the_commands(capsys):
    assert call(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'nonsense'" in err
    assert all(name in err for name in COMMANDS)


@pytest.mark.parametrize("argv", [["--bogus-flag"], ["compare"], ["summarize", "a", "b"], ["list", "--x"]])
def test_bad_command_line_is_one_line_exit_2(argv, capsys):
    assert call(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "--help" in err


def test_variant_error_names_only_listed_parts(capsys):
    assert call(["list"]) == 0
    listed = set(capsys.readouterr().out.split())
    assert call(["--variants", "fp16+turbo"]) == 2
    err = capsys.readouterr().err
    named = re.findall(r"[\w-]+", err.split("parts:", 1)[1].split("(")[0])
    kinds = {"weights", "cache", "engine"}
    assert named and all(n in listed for n in named if n not in kinds)


def test_version(capsys):
    from importlib.metadata import version as installed

    assert call(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"{PROG} {version()}" and version() == installed("vlm-bench")
