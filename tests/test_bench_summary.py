"""The README's performance numbers are the committed benchmark JSON, rendered."""

from __future__ import annotations

from bench import summary


def test_readme_block_is_what_the_committed_results_render_to():
    block = summary.readme_block(summary.README.read_text())
    assert block is not None, "README.md lost its bench-summary markers"
    assert block == summary.render(), "rerun `python -m bench.summary` after a benchmark run"


def test_summary_file_matches_too():
    text = (summary.RESULTS / "SUMMARY.md").read_text()
    assert text.endswith(summary.render())


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{summary.START}\nold numbers\n{summary.END}\noutro\n")
    summary.update_readme("| new |\n", readme)
    assert readme.read_text() == f"intro\n{summary.START}\n| new |\n{summary.END}\noutro\n"
    assert summary.readme_block(readme.read_text()) == "| new |\n"
