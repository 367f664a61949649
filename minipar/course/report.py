"""Turning the per-rank result files into the few lines a student reads.

One entry (a check on N ranks) reads as ``PASS  name [N=4]``, or as ``FAIL`` with the lowest
failing rank's message (the first wrong value, expected vs got, and its formula), or with the
ranks that did not finish. The last line is the score: ``3/4 checks passed``.
"""
import json
import re

from minipar.course.runner import abort_file, read_entry, stuck_file


def entry_outcome(result_dir, index, size, world_size):
    """(status, message) of entry ``index``, or None while it is still running."""
    outcomes = read_entry(result_dir, index, world_size)
    aborted = abort_file(result_dir, index)
    participants = range(min(size, world_size))
    if len(outcomes) < world_size and not aborted.exists():
        return None
    if any(o["status"] == "skipped" for o in outcomes.values()):
        return "skip", next(o["message"] for o in outcomes.values() if o["status"] == "skipped")
    failures = [(rank, outcomes[rank]) for rank in participants if rank in outcomes
                and outcomes[rank]["status"] not in ("pass", "idle")]
    lines = []
    if failures:
        rank, first = failures[0]
        same = [other for other, outcome in failures[1:] if outcome.get("message", "").split(": ", 1)[-1]
                == first.get("message", "").split(": ", 1)[-1]]
        message = first["message"] if first["message"].startswith("rank ") else f"rank {rank}: {first['message']}"
        line, *rest = message.splitlines()
        if first["status"] == "error" and same:
            line += f" (the same on {len(same)} other rank{'s' if len(same) > 1 else ''})"
        elif len(failures) > 1:
            line += f" (ranks {[r for r, _ in failures]} failed; the first is shown)"
        lines += [line, *rest]
        raised = [(other, outcome) for other, outcome in failures if outcome["status"] == "error"]
        if raised and first["status"] != "error":  # an exception elsewhere is the likelier cause
            lines.append(f"rank {raised[0][0]}: {raised[0][1]['message']}")
    if aborted.exists():
        record = json.loads(aborted.read_text())
        missing = record["missing"]
        if record["reason"].startswith("not run"):
            lines.append(record["reason"])
        if missing:
            why = {"time limit": f"within the {record['limit']:g} s limit",
                   "a rank failed while others waited": "after another rank failed"}.get(record["reason"],
                                                                                           record["reason"])
            places = {rank: stuck_file(result_dir, index, rank).read_text() for rank in missing
                      if stuck_file(result_dir, index, rank).exists()}
            if record["reason"] == "time limit" and len(places) == len(missing) > 1 and len(set(places.values())) == 1:
                lines.append(f"deadlock: ranks {_ranks(missing)} all wait at {places[missing[0]]} (did not finish "
                             f"{why}). Sends are synchronous here, as they are in a real run once a message "
                             "outgrows MPI's eager limit: a ring in which every rank sends first waits forever; "
                             "pair each send with its receive (Sendrecv, or Isend/Irecv then Wait)")
            else:
                cause = ("" if record.get("crashed") else
                         ": stuck waiting for a message that no rank sends, or for a rank that failed")
                lines.append(f"rank{'s' if len(missing) > 1 else ''} {_ranks(missing)} did not finish {why}{cause}")
                for rank in missing[:3]:
                    if rank in places:
                        lines.append(f"rank {rank} was at {places[rank]}")
    if not lines:
        return "pass", ""
    return "fail", "\n".join(lines)


def entry_kind(result_dir, index, size, world_size):
    """What happened in entry ``index``: "pass", "fail" (a wrong value or a broken contract), "error" (the
    code raised), "hang" (ranks did not finish in time), "skip", or None while it runs."""
    outcome = entry_outcome(result_dir, index, size, world_size)
    if outcome is None:
        return None
    if outcome[0] in ("pass", "skip"):
        return outcome[0]
    aborted = abort_file(result_dir, index)
    statuses = {o["status"] for o in read_entry(result_dir, index, world_size).values()}
    if aborted.exists() and json.loads(aborted.read_text()).get("kind"):
        return json.loads(aborted.read_text())["kind"]
    if aborted.exists() and json.loads(aborted.read_text()).get("crashed"):
        return "error"
    if aborted.exists() and json.loads(aborted.read_text())["reason"] == "time limit":
        return "hang"
    if "error" in statuses:
        return "error"
    if "fail" in statuses:
        return "fail"
    return "hang" if aborted.exists() else "fail"


def _ranks(ranks):
    """``0–3`` for a run of ranks, else ``0, 2, 5``."""
    if len(ranks) > 2 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}–{ranks[-1]}"
    return ", ".join(map(str, ranks))


def entry_lines(result_dir, index, items, world_size):
    label, _, size = items[index]
    outcome = entry_outcome(result_dir, index, size, world_size)
    if outcome is None:
        return []
    status, message = outcome
    heading = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[status]
    return [f"{heading}  {label}"] + [f"      {line}" for line in message.splitlines()]


def passed_entries(result_dir, items, world_size):
    return sum(1 for index, (_, _, size) in enumerate(items)
               if (entry_outcome(result_dir, index, size, world_size) or ("",))[0] == "pass")


def score_line(result_dir, items, world_size):
    return f"{passed_entries(result_dir, items, world_size)}/{len(items)} checks passed"


_RANK_COUNTS = re.compile(r" \((the same on \d+ other ranks?|ranks \[[0-9, ]+\] failed; the first is shown)\)")


class Compactor:
    """Shortens a failure whose explanation repeats the previous entry's to "(the same as above)"."""

    def __init__(self):
        self.previous = None

    def __call__(self, lines):
        details = [_RANK_COUNTS.sub("", line) for line in lines[1:]]
        if details and details == self.previous:
            return [lines[0], "      (the same as above)"]
        self.previous = details or None
        return lines
