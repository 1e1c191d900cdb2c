"""Task progress in a log: a line now and then and one at the end, never a redrawn bar."""

from __future__ import annotations

from pipelines.parallel import LineProgress


def test_line_progress_prints_at_most_once_per_interval_and_once_at_the_end(capsys):
    quiet = LineProgress(5, "shards", every=3600)
    for _ in range(5):
        quiet.update()
    quiet.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shards: 5/5 done in ")

    chatty = LineProgress(3, "parts", every=0)  # every update may report, but not the last one
    for _ in range(3):
        chatty.update()
    chatty.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines[:2]] == ["parts: 1/3", "parts: 2/3"]
    assert len(lines) == 3 and lines[2].startswith("parts: 3/3 done in ")
