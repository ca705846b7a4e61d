"""Promises about the repository itself: the README describes every module, files stay small."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lmforge").rglob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_readme_file_tree_lists_every_module(module):
    assert f"{module} " in (ROOT / "README.md").read_text(encoding="utf-8"), f"README.md's file tree lacks {module}"


@pytest.mark.parametrize("module", MODULES)
def test_modules_stay_under_600_lines(module):
    assert len((ROOT / module).read_text(encoding="utf-8").splitlines()) <= 600


def test_makefile_and_ci_run_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
