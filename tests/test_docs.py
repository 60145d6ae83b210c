"""docs/paper.md links each paper idea to the line where its code starts; the README's paper map
names files that exist; every link of the README and docs/ reaches a file and a heading; the README
stays a front door; every departure is marked where the README says it lives. These tests keep all
of it true as the code moves."""
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


MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path) -> list:
    """The links of a Markdown page whose file, or whose heading (#anchor), does not exist."""
    broken = []
    for target in MD_LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):   # https:, mailto: ... are not checked (no network)
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and where.suffix == ".md":
            heads = {slug(h) for h in re.findall(r"^#+ (.+)$", where.read_text(), re.M)}
            if anchor not in heads:
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_link_of_the_readme_and_docs_reaches_a_file_and_heading():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 5
    broken = [b for page in pages for b in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_missing_file_and_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Two words\n[ok](#two-words) [ok](b.md#b) [bad](#three) [bad](c.md)\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: #three (no such heading)", "a.md: c.md (no such file)"]
    assert slug("Training (§2.1, §3.4)") == "training-21-34"


def test_the_readme_is_a_front_door():
    """At most ~250 lines, and the set-up and test commands within the first screen."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    first_screen = "\n".join(lines[:25])
    assert "pip install -e" in first_screen and "python train.py" in first_screen
    assert re.search(r"^pytest", first_screen, re.M)


def test_every_departure_quotes_the_paper_and_is_marked_where_it_lives():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Departures from the paper")[1].split("\n## ")[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| what")]
    assert len(rows) >= 20
    unmarked = []
    for row in rows:
        what, paper, here, where = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:5]]
        assert re.search(r"§\d\.\d", paper) and '"' in paper, f"{what}: the paper column quotes no section"
        for module, symbol in re.findall(r"`(\w+)\.(\w+)`", where):
            path = REPO / "minigpt_img" / f"{module}.py"
            if symbol == "py":
                text = path.read_text()
            else:
                lines = path.read_text().splitlines()
                start = definition_line(path, symbol) - 1
                end = next((i for i in range(start + 1, len(lines)) if re.match(r"(def|class|\w+ = )", lines[i])),
                           len(lines))
                text = "\n".join(lines[max(0, start - 6):end])
            if "departure" not in text.lower() and "released igpt" not in text.lower():
                unmarked.append(f"{what}: {module}.{symbol}")
    assert not unmarked, "not marked where the README says: " + ", ".join(unmarked)


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
