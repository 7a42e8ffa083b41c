"""The documentation stays inside the repository and in step with the code.

- every relative link and every path named in README.md, docs/, ds_configs/ and launch/ resolves to a file here
  (anchors included: a link to `docs/design.md#evaluation` needs that heading);
- nothing in the repository points at files outside it (the developers' shared notes);
- the sections of docs/design.md that the code and the tests cite exist, and every option of `ms_attention`
  (keyword arguments, `config.ms_attention` keys and their allowed values) is described there.
"""

from __future__ import annotations

import inspect
import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
TOP_DIRS = ("ds_msattn", "ds_configs", "launch", "tests", "benchmarks", "kernels", "docs")
# Sections of docs/design.md that code, tests and the README rely on.
SECTIONS = (
    "MS attention, exact definition",
    "Options of MS attention beyond the paper",
    "Decoding with a KV cache",
    "Long inputs at inference (streaming mode)",
    "CRD-NTK positions",
    "Reduced LongLoRA",
    "Sequence-parallel region sharding",
    "Evaluation",
)
OUTSIDE = ("../" + "shared", "shared/" + "FACTS.md", "shared/" + "DESIGN.md", "shared/" + "STYLE.md")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside ignored folders
        files = [p for p in ROOT.rglob("*") if not ({".git", ".venv", "runs", "__pycache__"} & set(p.parts))]
    return [p for p in files if p.is_file()]


def text_files() -> list[Path]:
    """Tracked text files, this one excepted (it spells out what it looks for)."""
    suffixes = {".py", ".md", ".sh", ".sbatch", ".yaml", ".yml", ".json", ".cfg", ".toml", ".txt", ""}
    this = Path(__file__).resolve()
    return [p for p in tracked_files()
            if p.suffix in suffixes and p.stat().st_size < 2_000_000 and p.resolve() != this]


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += sorted(p for p in (ROOT / "ds_configs").rglob("*") if p.is_file())
    files += sorted(p for p in (ROOT / "launch").iterdir() if p.is_file())
    return files


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)]


def expand(path: str) -> list[str]:
    """`a.{md,csv}` -> [`a.md`, `a.csv`]."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_markdown_links_resolve():
    bad = []
    for doc in doc_files():
        if doc.suffix != ".md":
            continue
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(ROOT)} -> {target}"
            if not file.exists() or ROOT not in file.parents:
                bad.append(f"{where}: no such file in the repository")
            elif anchor and file.suffix == ".md" and anchor not in {slug(h) for h in headings(file)}:
                bad.append(f"{where}: no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)


def test_paths_named_in_docs_configs_and_scripts_exist():
    pattern = re.compile(r"(?<![\w./$-])((?:%s)/[\w./{},-]*[\w}])" % "|".join(TOP_DIRS))
    bad = []
    for doc in doc_files():
        for ref in pattern.findall(doc.read_text(encoding="utf-8")):
            if ref.count("}") > ref.count("{"):  # a YAML flow mapping's closing brace
                ref = ref[: ref.rindex("}")]
            for path in expand(ref):
                if not (ROOT / path).exists() and not list(ROOT.glob(path + ".*")):  # `name.*` names a family
                    bad.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not bad, "named paths that are not in the repository:\n" + "\n".join(sorted(set(bad)))


def test_nothing_points_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}: {s}" for p in text_files()
           for s in OUTSIDE if s in p.read_text(encoding="utf-8", errors="replace")]
    assert not bad, "\n".join(bad)


def test_bare_document_names_resolve():
    """A bare document name such as `DESIGN.md` or `FACTS.md` must name a document of the repository (docs/).

    Upper-case names only: lower-case ones are mostly results files that scripts write."""
    names = {p.name.lower() for p in tracked_files() if p.suffix == ".md"}
    bad = []
    for p in text_files():
        for name in re.findall(r"(?<![\w/.{}-])([A-Z][A-Z_]*\.md)\b", p.read_text(encoding="utf-8", errors="replace")):
            if name.lower() not in names:
                bad.append(f"{p.relative_to(ROOT)}: {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_design_sections_exist_and_citations_name_them():
    present = set(headings(DESIGN))
    missing = [s for s in SECTIONS if s not in present]
    assert not missing, f"docs/design.md lacks sections {missing}"
    bad = []
    for p in text_files():
        text = p.read_text(encoding="utf-8", errors="replace")
        for cited in re.findall(r"design\.md,?\s*\"([^\"]+)\"", text, flags=re.I):
            if cited not in present:
                bad.append(f"{p.relative_to(ROOT)} cites docs/design.md \"{cited}\"")
    assert not bad, "\n".join(bad)


def test_every_option_of_ms_attention_is_defined_in_the_design_document():
    from ds_msattn import hf
    from ds_msattn.attention import ms_attention

    design = DESIGN.read_text(encoding="utf-8")
    names = [n for n in inspect.signature(ms_attention).parameters if n not in ("q", "k", "v")]
    names += list(hf.DEFAULT_MS_ATTENTION)
    try:
        from ds_msattn.attention import options
    except ImportError:
        options = None
    values = []
    if options is not None:
        names += list(options.DEFAULT_OPTIONS)
        values = [*options.FAR_POSITIONS, *options.SCORES, *options.SELECT_PER]
    missing = sorted({n for n in names if f"`{n}`" not in design} | {v for v in values if f"`{v}`" not in design})
    assert not missing, f"docs/design.md does not describe {missing}"


def test_readme_links_the_docs_and_its_main_job_section_covers_passkey():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in ("docs/design.md", "docs/architecture.md"):
        assert f"({doc}" in readme, f"README.md does not link {doc}"
    section = re.search(r"<!-- section: main-job -->(.*?)<!-- /section: main-job -->", readme, flags=re.S)
    assert section is not None, "README.md lost its main-job section markers"
    assert "passkey" in section.group(1).lower()


@pytest.mark.parametrize("text,expected", [("a/b.{md,csv}", ["a/b.md", "a/b.csv"]), ("x.py", ["x.py"])])
def test_expand(text, expected):
    assert expand(text) == expected


def test_slug():
    assert slug("Long inputs at inference (streaming mode)") == "long-inputs-at-inference-streaming-mode"
    assert slug("MS attention, exact definition") == "ms-attention-exact-definition"
    assert slug("`far_positions`: where selected history keys sit for RoPE") == \
        "far_positions-where-selected-history-keys-sit-for-rope"
