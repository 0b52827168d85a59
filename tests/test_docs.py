"""The docs that promise behaviour stay true: the config reference is the code's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pigateway.config import fields_reference, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_generated_from_the_code() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    block = re.search(r"<!-- generated:begin -->\n(.*)\n<!-- generated:end -->", text, re.S)
    assert block is not None, "docs/config.md lost its generated markers"
    assert block.group(1) == reference_markdown(), (
        "docs/config.md is out of date: paste pigateway.config.reference_markdown() in it")


def test_every_option_has_a_meaning() -> None:
    undocumented = [key for key, _, _, doc in fields_reference() if not doc]
    assert undocumented == []


def test_readme_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in lines[:8] if line.startswith("scripts/")]
    assert commands == ["scripts/demo", "scripts/test"]
    for command in commands:
        assert (ROOT / command).exists(), f"README names {command}, which does not exist"


def test_readme_led_legend_is_the_panel_table() -> None:
    from pigateway.pins.panel import legend  # noqa: PLC0415 - gpiozero only for this test

    readme = (ROOT / "README.md").read_text()
    assert "\n".join(legend()) in readme, "README's LED legend differs from panel.RULES"


#: A Markdown link: [text](target), where target is not a web address.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "ansible").rglob("README.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_link_in_the_docs_resolves_inside_the_clone() -> None:
    """A user's clone is all there is: no link may leave it or name a missing file/heading."""
    broken = []
    for page in _markdown_files():
        for target in _LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            where = (page.parent / file_part).resolve() if file_part else page
            if not where.is_relative_to(ROOT) or not where.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def _shipped_docs() -> set[str]:
    """The files the Debian package installs in /usr/share/doc/pigateway (its ``.docs``)."""
    listed = (ROOT / "packaging" / "debian" / "pigateway.docs").read_text().split()
    return {str(path.relative_to(ROOT)) for entry in listed for path in ROOT.glob(entry)}


def test_every_doc_the_gateway_names_is_on_the_gateway() -> None:
    """A help text, a message or a shipped doc that says "see docs/X.md" points at a file
    the package installs, so the operator logged into a gateway can read it."""
    shipped = _shipped_docs()
    named: set[str] = set()
    for path in [*(ROOT / "service" / "pigateway").rglob("*.py"),
                 *(ROOT / name for name in shipped)]:
        named |= set(re.findall(r"docs/[a-z_-]+\.md", path.read_text()))
        if path.parent.name == "docs":  # a doc's links to its neighbours: [x](store.md)
            links = re.findall(r"\]\(([a-z_-]+\.md)", path.read_text())
            named |= {f"docs/{name}" for name in links}
    assert named - shipped == set()


def _where_to_change_rows() -> list[list[str]]:
    """The rows of docs/architecture.md's "Where to change what", cell by cell."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Where to change what", 1)[1].split("\n## ", 1)[0]
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| to change")]


def _names(body: list[ast.stmt]) -> set[str]:
    """The names a module's or a class's body defines (functions, classes, assignments)."""
    found: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, ast.Assign):
            found.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
    return found


def _defines(path: Path, name: str) -> bool:
    """Whether the module at ``path`` defines ``name`` at its top level, or, for
    ``Class.member``, whether that class defines the member."""
    body = ast.parse(path.read_text()).body
    owner, _, member = name.partition(".")
    if not member:
        return name in _names(body)
    return any(isinstance(node, ast.ClassDef) and node.name == owner
               and member in _names(node.body) for node in body)


#: A backticked token of a "where" cell that names a symbol (``take_batch``, ``Drain._refused``)
_SYMBOL = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?")


def _named_symbols(where: str) -> list[tuple[str, str]]:
    """Each symbol a "where" cell names, with the file named before it."""
    pairs: list[tuple[str, str]] = []
    source = None
    for token in re.findall(r"`([^`]+)`", where):
        if token.endswith(".py"):
            source = token
        elif source is not None and _SYMBOL.fullmatch(token):
            pairs.append((source, token))
    return pairs


def test_where_to_change_what_names_files_and_symbols_that_exist() -> None:
    """Each row of the page names files and symbols defined in them, tests and a doc that
    exist: a move or a rename that forgets the page fails here. Every symbol of the
    "where" cell counts, not only the first: a row is followed to each place it names."""
    rows = _where_to_change_rows()
    assert len(rows) >= 12, "the page lists about a dozen common changes"
    wrong = []
    for change, where, tests, doc in rows:
        pairs = _named_symbols(where)
        if not pairs:
            wrong.append(f"{change}: names no file and symbol")
        for source, symbol in pairs:
            if not (ROOT / source).is_file() or not _defines(ROOT / source, symbol):
                wrong.append(f"{change}: {source} {symbol}")
        named = re.findall(r"`([^`]+\.(?:py|md))`", f"{tests} {doc}")
        wrong += [f"{change}: {path}" for path in named if not (ROOT / path).is_file()]
        if not named:
            wrong.append(f"{change}: names no test or doc")
    assert wrong == []
