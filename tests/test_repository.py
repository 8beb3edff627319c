"""The repository's own promises: self-contained docs, and requirements that list what is imported."""
from __future__ import annotations

import ast
import re
import sys

from train.runtime import PROJECT_ROOT

# import name -> distribution name, where they differ
DISTRIBUTIONS = {"cv2": "opencv-python-headless", "PIL": "Pillow", "sklearn": "scikit-learn",
                 "skimage": "scikit-image", "faiss": "faiss-cpu", "tf_slim": "tf-slim", "google": "protobuf"}
FIRST_PARTY = {"train", "extract", "tests"}


def python_files() -> list:
    return [p for p in PROJECT_ROOT.rglob("*.py")
            if not any(part == "repo" or part.startswith(".venv") for part in p.relative_to(PROJECT_ROOT).parts)]


def requirement_names(name: str) -> set[str]:
    names = set()
    for line in (PROJECT_ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
    return names


def lower_bounds(name: str) -> dict[str, str]:
    """Distribution name -> the version of its ``>=`` or ``==`` bound in a requirements file."""
    found = {}
    for line in (PROJECT_ROOT / name).read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)\s*(?:>=|==)\s*([^\s#,]+)", line.split("#")[0].strip())
        if match:
            found[match[1].lower()] = match[2]
    return found


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_readme_front_page_stays_short() -> None:
    """The README is the front page: the details live in docs/ (a line and a link each)."""
    lines = (PROJECT_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move details to docs/"


def test_no_file_cites_a_document_outside_the_repository() -> None:
    spec = re.compile(r"\b" + "SP" + r"EC\b")  # the background document, not part of the repository
    offenders = [str(p.relative_to(PROJECT_ROOT)) for p in python_files() if spec.search(p.read_text())]
    assert offenders == []


def test_every_imported_package_is_a_requirement() -> None:
    """Each file's imports are in its requirements: the runtime's, the tests' (requirements-dev.txt),
    the converter's (requirements-convert.txt) or the official reference environment's."""
    runtime = requirement_names("requirements.txt")
    dev = runtime | requirement_names("requirements-dev.txt")
    convert = requirement_names("requirements-convert.txt")
    special = {"extract/official/convert.py": runtime | convert, "extract/official/release.py": runtime | convert,
               "tests/test_official.py": dev | convert}
    reference = requirement_names("tests/official/requirements.txt")
    missing = []
    for path in python_files():
        relative = path.relative_to(PROJECT_ROOT)
        allowed = special.get(relative.as_posix(), dev if relative.parts[0] == "tests" else runtime)
        if relative.parts[:2] == ("tests", "official"):
            allowed = reference
        for module in imported_modules(path) - FIRST_PARTY - set(sys.stdlib_module_names):
            dist = DISTRIBUTIONS.get(module, module).lower()
            if dist not in allowed:
                missing.append(f"{path.relative_to(PROJECT_ROOT)}: {module}")
    assert missing == []


def test_requirements_min_pins_every_lower_bound() -> None:
    """make test-min tests each lower bound but those the release notes carry (requirements.txt),
    asmk's exact pin, and tomli, which only Python 3.10 installs (make test-min runs on 3.11, which has
    tomllib)."""
    bounds = lower_bounds("requirements.txt") | lower_bounds("requirements-dev.txt")
    pins = lower_bounds("requirements-min.txt")
    assert pins == {k: v for k, v in bounds.items() if k in pins}
    assert set(bounds) - set(pins) == {"torch", "torchvision", "pillow", "asmk", "tomli"}
