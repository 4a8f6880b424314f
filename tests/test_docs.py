"""Docs that cannot rot: every `pixart ...` command that README.md or docs/ names answers --help and
takes the flags they give it, and every relative link points at a file that exists."""
import argparse
import re
from pathlib import Path

import pytest

from pixart.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = re.compile(r"```(.*?)```|`([^`\n]+)`", re.S)
COMMAND = re.compile(r"(?:^|[\s(])pixart ([a-z][\w-]*)(?: ([a-z][\w-]*))?", re.M)
INVOCATION = re.compile(r"(?:^|[\s(])pixart ([a-z][\w-]*)(?: ([a-z][\w-]*))?([^\n]*)", re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def named_commands() -> list[tuple[str, ...]]:
    """(command,) or (group, job) for each `pixart ...` inside code in the pages."""
    groups = {"data"}  # commands whose first argument is a sub-command
    found = set()
    for page in PAGES:
        for block, span in CODE.findall(page.read_text()):
            for first, second in COMMAND.findall(block or span):
                found.add((first, second) if first in groups and second else (first,))
    return sorted(found)


def test_the_pages_exist_and_name_commands():
    assert all(p.is_file() for p in PAGES) and len(PAGES) >= 12
    assert {("train",), ("launch",), ("relabel",), ("export-diffusers",), ("demo",), ("data", "shapes")} <= set(
        named_commands())


@pytest.mark.parametrize("command", named_commands(), ids=" ".join)
def test_every_named_command_answers_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0, f"`pixart {' '.join(command)} --help` failed: {capsys.readouterr().err}"
    assert capsys.readouterr().out.startswith(f"usage: pixart {' '.join(command)}")


def test_every_command_is_documented():
    subcommands = build_parser()._subparsers._group_actions[0].choices
    named = {c[0] for c in named_commands()}
    assert set(subcommands) - named == set()


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices.get(name) if actions else None


def test_every_flag_the_pages_give_a_command_exists():
    """`pixart sample ... --guidance 4.5` on a page: `sample` has --guidance. A renamed flag left in the docs
    would fail a user's first copy-paste."""
    unknown, checked = [], 0
    for page in PAGES:
        for block, span in CODE.findall(page.read_text()):
            for first, second, rest in INVOCATION.findall(re.sub(r"\\\n\s*", " ", block or span)):
                parser = _subparser(build_parser(), first)
                if parser is None:
                    continue  # "pixart demo's report": prose, not a command
                job = _subparser(parser, second) if second else None
                parser, rest = (job, rest) if job else (parser, f"{second} {rest}")
                rest = re.split(r"\s(?:&&|\||;)\s|\bpixart\b", rest)[0]  # up to the next command
                options = {o for a in parser._actions for o in a.option_strings}
                checked += 1
                unknown += [f"{page.name}: pixart {first} {f}" for f in re.findall(r"(?<!\S)(--[a-z][\w-]*)", rest)
                            if f not in options]
    assert checked > 100 and unknown == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        if not (page.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert broken == [], f"{page.name}: links to missing files"
