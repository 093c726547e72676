"""The documentation: the strict mkdocs build (broken links, anchors and
cross-references fail it), the sections of docs/theory.md, and the references
into it from the code, README, notebooks and benchmarks."""

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
NUM_SECTIONS = 12
# where the theory is cited from
CITING = [ROOT / "mfattn", ROOT / "README.md", ROOT / "notebooks", ROOT / "benchmarks"]
# where no reference to the old, out-of-repository specification may remain
NO_SPEC = [ROOT / "mfattn", ROOT / "README.md", ROOT / "notebooks"]
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".txt", ".toml", ".cfg", ".yml", ".yaml"}

# "docs/theory.md, section 4", "docs/theory.md, sections 1, 2 and 4", "sections 1-2"
_SECTION_REF = re.compile(
    r"docs/theory\.md,\s+sections?\s+(\d+(?:\s*(?:,\s*and|,|and|-|–|to)\s*\d+)*)"
)
_ANCHOR_REF = re.compile(r"docs/theory\.md#([A-Za-z0-9_-]+)")


def _files(paths):
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                if (
                    f.is_file()
                    and f.suffix in TEXT_SUFFIXES
                    and "__pycache__" not in f.parts
                    and ".ipynb_checkpoints" not in f.parts
                ):
                    yield f


def _text(path):
    """The text of a file; for a notebook, its cells' sources joined (so that a
    reference broken across lines of a cell is still one match)."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".ipynb":
        cells = json.loads(raw)["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells)
    return raw


def _theory_sections():
    headings = re.findall(r"^## (\d+)\. (.+)$", THEORY.read_text(encoding="utf-8"), re.M)
    return [int(n) for n, _ in headings]


def _theory_anchors():
    """Explicit `<a id="...">` anchors and the ids generated from the headings."""
    text = THEORY.read_text(encoding="utf-8")
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\s-]", "", heading.strip().lower())
        anchors.add(re.sub(r"[\s]+", "-", slug))
    return anchors


def test_theory_has_sections_1_to_12():
    assert THEORY.is_file(), "docs/theory.md is missing"
    assert _theory_sections() == list(range(1, NUM_SECTIONS + 1))


def test_theory_sections_have_explicit_anchors():
    text = THEORY.read_text(encoding="utf-8")
    for n in range(1, NUM_SECTIONS + 1):
        m = re.search(rf'<a id="([a-z0-9-]+)"></a>\s*\n\s*## {n}\. ', text)
        assert m is not None, f"section {n} of docs/theory.md has no `<a id>` anchor before it"


def _references():
    refs = []  # (file, line, kind, value)
    for path in _files(CITING):
        text = _text(path)
        for m in _SECTION_REF.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            for n in re.findall(r"\d+", m.group(1)):
                refs.append((path.relative_to(ROOT), line, "section", int(n)))
        for m in _ANCHOR_REF.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            refs.append((path.relative_to(ROOT), line, "anchor", m.group(1)))
    return refs


def test_section_reference_parser():
    text = (
        "see docs/theory.md, section 4; docs/theory.md, sections 1, 2 and 4;\n"
        "(docs/theory.md,\n    sections 1-2) and docs/theory.md#causal"
    )
    found = [re.findall(r"\d+", m.group(1)) for m in _SECTION_REF.finditer(text)]
    assert found == [["4"], ["1", "2", "4"], ["1", "2"]]
    assert _ANCHOR_REF.findall(text) == ["causal"]


def test_references_point_into_theory():
    """Every "docs/theory.md, section N" (and `docs/theory.md#anchor`) in the code,
    README, notebooks and benchmarks names a section (anchor) that exists."""
    refs = _references()
    assert refs, "no reference to docs/theory.md found: the search is broken"
    sections = set(_theory_sections())
    anchors = _theory_anchors()
    bad = [
        f"{f}:{line}: {kind} {value}"
        for f, line, kind, value in refs
        if (kind == "section" and value not in sections)
        or (kind == "anchor" and value not in anchors)
    ]
    assert not bad, "references to missing parts of docs/theory.md:\n" + "\n".join(bad)


def test_no_spec_references():
    """The old specification is not in the repository: nothing may cite it."""
    bad = []
    for path in _files(NO_SPEC):
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if "SPEC" in line:
                bad.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()[:100]}")
    assert not bad, "cite docs/theory.md, not SPEC:\n" + "\n".join(bad)


def test_api_reference_covers_public_names():
    """Every public name of `mfattn` has an entry `::: mfattn.X` in docs/api/."""
    import mfattn

    public = {
        n
        for n in dir(mfattn)
        if not n.startswith("_") and not isinstance(getattr(mfattn, n), types.ModuleType)
    }
    pages = (ROOT / "docs" / "api").glob("*.md")
    documented = set()
    for page in pages:
        documented |= set(re.findall(r"^::: mfattn\.(\w+)", page.read_text(), re.M))
    assert public - documented == set(), "not in the API reference (docs/api/*.md)"
    assert documented - public == set(), "documented but not public"


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict`: unresolved cross-references ([`mfattn.X`][]),
    broken links and missing anchors are errors."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    theory = (tmp_path / "site" / "theory" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in theory  # the mathematics went through arithmatex
    ids = set(re.findall(r'id="([^"]+)"', theory))
    assert _theory_anchors() <= ids, "anchors of docs/theory.md missing from the site"
    for n in range(1, NUM_SECTIONS + 1):
        assert re.search(rf"<h2[^>]*>{n}\. ", theory), f"section {n} missing from the site"
