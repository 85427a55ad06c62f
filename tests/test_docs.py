"""The documentation stays true: every runnable example in docs/ runs as written, and every
relative link in README.md and docs/ points at a file (and heading) that exists."""
import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _examples():
    """(page, code) of every complete example in docs/: a ```python block that imports torch and
    topk_distill itself (fragments that continue a setup shown in prose are not run). The
    README's own examples are run by test_readme.py."""
    for page in PAGES[1:]:
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
        for i, code in enumerate(blocks):
            if re.search(r"^import torch$", code, re.M) and "import topk_distill" in code:
                yield pytest.param(page, code, id=f"{page.name}-{i}")


@pytest.mark.parametrize("page,code", list(_examples()))
def test_docs_example_runs(page, code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    runpy.run_path(str(script), run_name="__main__")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def _links(page: pathlib.Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        yield target


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        for target in _links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
                continue
            if anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+\s+(.*)$", dest.read_text(), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)
