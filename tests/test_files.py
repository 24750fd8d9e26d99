from __future__ import annotations

import os

from enn_neuro.files import remove_stale_temporaries, temporary_sibling, write_text_atomic


def test_atomic_write_leaves_only_the_file(tmp_path):
    write_text_atomic(tmp_path / "study.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]


def test_stale_temporaries_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    kept = [tmp_path / "last.pt", tmp_path / ".hidden", tmp_path / "notes.tmp-1.txt"]
    for path in kept:
        path.write_text("keep")
    stale = [tmp_path / ".last.pt.tmp-4242", temporary_sibling(tmp_path / "best.pt")]
    for path in stale:
        path.write_text("half")
    assert stale[1].name == f".best.pt.tmp-{os.getpid()}"

    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
