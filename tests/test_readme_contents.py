"""The README's table of contents lists every section, in order, with links that resolve."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_contents_list_every_section_in_order_and_each_link_names_its_heading():
    text = README.read_text()
    sections = [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]
    assert sections[0] == "Contents"
    contents = text.split("## Contents\n", 1)[1].split("\n## ", 1)[0]
    entries = re.findall(r"^- \[(.+?)\]\(#(.+?)\)$", contents, flags=re.M)
    assert [title for title, _ in entries] == [s.replace("`", "") for s in sections[1:]]
    assert [anchor for _, anchor in entries] == [github_anchor(s) for s in sections[1:]]
