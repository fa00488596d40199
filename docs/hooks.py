"""mkdocs hooks: the pages the build writes from the code itself.

- `recipe-reference.md`, rendered by gen_reference.py from the recipe schema;
- `<!-- recipe-papers -->` becomes the table of bundled recipes with a `paper:` block;
- `<!-- published-models -->` becomes the table of released checkpoints `dmstab import` knows
  (gen_published.py);
- `<!-- dmstab-help COMMAND -->` in a page becomes `dmstab COMMAND --help`, as the installed
  command line prints it (`<!-- dmstab-help -->`: `dmstab --help`).

dmstab never imports this module; the site build (`nox -s docs`) loads it from mkdocs.yml.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

os.environ["TERMINAL_WIDTH"] = "100"  # typer reads it when first imported: help fits the page
os.environ["NO_COLOR"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

import gen_published
import gen_reference
from mkdocs.structure.files import File, Files
from typer.testing import CliRunner

from dmstab.cli import app

HELP_MARKER = re.compile(r"<!-- dmstab-help ?([\w-]*) -->")


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, gen_reference.PAGE, content=gen_reference.render()))
    return files


def command_help(command: str) -> str:
    """`dmstab COMMAND --help` as a text block; a command that fails to print fails the build."""
    arguments = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(app, arguments, prog_name="dmstab")
    if result.exit_code != 0:
        raise RuntimeError(f"dmstab {' '.join(arguments)} exited {result.exit_code}")
    text = "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())
    return f"```text\n$ dmstab {' '.join(arguments)}\n{text}\n```"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if "<!-- recipe-papers -->" in markdown:
        markdown = markdown.replace("<!-- recipe-papers -->", gen_reference.paper_table())
    if "<!-- published-models -->" in markdown:
        table = gen_published.published_table()
        markdown = markdown.replace("<!-- published-models -->", table)
    return HELP_MARKER.sub(lambda match: command_help(match.group(1)), markdown)
