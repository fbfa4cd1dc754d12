"""The README's "Mixed routes in one batch" example runs as written (its own asserts check the routes)."""
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_mixed_routes_example_runs_as_written():
    section = README.read_text().split("### Mixed routes in one batch", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    assert "assert routes.decisions.tolist()" in code  # the example checks itself
    exec(compile(code, f"{README}:Mixed routes in one batch", "exec"), {"__name__": "readme_example"})
