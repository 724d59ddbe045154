"""The documentation's claims about the tree hold: docs/layout.md lists every module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_doc():
    spec = importlib.util.spec_from_file_location("layout_doc", ROOT / "scripts" / "layout_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layout_page_lists_the_tree_as_it_is() -> None:
    layout_doc = _layout_doc()
    page = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    assert page == layout_doc.render(page), "run scripts/layout_doc.py to update docs/layout.md"
    modules = {p.name for p in (ROOT / "src" / "lungcad").rglob("*.py") if p.name != "__init__.py"}
    assert all(f"`{name}`" in page for name in modules)


def test_the_check_fails_on_a_stale_page(tmp_path: Path) -> None:
    layout_doc = _layout_doc()
    stale = layout_doc.HEADING + "\n\n- `gone.py`: a module that no longer exists\n"
    assert layout_doc.render(stale) != stale
