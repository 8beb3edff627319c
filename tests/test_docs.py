"""The documentation cannot lie about the command line: every shell command in README.md and
docs/*.md that runs a project script names a script that exists and flags that its --help lists;
`make` targets and requirement files exist; and the extraction and matching commands, which the
tests' tiny data can run, are run as written (placeholders replaced by tiny images and a tiny model).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from PIL import Image

from tests.utils import photo, save_keypoint_checkpoint, script_env
from train.runtime import PROJECT_ROOT, repo_dir

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
PYTHONS = {"python", "python3", ".venv/bin/python", "$(PY)"}
RUNNABLE = {"extract/extractor.py", "extract/matcher.py"}  # what the tiny data can run


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written, the folder it runs in, its words."""

    doc: Path
    line: int
    cwd: Path
    words: tuple[str, ...]

    @property
    def script(self) -> Path | None:
        """The project script it runs (python X.py, torchrun ... X.py), relative to the root."""
        if not self.words or not ({self.words[0]} & PYTHONS or self.words[0] == "torchrun"):
            return None
        first = next((w for w in self.words if w.endswith(".py")), None)
        return None if first is None else (self.cwd / first).resolve().relative_to(PROJECT_ROOT)

    def __str__(self) -> str:
        return f"{self.doc.relative_to(PROJECT_ROOT)}:{self.line}: {' '.join(self.words)}"


def shell_blocks(doc: Path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each ```shell / ```bash / ```sh block of a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if current is None and re.match(r"^```(shell|bash|sh)\s*$", line):
            current, start = [], number + 1
        elif current is not None and line.startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def documented_commands() -> list[Command]:
    """Every command of every shell block, continuation lines joined, split at && and ;, with
    the block's `cd` folder."""
    commands = []
    for doc in DOCS:
        for start, lines in shell_blocks(doc):
            cwd, joined, first = PROJECT_ROOT, "", None
            for offset, line in enumerate(lines):
                first = start + offset if not joined else first
                joined += line.rstrip("\\").rstrip() + " "
                if line.rstrip().endswith("\\"):
                    continue
                # placeholders (<path to train data>) as one word: their text may hold quotes
                joined = re.sub(r"<([^<>]*)>", lambda m: "@" + re.sub(r"\W", "_", m.group(1)) + "@", joined)
                lexer = shlex.shlex(joined, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                parts: list[list[str]] = [[]]
                for token in lexer:
                    if token in ("&&", ";", "|", "||", ">", ">>"):
                        parts.append([])
                    else:
                        parts[-1].append(re.sub(r"@(\w+)@", r"<\1>", token))
                for words in parts:
                    if words[:1] == ["cd"] and len(words) > 1 and (cwd / words[1]).is_dir():
                        cwd = (cwd / words[1]).resolve()
                    elif words:
                        commands.append(Command(doc, first, cwd, tuple(words)))
                joined = ""
    return commands


@cache
def help_flags(script: Path) -> frozenset[str]:
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / script), "--help"], capture_output=True, text=True,
                            timeout=300, env=script_env(), cwd=PROJECT_ROOT)
    assert result.returncode == 0, f"{script} --help failed: {result.stderr[-500:]}"
    return frozenset(re.findall(r"--[A-Za-z0-9_][\w-]*", result.stdout))


COMMANDS = documented_commands()
SCRIPTED = [c for c in COMMANDS if c.script is not None]


def test_the_docs_hold_commands() -> None:
    """The parser finds the documented commands (a broken parser would make the checks vacuous)."""
    scripts = {str(c.script) for c in SCRIPTED}
    assert {"train/main.py", "extract/extractor.py", "extract/matcher.py", "extract/evaluate.py",
            "extract/convert_official.py"} <= scripts
    assert len(SCRIPTED) >= 15


