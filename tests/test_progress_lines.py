"""Progress shown as plain lines when the console is not a terminal (a log file, CI, docker logs): rich would
draw its bars only once, at the end, so an hour-long search would look hung."""

from __future__ import annotations

import re

from flows.cli.runtime import _plain_lines


def test_events_become_timestamped_lines_without_repeats():
    lines: list[str] = []
    on_event = _plain_lines(lines.append)
    on_event("stage", {"name": "search"})
    for done in (0, 1, 1, 2):  # a repeated count (e.g. a resumed candidate) prints once
        on_event("search", {"done": done, "total": 2, "counters": {"generated": 5, "accepted": done},
                            "best": 0.5 if done else None, "ce": 0.4})
    on_event("warning", {"message": "nothing accepted for 40 candidates"})
    for done in range(1, 101):  # one line per tenth of a re-training, and again for the next one
        on_event("retrain", {"done": done, "total": 100})
    on_event("retrain", {"done": 1, "total": 100})
    on_event("stage", {"name": "done"})
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines), lines
    text = [line[9:] for line in lines]
    assert text[0] == "stage search"
    assert text[1:4] == ["proxy evaluations 0/2  generated=5, accepted=0",
                         "proxy evaluations 1/2  best=50.0% (CE 40.0%), generated=5, accepted=1",
                         "proxy evaluations 2/2  best=50.0% (CE 40.0%), generated=5, accepted=2"]
    assert text[4] == "warning: nothing accepted for 40 candidates"
    retrain = [t for t in text if t.startswith("re-training")]
    assert retrain[0] == "re-training iteration 1/100" and len(retrain) == 12 and retrain[-1].endswith(" 1/100")
    assert not any("done" in t for t in text)
