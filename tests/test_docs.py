"""The README and docs/ hold together: links resolve, the README is short, its commands are CI's.

A relative link must name a file of the repository, and its ``#anchor`` a heading of that file
(GitHub's heading ids). Links to other sites are not followed: the tests run offline.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+).+?\1")
# [text](target) and ![alt](target), with an optional "title"; a target may sit in <...>.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def _outside_fences(text: str) -> list[str]:
    """The lines of ``text`` outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def heading_id(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The ids of the headings of ``page``; a repeated heading gets ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for line in _outside_fences(page.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if match:
            base = heading_id(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            ids.add(base if count == 0 else f"{base}-{count}")
    return ids


def broken_links(page: Path, root: Path) -> list[str]:
    """Each relative link of ``page`` whose file (inside ``root``) or heading does not exist."""
    broken = []
    for line in _outside_fences(page.read_text(encoding="utf-8")):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if not target or _SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_relative_to(root.resolve()) or not file.exists():
                broken.append(f"{target}: no file {file}")
            elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
                broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page, ROOT) == []


def test_the_checker_finds_broken_links_and_ignores_code_and_other_sites(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text(
        "# Other page\n\n## GPUs, several devices: `ddp_spawn`\n\n## Setup\n\n## Setup\n"
    )
    (tmp_path / "data.txt").write_text("x")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## A section\n\n"
        "Good: [other](other.md), [up](../data.txt), [here](#a-section),\n"
        '[titled](../data.txt "t"), ![image](../data.txt),\n'
        "[gpus](other.md#gpus-several-devices-ddp_spawn), [second](other.md#setup-1),\n"
        "[site](https://example.com/missing.md), [mail](mailto:a@b.c).\n"
        "Bad: [gone](missing.md), [anchor](other.md#nowhere), [self](#no-section),\n"
        "[text anchor](../data.txt#x), [outside](../../elsewhere.md), [third](other.md#setup-2).\n"
        "Code is not a link: `[x](nowhere.md)`\n\n```python\nf[0](missing.md)\n```\n"
    )
    found = broken_links(page, tmp_path)
    targets = [entry.partition(":")[0] for entry in found]
    assert targets == [
        "missing.md",
        "other.md#nowhere",
        "#no-section",
        "../data.txt#x",
        "../../elsewhere.md",
        "other.md#setup-2",
    ]


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Quick start 2: plain PyTorch", "quick-start-2-plain-pytorch"),
        ("The callback: `NAMCallback`", "the-callback-namcallback"),
        (
            "Checkpoints: `load_checkpoint`, `save_pruned`",
            "checkpoints-load_checkpoint-save_pruned",
        ),
        ("Command line (`nam-lightning`)", "command-line-nam-lightning"),
        (
            "What plain `load_state_dict` and `load_from_checkpoint` do",
            "what-plain-load_state_dict-and-load_from_checkpoint-do",
        ),
        ("See [the docs](docs/x.md) now", "see-the-docs-now"),
    ],
)
def test_heading_ids_follow_github(heading: str, expected: str) -> None:
    assert heading_id(heading) == expected


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES


def _readme_command(last_step: str) -> str:
    """The README's one-line install command that ends with ``last_step``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in text.splitlines() if line.endswith(f"&& {last_step}")]
    assert len(commands) == 1, f"README should hold one install command ending in {last_step!r}"
    return commands[0]


def test_readme_installs_and_tests_as_ci_does() -> None:
    """CI (.ci/run) installs with the README's pins and runs the README's test command."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    installs = [
        shlex.split(line) for line in ci if line.startswith("python -m pip install --quiet ")
    ]
    ci_packages = [words[5:] for words in installs if words[5:] != ["--upgrade", "pip"]]
    steps = [shlex.split(step) for step in _readme_command("python -m pytest -q").split("&&")]
    readme_packages = [words[2:] for words in steps if words[:2] == ["pip", "install"]]
    assert readme_packages == ci_packages
    assert ci[-1] == "python -m pytest -q"
    run_steps = [shlex.split(step) for step in _readme_command("nam-lightning run").split("&&")]
    assert run_steps[:-1] == steps[:-1]