@pytest.mark.parametrize("command", SCRIPTED, ids=str)
def test_documented_script_exists_and_takes_its_flags(command: Command) -> None:
    script = command.script
    assert (PROJECT_ROOT / script).is_file(), f"{command}: no such script {script}"
    after_script = command.words[command.words.index(next(w for w in command.words if w.endswith(".py"))) + 1:]
    flags = {w.split("=")[0] for w in after_script if w.startswith("--")}  # torchrun's own flags come before
    unknown = sorted(flags - help_flags(script))
    assert not unknown, f"{command}: {script} --help does not list {', '.join(unknown)}"


def test_documented_make_targets_and_requirement_files_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (PROJECT_ROOT / "Makefile").read_text(), re.M))
    for command in COMMANDS:
        if command.words[0] == "make":
            for target in (w for w in command.words[1:] if not w.startswith("-") and "=" not in w):
                assert target in targets, f"{command}: no make target {target}"
        if command.words[:2] in (["pip", "install"], ["python", "-m"]) and "-r" in command.words:
            requirement = command.words[command.words.index("-r") + 1]
            assert (PROJECT_ROOT / requirement).is_file(), f"{command}: no file {requirement}"


@pytest.mark.slow
def test_documented_extraction_and_matching_commands_run(tmp_path: Path) -> None:
    """The extractor and matcher commands of the docs, in order, with tiny data: each <...>
    placeholder is a folder of two photos, each .jpg argument one of them, each --load_expr a random
    resnet18 model; commands that read what an earlier documented step wrote elsewhere (``repo/...``)
    are left to the flag check. A command written in two documents (the README's front page and its
    workflow document) runs once: a second run would meet the first's output, as a user's would."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "chelsea"):
        Image.fromarray(photo(name, 160)).save(images / f"{name}.jpg")
    ran, seen = 0, set()
    for command in (c for c in SCRIPTED if str(c.script) in RUNNABLE):
        if (command.cwd, command.words) in seen:
            continue
        seen.add((command.cwd, command.words))
        words = ["docs" if w == "<expr>" else w for w in command.words]
        words = [str(images) if re.fullmatch(r"<[^>]+>", w) else w for w in words]
        words = [str(images / ("astronaut.jpg" if w == "a.jpg" else "chelsea.jpg")) if w in ("a.jpg", "b.jpg")
                 else w for w in words]
        if "--output" in words:  # (before the next check: an output under repo/ goes to tmp_path too)
            words[words.index("--output") + 1] = str(tmp_path / words[words.index("--output") + 1])
        if any(w.startswith(("repo/", "cls/")) for w in words):
            continue
        argv = [sys.executable if w in PYTHONS else w for w in words] + ["--attn_thres", "0"]  # random attention
        if "--load_expr" in words:
            expr = words[words.index("--load_expr") + 1]
            if not (repo_dir() / expr / "keypoint" / "ckpt" / "fix.pth.tar").exists():
                save_keypoint_checkpoint(repo_dir() / expr / "keypoint" / "ckpt" / "fix.pth.tar")
            pca_mode = "--mode" in words and words[words.index("--mode") + 1] == "pca"
            if not pca_mode and not (repo_dir() / expr / "pca" / "pca.h5").exists():  # as the docs' earlier step
                fit = [sys.executable, str(PROJECT_ROOT / "extract" / "extractor.py"), "--load_expr", expr, "--mode",
                       "pca", "--input_path", str(images), "--attn_thres", "0"]
                assert subprocess.run(fit, capture_output=True, timeout=600, env=script_env()).returncode == 0
        result = subprocess.run(argv, cwd=command.cwd, capture_output=True, text=True, timeout=600, env=script_env())
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        ran += 1
    assert ran >= 4


def python_blocks(doc: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each ```python block of a Markdown file."""
    return [(doc.read_text()[:m.start()].count("\n") + 2, m[1])
            for m in re.finditer(r"^```python\n(.*?)^```", doc.read_text(), re.S | re.M)]


def test_documented_python_imports_exist() -> None:
    """Every name a ```python block of the docs imports from the project is defined where it says."""
    import ast
    import importlib

    checked = 0
    for doc in DOCS:
        for line, text in python_blocks(doc):
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("extract", "train"):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"{doc.name}:{line}: {node.module} has no {alias.name}"
                        checked += 1
    assert checked >= 10
