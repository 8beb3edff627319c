"""The code layout: docs/layout.md names every module, extract/ is grouped by concern, and no
module imports a script."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train.runtime import PROJECT_ROOT

PACKAGES = ("train", "extract")
SCRIPTS = {"train/main.py", "extract/extractor.py", "extract/matcher.py", "extract/evaluate.py",
           "extract/convert_official.py", "extract/demo.py", "extract/download.py", "extract/reproduce.py"}
HEAVY = ("torch", "torchvision", "h5py", "faiss", "matplotlib", "cv2", "sklearn", "PIL", "tensorflow")


def modules() -> set[str]:
    return {p.relative_to(PROJECT_ROOT).as_posix() for pkg in PACKAGES for p in (PROJECT_ROOT / pkg).rglob("*.py")}


def layout_files(text: str) -> set[str]:
    """The .py paths of docs/layout.md's tree: an entry's folder is the nearest less-indented
    ``name/`` line above it."""
    block = re.search(r"^```\n(.*?)^```", text, re.S | re.M)
    assert block is not None, "docs/layout.md has no code block"
    stack: list[tuple[int, str]] = []
    found = set()
    for line in block[1].splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if name.endswith("/"):
            stack.append((indent, name))
        elif name.endswith(".py"):
            found.add("".join(d for _, d in stack) + name)
    return found


def test_layout_parser_reads_nesting() -> None:
    text = "```\na/\n  b.py    x\n  c/\n    d.py  y\n  e.py\nf.py\n```\n"
    assert layout_files(text) == {"a/b.py", "a/c/d.py", "a/e.py", "f.py"}


def test_layout_lists_every_module_and_no_other() -> None:
    listed = layout_files((PROJECT_ROOT / "docs" / "layout.md").read_text())
    assert sorted(modules() - listed) == [], "missing from docs/layout.md"
    assert sorted(listed - modules()) == [], "listed in docs/layout.md but gone"


def test_layout_has_one_code_block() -> None:
    """A doubled fence renders the tree as prose."""
    text = (PROJECT_ROOT / "docs" / "layout.md").read_text()
    assert text.count("```") == 2
    assert "```\n```" not in text


def test_extract_top_level_is_scripts_and_basics() -> None:
    top = sorted(p.name for p in (PROJECT_ROOT / "extract").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 10, top
    assert {Path(s).name for s in SCRIPTS if s.startswith("extract/")} <= set(top)


def test_extract_module_names_are_unique() -> None:
    """No two modules of extract/ share a file name (the package tells them apart only in full)."""
    names = [Path(m).name for m in modules() if m.startswith("extract/") and not m.endswith("__init__.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:   # relative, within train/
                base = ".".join([*path.relative_to(PROJECT_ROOT).parts[:-1], node.module])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_module_imports_a_script() -> None:
    scripts = {s[:-3].replace("/", ".") for s in SCRIPTS}
    offenders = {m: sorted(imported_modules(PROJECT_ROOT / m) & scripts) for m in modules()}
    assert {m: s for m, s in offenders.items() if s} == {}


def test_scripts_are_thin() -> None:
    """A script parses flags, makes a config, calls the library and prints: it defines no class
    that a Python user would need (results, indexes, datasets)."""
    for script in SCRIPTS:
        tree = ast.parse((PROJECT_ROOT / script).read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        assert len(classes) <= 1, (script, classes)   # at most the CLI's own outcome record


def test_shared_io_has_one_home() -> None:
    """Atomic writes and output locks are train/outputs.py's, for train/ and extract/ alike."""
    defined = {}
    for m in modules():
        for node in ast.parse((PROJECT_ROOT / m).read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in ("atomic_path", "OutputLock",
                                                                                  "file_sha256"):
                defined.setdefault(node.name, []).append(m)
    assert defined == {n: ["train/outputs.py"] for n in ("atomic_path", "OutputLock", "file_sha256")}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("argv", [["--help"], ["--no_such_flag"]])
def test_help_and_a_bad_flag_import_no_heavy_module(script: str, argv: list[str]) -> None:
    """A script parses its flags before importing torch (and the rest of the heavy stack): --help and
    a mistyped flag answer at once, in a few MB."""
    code = ("import json, runpy, sys\n"
            f"sys.argv = [{script!r}, *{argv!r}]\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    status = e.code\n"
            f"print(json.dumps([status, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    status, heavy = json.loads(done.stdout.splitlines()[-1])
    assert (status, heavy) == (0 if argv == ["--help"] else 2, []), done.stderr[-2000:]
