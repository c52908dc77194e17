"""The docs stay true to the code: the site builds strictly (a broken link or anchor fails it), the generated
references equal what the code generates, the README's links lead to files, and neither the docs nor the code
narrate how the work on the project was organised."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_docs_build_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "reference" / "cli" / "index.html").is_file()


def test_the_generated_references_are_what_the_code_generates():
    result = subprocess.run([sys.executable, "tools/docs_reference.py", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_cli_reference_holds_every_command_and_the_config_reference_every_key():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import docs_reference
    finally:
        sys.path.pop(0)
    from astra_ds.config import RunConfig, flat_items

    config = docs_reference.config_reference()
    assert all(f"`{key}`" in config for key in flat_items(RunConfig()))
    cli = docs_reference.cli_reference()
    for command in ("train", "finalize", "eval", "predict", "serve", "labels add", "index", "export", "plan",
                    "config show", "data synth", "data convert"):
        assert f"## astra-ds {command}\n" in cli
    assert "--allow-changes" in cli and "--max-queue" in cli


def test_the_readme_links_lead_to_files():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links to the docs"
    missing = [link for link in links if "://" not in link and not (REPO / link).exists()]
    assert not missing, missing


@pytest.mark.parametrize("folder", ["docs", "astra_ds", "tests", "tools", "configs", "launchers"])
def test_nothing_narrates_the_rounds_of_work(folder):
    """History is in git: no session names, no issue numbers."""
    pattern = re.compile(r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
                         r"thirteenth|fourteenth|fifteenth|sixteenth|this|last|next|previous) session\b|"
                         r"\bissues? \d+", re.IGNORECASE)
    paths = [REPO / "README.md"] if folder == "docs" else []
    paths += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".md", ".py", ".yaml", ".sh",
                                                                                    ".example", ".sbatch")]
    found = [f"{path.relative_to(REPO)}: {match.group(0)}" for path in paths if path.name != "test_docs.py"
             for match in pattern.finditer(path.read_text(errors="replace"))]
    assert not found, found
