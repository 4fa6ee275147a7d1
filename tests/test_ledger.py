"""The daemon's ledger: a real SQLite file, one row per file, outcomes that survive a kill."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bcc_desk.prediction import Prediction, error_prediction, relative_location
from bcc_desk.watch.ledger import DONE, ERROR, PENDING, VANISHED, Ledger, LedgerError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b"]


def _prediction(root: Path, rel: str, label: str = "a", p: float = 0.9) -> Prediction:
    path = root / rel
    file, slide = relative_location(path, root)
    return Prediction(
        path=path, file=file, slide=slide, label=label, confidence=p,
        margin=2 * p - 1, probabilities={"a": p, "b": 1 - p} if label == "a" else {"a": 1 - p, "b": p},
        needs_review=p < 0.8, review_reason="low confidence" if p < 0.8 else "", error=None,
        model="m", model_sha256="s" * 64, classified_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), ood_score=0.5,
        colour_score=0.25,
    )


def _file(root: Path, rel: str, data: bytes = b"x") -> os.stat_result:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.stat()


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    return folder


def test_outcomes_read_back_as_the_predictions_the_classifier_made(tmp_path: Path, root: Path) -> None:
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite", root)
    assert ledger._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    good = _prediction(root, "slide-1/a.jpg")
    flagged = _prediction(root, "b.jpg", label="b", p=0.6)
    bad = error_prediction(root / "slide-1/c.jpg", root, "truncated image data", "m", "s" * 64)
    for p, data in ((good, b"1"), (flagged, b"2"), (bad, b"3")):
        ledger.record(p.file, _file(root, p.file, data), f"sha-{data.decode()}", p)
    ledger.seen("slide-2/waiting.jpg", _file(root, "slide-2/waiting.jpg"))  # pending: not reported
    ledger.close()

    reader = Ledger(tmp_path / "state" / "ledger.sqlite")  # a reader finds ROOT in the file
    assert reader.root == root
    back = {p.file: p for p in reader.predictions()}
    assert set(back) == {"slide-1/a.jpg", "b.jpg", "slide-1/c.jpg"}
    for p in (good, flagged, bad):
        assert replace(back[p.file], path=p.path) == p
    assert back["b.jpg"].slide == root.name  # the report's rule: images in ROOT are ROOT's slide
    assert reader.counts() == {DONE: 2, ERROR: 1, PENDING: 1}


def test_one_row_per_path_whatever_happens_to_the_file(root: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", root)
    st = _file(root, "s/x.jpg", b"first")
    ledger.seen("s/x.jpg", st)
    ledger.record("s/x.jpg", st, "sha-first", _prediction(root, "s/x.jpg", "a"))
    st2 = _file(root, "s/x.jpg", b"second content")
    ledger.seen("s/x.jpg", st2)  # seen again while rewritten: the old outcome stays until the new one
    assert ledger.get("s/x.jpg").state == DONE and ledger.get("s/x.jpg").label == "a"
    ledger.record("s/x.jpg", st2, "sha-second", _prediction(root, "s/x.jpg", "b"))
    row = ledger.get("s/x.jpg")
    assert (row.sha256, row.label, row.size, row.state) == ("sha-second", "b", len(b"second content"), DONE)
    assert len(ledger.rows()) == 1 and len(ledger.predictions()) == 1

    # Moved away: kept with its outcome, out of the report; back unchanged: restored as it was.
    assert ledger.vanish(["s/x.jpg"]) == 1 and ledger.vanish(["s/x.jpg"]) == 0
    assert ledger.get("s/x.jpg").state == VANISHED and ledger.predictions() == []
    ledger.refresh("s/x.jpg", st2, ledger.get("s/x.jpg").outcome)
    assert ledger.get("s/x.jpg").state == DONE and len(ledger.predictions()) == 1

    # The same content elsewhere (a copy, a rename) takes the stored answer.
    assert ledger.done_with_hash("sha-second", "s" * 64) == "s/x.jpg"
    assert ledger.done_with_hash("sha-second", "another model") is None
    st3 = _file(root, "t/copy.jpg", b"second content")
    ledger.copy_outcome("s/x.jpg", "t/copy.jpg", st3, "sha-second")
    assert {p.file: p.label for p in ledger.predictions()} == {"s/x.jpg": "b", "t/copy.jpg": "b"}
    assert ledger.vanish_under("t") == ["t/copy.jpg"]
    assert [p.file for p in ledger.predictions()] == ["s/x.jpg"]


def test_failed_reads_are_counted_on_a_row_that_stays_unfinished(root: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite", root)
    st = _file(root, "bad.jpg", b"\xff\xd8 not really")
    ledger.seen("bad.jpg", st)
    ledger.failed_read("bad.jpg", 2)
    row = ledger.get("bad.jpg")
    # Still to do after a restart (an outcome would make the next start skip it), not reported.
    assert (row.state, row.attempts, row.outcome) == (PENDING, 2, None)
    assert ledger.predictions() == []


def test_a_state_file_of_another_folder_or_no_ledger_is_refused(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "ledger.sqlite"
    Ledger(state, root).close()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(LedgerError, match="belongs to the folder"):
        Ledger(state, other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot use the state file"):
        Ledger(junk, root)
    plain = tmp_path / "plain.sqlite"
    sqlite3.connect(plain).executescript("CREATE TABLE meta (key TEXT, value TEXT);")
    with pytest.raises(LedgerError, match="not a bcc watch ledger"):
        Ledger(plain)


def test_a_killed_writer_leaves_every_committed_outcome_whole(root: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of a stream of commits: the file opens, passes SQLite's integrity
    check, and holds every outcome that was reported committed, each complete."""
    state = tmp_path / "ledger.sqlite"
    script = textwrap.dedent(f"""
        import os, sys
        from datetime import UTC, datetime
        from pathlib import Path
        from bcc_desk.watch.ledger import Ledger
        from bcc_desk.prediction import Prediction
        root = Path({str(root)!r})
        ledger = Ledger(Path({str(state)!r}), root)
        (root / "x.jpg").write_bytes(b"x")
        st = os.stat(root / "x.jpg")
        i = 0
        while True:
            rel = f"s/{{i:06d}}.jpg"
            p = Prediction(path=root / rel, file=rel, slide="s", label="a", confidence=0.9, margin=0.8,
                           probabilities={{"a": 0.9, "b": 0.1}}, needs_review=False, review_reason="",
                           error=None, model="m", model_sha256="s", classified_at=datetime.now(UTC))
            ledger.record(rel, st, f"sha{{i}}", p)
            print(i, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    committed = -1
    for line in proc.stdout:
        committed = int(line)
        if committed >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed >= 300

    db = sqlite3.connect(state)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    rows = Ledger(state).predictions()
    names = {p.file for p in rows}
    assert {f"s/{i:06d}.jpg" for i in range(committed + 1)} <= names
    assert all(p.label == "a" and p.probabilities == {"a": 0.9, "b": 0.1} for p in rows)


def test_a_refused_state_file_is_not_left_open(root: Path, tmp_path: Path) -> None:
    """A daemon that refuses a state file (another folder's, no database, no ledger) lets go of
    it: the technician can move or delete it at once, and a long-lived app leaks no handle."""
    def held(path: Path) -> list[str]:
        fds = Path(f"/proc/{os.getpid()}/fd")
        return [t for fd in fds.iterdir() if (t := os.path.realpath(fd)).startswith(str(path))]

    state = tmp_path / "ledger.sqlite"
    Ledger(state, root).close()
    other = tmp_path / "other"
    other.mkdir()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    plain = tmp_path / "plain.sqlite"
    db = sqlite3.connect(plain)
    db.executescript("CREATE TABLE meta (key TEXT, value TEXT);")
    db.close()
    for path, folder in ((state, other), (junk, root), (plain, None)):
        with pytest.raises(LedgerError):
            Ledger(path, folder)
        assert held(path) == [], path
