"""The docs: every relative link resolves, and the README stays a short front door."""

import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 260
QUICKSTART_LINES = 40
QUICKSTART = ("python -m sqlm_jax.main --config configs/tiny.py", "python -m pytest -q -n 2 tests")

# [text](target) and ![alt](target), the target up to the first space or ")"; an optional
# "title" after it is ignored.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files():
  docs = os.path.join(ROOT, "docs")
  pages = sorted(os.path.join("docs", f) for f in os.listdir(docs) if f.endswith(".md"))
  return ["README.md", "CONTRIBUTING.md", *pages]


def prose_lines(text):
  """The lines outside fenced code blocks, with inline code spans blanked."""
  inside = False
  for line in text.split("\n"):
    if FENCE.match(line):
      inside = not inside
      continue
    if not inside:
      yield re.sub(r"`[^`]*`", "``", line)


def slug(heading):
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # A link keeps its text.
  text = text.replace("`", "").lower()
  text = "".join(c for c in text
                 if c in " -_" or unicodedata.category(c)[0] in "LN")
  return text.replace(" ", "-")


def anchors(path):
  seen, found = {}, set()
  with open(path, encoding="utf-8") as f:
    for line in prose_lines(f.read()):
      match = HEADING.match(line)
      if match:
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
  return found


def broken_links(doc, root=ROOT):
  """(target, reason) for every relative link in `doc` (a path under root) that does not resolve."""
  path = os.path.join(root, doc)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  problems = []
  for line in prose_lines(text):
    for target in LINK.findall(line):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:, ...
        continue
      file_part, _, anchor = target.partition("#")
      resolved = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                  if file_part else path)
      if not os.path.exists(resolved):
        problems.append((target, "no such file"))
      elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
        problems.append((target, "no such heading"))
  return problems


@pytest.mark.parametrize("doc", doc_files())
def test_relative_links_resolve(doc):
  assert broken_links(doc) == [], f"{doc}: broken links (fix the target or the heading)"


def test_broken_links_are_caught(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Its second part\n")
  (tmp_path / "README.md").write_text(
      "# Title\n\n[ok](docs/page.md) [ok](docs/page.md#its-second-part) [ok](#title)\n"
      "![missing](docs/nothing.png) [bad anchor](docs/page.md#no-such-part)\n"
      "[web](https://example.com) `[in code](docs/nothing.md)`\n\n"
      "```\n[in a fence](docs/nothing.md)\n```\n")
  assert broken_links("README.md", root=str(tmp_path)) == [
      ("docs/nothing.png", "no such file"), ("docs/page.md#no-such-part", "no such heading")]


def test_slugs_follow_github():
  assert slug("The ablation table: the tiny default, 3 seeds, test split") == (
      "the-ablation-table-the-tiny-default-3-seeds-test-split")
  assert slug("Bases in the 20–60 % band") == "bases-in-the-2060--band"
  assert slug("`sqlm_jax/models/`: the decoder") == "sqlm_jaxmodels-the-decoder"


def test_readme_is_a_short_front_door():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    lines = f.read().split("\n")
  assert len(lines) <= README_MAX_LINES, (
      f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} and move detail "
      "into a docs/ page")
  first_screen = "\n".join(lines[:QUICKSTART_LINES])
  for command in QUICKSTART:
    assert command in first_screen, (
        f"README.md: {command!r} must be in its first {QUICKSTART_LINES} lines")
