"""MkDocs hooks: let docs/ pages link to repository files outside docs/ (bench/results tables, scripts).

The pages link to such files with plain relative links (``../bench/results/e2e_shots.md``), which work
on GitHub and in a checkout. For the site, every file under ``bench/`` (but not ``bench/results/tmp/``)
and every other repository file that a page links to is added under ``repo/``, and those links are
rewritten to point there. A link to a file that does not exist is left alone, so ``mkdocs build
--strict`` fails on it.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

PREFIX = "repo"
LINK = re.compile(r"\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")
SKIP_PARTS = {"tmp", "__pycache__"}


def _repo_root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def _outside_targets(page_path: str, markdown: str):
    """(link, repository path) for each link of a docs page that leaves docs/."""
    for match in LINK.finditer(markdown):
        link = match.group(1)
        target = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_path), link))
        if not target.startswith("..") and not target.startswith("docs/"):
            yield link, target


def on_files(files, config):
    root = _repo_root(config)
    wanted = {p.relative_to(root).as_posix() for p in (root / "bench").rglob("*")
              if p.is_file() and not SKIP_PARTS & set(p.relative_to(root).parts)}
    docs_dir = Path(config["docs_dir"])
    for page in docs_dir.rglob("*.md"):
        for _, target in _outside_targets(page.relative_to(docs_dir).as_posix(), page.read_text(encoding="utf-8")):
            if (root / target).is_file():
                wanted.add(target)
    for target in sorted(wanted):
        files.append(File.generated(config, f"{PREFIX}/{target}", abs_src_path=str(root / target),
                                    inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri.startswith(PREFIX + "/"):
        return markdown
    root = _repo_root(config)
    depth = page.file.src_uri.count("/")
    for link, target in set(_outside_targets(page.file.src_uri, markdown)):
        if (root / target).is_file():
            new = "../" * depth + f"{PREFIX}/{target}"
            markdown = markdown.replace(f"]({link})", f"]({new})").replace(f"]({link}#", f"]({new}#")
    return markdown
