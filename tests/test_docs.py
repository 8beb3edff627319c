"""The documentation cannot lie about the command line: every shell command in README.md and
docs/*.md that runs a project script names a script that exists, flags that its argument parser
defines (its actions' option strings, not words of its --help, which holds docstrings) and, for a
flag with choices, a value among them; `make` targets and requirement files exist; and the
extraction and matching commands, which the tests' tiny data can run, are run as written
(placeholders replaced by tiny images and a tiny model).
"""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from unittest import mock

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


PARSER_MODULES = {"train/main.py": "train.config"}  # scripts whose parser another module builds


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


@cache
def script_parser(script: Path) -> argparse.ArgumentParser | None:
    """The argument parser of a project script: ``build_parser()`` of its module (or of
    PARSER_MODULES'); for a script without one (the benchmarks), the parser its ``main()`` builds,
    caught at its first parse; None for a script that builds none (it takes no flags)."""
    module = importlib.import_module(PARSER_MODULES.get(str(script), ".".join(script.with_suffix("").parts)))
    if hasattr(module, "build_parser"):
        return module.build_parser()
    if "ArgumentParser" not in (PROJECT_ROOT / script).read_text():
        return None

    def caught(parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", caught), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", caught):
        try:
            module.main()
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{script}: main() returned without parsing its arguments")


def _is_flag(word: str) -> bool:
    return word.startswith("--") and len(word) > 2


def _value_given(word: str) -> bool:
    """Whether a documented value is a literal (not a placeholder, a variable or an ellipsis)."""
    return not (re.fullmatch(r"<[^<>]*>", word) or word.startswith("$") or word in ("...", "…"))


def command_problems(command: Command) -> list[str]:
    """What is wrong with a documented command's flags: flags its script's parser does not define
    (exact names: argparse's abbreviations are not documentation), and values of flags with
    ``choices`` that are not among them (converted by the flag's type first)."""
    script = command.script
    first = next(w for w in command.words if w.endswith(".py"))
    words = list(command.words[command.words.index(first) + 1:])  # torchrun's own flags come before
    parser = script_parser(script)
    actions = {} if parser is None else {o: a for a in parser._actions for o in a.option_strings}  # noqa: SLF001
    problems = []
    for index, word in enumerate(words):
        if not _is_flag(word):
            continue
        flag, has_value, value = word.partition("=")
        action = actions.get(flag)
        if action is None:
            problems.append(f"{script} has no flag {flag}")
            continue
        if not action.choices:
            continue
        if has_value:
            values = [value]
        else:
            values = []
            for following in words[index + 1:]:
                if _is_flag(following) or (action.nargs in (None, "?") and values):
                    break
                values.append(following)
        for value in filter(_value_given, values):
            try:
                typed = action.type(value) if callable(action.type) else value
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                problems.append(f"{flag} {value}: {e}")
                continue
            if typed not in action.choices:
                problems.append(f"{flag} {value}: not one of {', '.join(map(str, action.choices))}")
    return problems


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
    assert (PROJECT_ROOT / command.script).is_file(), f"{command}: no such script {command.script}"
    problems = command_problems(command)
    assert not problems, f"{command}: {'; '.join(problems)}"


def test_the_flag_check_finds_what_is_wrong() -> None:
    """The check itself, on made-up commands: a flag that no parser defines (one that extractor.py's
    --help names in its docstring, torchrun's, included), values outside the choices (space- or
    =-separated, after a type conversion), and nothing on good commands."""
    def problems(*words: str) -> list[str]:
        return command_problems(Command(PROJECT_ROOT / "README.md", 1, PROJECT_ROOT, ("python", *words)))

    assert problems("extract/extractor.py", "--mode", "pca", "--input_path", "<images>", "--use_pca", "false") == []
    assert problems("extract/extractor.py", "--nproc_per_node", "2") == [
        "extract/extractor.py has no flag --nproc_per_node"]
    assert problems("extract/extractor.py", "--made_up_flag", "--mode", "pcaa") == [
        "extract/extractor.py has no flag --made_up_flag", "--mode pcaa: not one of pca, delf"]
    assert problems("extract/evaluate.py", "--dataset", "roxford5k", "--method=asmk") == []
    assert problems("extract/evaluate.py", "--dataset", "roxford6k", "--method=asmkk") == [
        "--dataset roxford6k: not one of roxford5k, rparis6k",
        "--method asmkk: not one of asmk, vote, global, global+sp"]
    assert problems("extract/convert_official.py", "--release", "delf_v2") == [
        "--release delf_v2: not one of delf_v1_20171026, delf_gld_20190411"]
    assert problems("extract/convert_official.py", "--release", "<name>") == []  # a placeholder is not checked
    assert problems("train/main.py", "--arch", "resnet99")[0].startswith("--arch resnet99: ")
    assert problems("tests/bench/bench_train.py", "--size", "96", "--made_up") == [
        "tests/bench/bench_train.py has no flag --made_up"]
    assert problems("tests/bench/bench_match.py", "--size", "1") == ["tests/bench/bench_match.py has no flag --size"]


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


def test_documented_outputs_stay_out_of_the_project_root() -> None:
    """A documented command writes under repo/ (git-ignored), a named temporary folder or a
    placeholder the user fills, never into the project's own folders."""
    written = []
    for command in SCRIPTED:
        for flag, value in zip(command.words, command.words[1:]):
            if flag in ("--output", "--figures", "--output_path", "--output_dir"):
                written.append((command, value))
    assert len(written) >= 10
    bad = [f"{c}: {v}" for c, v in written if not v.startswith(("repo/", "/tmp/", "<", "$"))]
    assert bad == []
