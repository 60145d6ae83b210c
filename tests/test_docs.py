"""docs/paper.md links each paper idea to the line where its code starts; the README's paper map
names files that exist. These tests keep both true as the code moves."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[`(\w+)\.([\w.]+)`\]\(\.\./minigpt_img/(\w+)\.py#L(\d+)\)")  # [`module.symbol`](...)


def definition_line(path: Path, symbol: str) -> int:
    """1-based line where `symbol` (name, or Class.method) is defined in the file."""
    lines = path.read_text().splitlines()
    *outer, name = symbol.split(".")
    start = 0
    if outer:
        start = next(i for i, l in enumerate(lines) if re.match(rf"class {outer[0]}\b", l))
    pattern = re.compile(rf"\s*(def|class) {name}\b|{name} = ")
    return next(i for i in range(start, len(lines)) if pattern.match(lines[i])) + 1


def test_every_link_of_the_walkthrough_points_at_its_definition():
    text = (REPO / "docs" / "paper.md").read_text()
    links = LINK.findall(text)
    assert len(links) > 40
    assert all(module == f for module, _, f, _ in links), "a link's text names another file"
    wrong = [f"{f}.py#L{n} should be #L{definition_line(REPO / 'minigpt_img' / f'{f}.py', s)} for {s}"
             for _, s, f, n in links if definition_line(REPO / "minigpt_img" / f"{f}.py", s) != int(n)]
    assert not wrong, "\n".join(wrong) + "\n(python tests/test_docs.py updates them)"


def test_the_link_check_catches_a_stale_line(tmp_path):
    (tmp_path / "m.py").write_text("x = 1\n\nclass A:\n    def f(self):\n        pass\n")
    assert definition_line(tmp_path / "m.py", "A.f") == 4
    assert definition_line(tmp_path / "m.py", "x") == 1
    with pytest.raises(StopIteration):
        definition_line(tmp_path / "m.py", "missing")


def test_the_readme_map_names_existing_files_in_the_papers_order():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Where each part of the paper lives")[1].split("\n## ")[0]
    rows = [r for r in section.splitlines() if r.startswith("| §")]
    for row in rows:
        for name in re.findall(r"`(\w+\.py)`", row):
            assert (REPO / "minigpt_img" / name).is_file() or (REPO / name).is_file(), name
    numbers = [tuple(int(n) for n in re.match(r"\| §(\d)\.(\d)", r).groups()) for r in rows]
    assert numbers == sorted(numbers) and len(numbers) >= 15
    for section_number in ("§4.1", "§4.2", "§4.5", "§4.6", "§4.7"):
        assert f"| {section_number}" in section


def relink(text: str) -> str:
    """The walkthrough with every link's line number recomputed."""
    def fix(m):
        module, symbol = m.group(1), m.group(2)
        line = definition_line(REPO / "minigpt_img" / f"{module}.py", symbol)
        return f"[`{module}.{symbol}`](../minigpt_img/{module}.py#L{line})"
    return LINK.sub(fix, text)


if __name__ == "__main__":  # python tests/test_docs.py: update docs/paper.md after the code moved
    doc = REPO / "docs" / "paper.md"
    doc.write_text(relink(doc.read_text()))
