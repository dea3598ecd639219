"""A damaged index at start: `muse search` and `muse serve` print one `error:` line naming the file
and saying to rebuild with `muse index ... --overwrite`; `muse index --overwrite` then replaces it
(search/index_format.py, search/generations.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from muse_pipeline.cli.main import app
from muse_pipeline.search.generations import CURRENT


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _break_json(path: Path) -> None:
    path.write_text(path.read_text()[:50])


DAMAGES = {
    "empty embeddings": ("embeddings.npy", _empty, "is empty"),
    "truncated embeddings": ("embeddings.npy", _truncate, "is damaged"),
    "broken index.json": ("index.json", _break_json, "is not valid JSON"),
    "missing ids.bin": ("ids.bin", Path.unlink, "is missing"),
    "truncated ids.bin": ("ids.bin", _truncate, "does not match ids.off.npy"),
    "missing windows": ("windows.npy", Path.unlink, "is missing"),
}


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:")
    return lines[0]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_index_is_one_line_for_search_and_serve(caption_index, damage: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    out, cache = caption_index
    name, spoil, words = DAMAGES[damage]
    target = out / "gen-000001" / name
    spoil(target)
    runner = CliRunner()
    result = runner.invoke(app, ["search", "a red circle", "--index", str(out)])
    assert result.exit_code != 0
    line = _one_error_line(result.output)
    assert str(target) in line and words in line and "muse index ... --overwrite" in line
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served a damaged index"))
    result = runner.invoke(app, ["serve", "--index", str(out)])
    assert result.exit_code != 0 and str(target) in _one_error_line(result.output)
    # The way out the error names: rebuild with --overwrite (without it, the damage is the error again).
    again = runner.invoke(app, ["index", "--cache", str(cache.path), "--out", str(out)])
    assert again.exit_code != 0 and str(target) in _one_error_line(again.output)
    fixed = runner.invoke(app, ["index", "--cache", str(cache.path), "--out", str(out), "--overwrite"])
    assert fixed.exit_code == 0, fixed.output
    assert runner.invoke(app, ["search", "a red circle", "--index", str(out)]).exit_code == 0


def test_current_pointer_to_nothing_is_one_line(caption_index) -> None:
    out, cache = caption_index
    (out / CURRENT).write_text("gen-000007\n")
    result = CliRunner().invoke(app, ["search", "a red circle", "--index", str(out)])
    line = _one_error_line(result.output)
    assert "gen-000007" in line and "does not exist" in line and "--overwrite" in line
    (out / CURRENT).write_text("garbage")
    line = _one_error_line(CliRunner().invoke(app, ["search", "x", "--index", str(out)]).output)
    assert str(out / CURRENT) in line and "does not name a generation" in line
    # The way out the error names: --overwrite publishes a new generation over the damaged pointer.
    fixed = CliRunner().invoke(app, ["index", "--cache", str(cache.path), "--out", str(out), "--overwrite"])
    assert fixed.exit_code == 0, fixed.output
    assert CliRunner().invoke(app, ["search", "a red circle", "--index", str(out)]).exit_code == 0


def test_index_over_a_file_is_refused_then_replaced(caption_index, tmp_path: Path) -> None:
    _, cache = caption_index
    target = tmp_path / "notes.txt"
    target.write_text("not an index")
    runner = CliRunner()
    refused = runner.invoke(app, ["index", "--cache", str(cache.path), "--out", str(target)])
    assert "is not a muse index" in _one_error_line(refused.output) and target.read_text() == "not an index"
    replaced = runner.invoke(app, ["index", "--cache", str(cache.path), "--out", str(target), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert runner.invoke(app, ["search", "a red circle", "--index", str(target)]).exit_code == 0
