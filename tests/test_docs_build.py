"""The documentation site builds with `mkdocs build --strict` (no broken links or nav entries)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = ["quickstart", "tracing", "interventions", "analysis", "dsl", "develop", "daemon", "protocol",
         "repl", "lsp", "editors", "scale", "architectures", "notebooks"]


def test_docs_build_strict_with_every_page(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").is_file()
    missing = [page for page in PAGES if not (site / page / "index.html").is_file()]
    assert not missing, f"pages not built: {missing}"
    nav = (REPO / "mkdocs.yml").read_text()
    not_in_nav = [page for page in PAGES if f"{page}.md" not in nav]
    assert not not_in_nav, f"pages missing from the nav in mkdocs.yml: {not_in_nav}"
