"""Every `python -m pipeline ...` command that README.md and docs/ show parses as written: the command and its
options exist, `run` and `sweep` name presets, methods and `--set` keys that load. Paths on the reader's machine
are not checked, and usage lines with placeholders (`RUN...`, `[--best]`, `FILE`) are skipped."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from pipeline.cli import cli
from pipeline.config import load_config
from pipeline.distill.catalog import method_names
from pipeline.experiments.grid import parse_axes, split_list

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:python3? |\.venv/bin/python )-m pipeline ([^`\n]*)")
PLACEHOLDER = re.compile(r"\[--|<\w|\.\.\.|\{|[A-Z]{3,}")
# methods that a page defines as an example of extending the pipeline
EXAMPLE_METHODS = {"feature_l2"}


def shown_commands(text: str) -> list[str]:
    """The arguments after ``python -m pipeline`` in fenced blocks, indented blocks and inline code (which may wrap)."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    indented = "\n".join(line for line in prose.splitlines() if line.startswith("    "))
    inline = re.findall(r"`([^`]+)`", re.sub(r"^    .*$", "", prose, flags=re.M))
    found = []
    for block in [*fenced, indented]:
        found += [m.group(1) for m in COMMAND.finditer(re.sub(r"\s*\\\n\s*", " ", block))]
    for span in inline:
        found += [m.group(1) for m in COMMAND.finditer(span.replace("\n", " "))]
    commands = [re.split(r"\s(?:&&|\|\||;|\||>|2>)\s", c)[0] for c in found]  # the pipeline's part of a shell line
    return [c for c in commands if not PLACEHOLDER.search(c)]


def _check(command: str) -> None:
    args = shlex.split(command, comments=True)
    name, rest = args[0], args[1:]
    assert name in cli.commands, f"no command {name!r}"
    try:
        with cli.commands[name].make_context(name, rest) as ctx:
            params = ctx.params
    except click.exceptions.Exit:  # --help, --version
        return
    except click.BadParameter as exc:
        if "does not exist" in str(exc):  # a path on the reader's machine
            return
        raise
    if name not in ("run", "sweep") or params.get("config") or params.get("config_file"):
        return
    presets = [params["preset"]] if params.get("preset") else split_list(list(params.get("presets") or ()))
    sets = list(params.get("overrides") or ())
    if name == "sweep":  # an axis: each of its values must load; the first stands for them
        fixed, axes = parse_axes(sets)
        sets = fixed + [f"{key}={values[0]}" for key, values in axes]
    for preset in presets or ["default"]:
        load_config(preset, None, sets)
    methods = [params["method"]] if params.get("method") else split_list(list(params.get("methods") or ()))
    unknown = set(methods) - set(method_names()) - EXAMPLE_METHODS
    assert not unknown, f"unknown methods {sorted(unknown)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_the_docs_show_parses(page):
    failures = []
    for command in shown_commands(page.read_text()):
        try:
            _check(command)
        except Exception as exc:  # collect them all: a page with several stale commands is fixed in one pass
            failures.append(f"{command}\n    {type(exc).__name__}: {exc}")
    assert not failures, f"{page.name}:\n" + "\n".join(failures)


def test_the_extractor_finds_wrapped_and_indented_commands_and_skips_usage_lines():
    text = (
        "Run `python -m pipeline run teacher --preset\ndefault` first.\n\n"
        "    python -m pipeline sweep --method kd,dkd \\\n        --seed 0,1 --out runs/x\n\n"
        "```bash\npython -m pipeline compare RUN... [--best]\n.venv/bin/python -m pipeline presets && ls\n```\n"
    )
    found = shown_commands(text)
    assert found == ["presets", "sweep --method kd,dkd --seed 0,1 --out runs/x", "run teacher --preset default"]
    with pytest.raises(click.NoSuchOption):
        _check("run all --presets default")
    with pytest.raises(Exception, match="unknown preset"):
        _check("run all --preset nope")
    with pytest.raises(Exception, match="unknown config key"):
        _check("sweep --set student.optim.lrr=0.1,0.2")
