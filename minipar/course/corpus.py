"""Run the corpus (planted/) and print the table: exercise -> contract -> caught / accepted -> seconds.

    python -m minipar.course.corpus [--only NAME,...] [--jsonl FILE]

Each wrong solution and each alternative is laid on a fresh copy of the reference (in a folder
called ``course``, so reports must find the student's file whatever the folder is called) and
checked as ``course check`` would. A wrong solution counts as caught when some check fails
and the report holds its ``expect`` words; an alternative counts as accepted when every check
passes. "seconds" are the wall times of the whole exercise check of the wrong solutions:
the median and the worst, on whatever machine runs this (the team's runs are on 2 shared cores).
Teacher-only: left out of the student version.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

CONTRACTS = {
    "layer_norm_backward": "dL/dx, dL/dw, dL/db vs central differences and vs autograd through elementary ops "
                           "(1e-11); float32 kept, by backward itself",
    "ring_allreduce": "point-to-point only; N-1 block messages per phase to one neighbour (either way), buffer "
                      "dtype; Traffic = what moved; Ssend; 4 buffers (large, n<N, unequal) in f64/f32; N=1,2,3,4,8",
    "recursive_doubling": "point-to-point only; <= lg P + 1 whole-buffer messages, partners r XOR 2^k; Ssend; "
                          "4 buffers in f64/f32; N=1,2,3,4,6,8",
    "process_grid": "coordinates and group members in Megatron order, every layout of N=1,2,4,8",
    "megatron_f_g": "f/g forward and backward; column/row layers' output, dL/dx, every weight and bias gradient "
                    "on every rank; sequence parallel",
    "vocab_parallel_loss": "loss and dL/dz vs one process, shard edges, logits + 1000; allreduces of <= 2 numbers per "
                           "row, never the logits",
    "data_parallel": "3 steps, state carried (a failure after a good step 1, or step 1's gradient left in step 2's, "
                     "named as such); every rank's gradients (biases too) at 1e-12; one allreduce per bucket, "
                     "whole; no collective before the last micro-batch; with overlap an allreduce starts before "
                     "backward ends; float32 kept; N=1,2,3,4,8",
    "one_f_one_b": "every micro-batch once, simulator accepts, stash <= min(p-s, m), bubble (p-1)/(m+p-1); "
                   "executor vs one process (2 steps) once the simulator accepts",
    "pipeline_messages": "2 steps, gradients vs one process, send buffers never written in flight, "
                         "recomputation on and off, float32 kept",
    "zero_1": "3 steps f64 + 2 steps f32 (dtype kept), state carried; rows of n = 1, N+1, 2N-1, 3N (N does not "
              "divide); parts and AdamW step vs one process; reduce-scatter + all-gather, never an allreduce of "
              "gradients",
    "zb_h1": "F, B, W each once, backward split, sends straight after their F/B; simulator accepts p=1,2,3,4,8, "
             "m=p..16; idle exactly p-1 per rank (T_F=T_B=T_W), bubble (p-1)/(3m+p-1); peak [min(p,m)]*p; "
             "executor vs one process on 2 and 4 ranks, recomputation off and on",
    "pairwise_alltoall": "point-to-point only; <= N-1 sends and receives, distinct partners, never itself (exactly "
                         "N-1 with no empty block); each block once, whole, buffer dtype; Traffic = what moved; "
                         "Ssend; 5 exchanges (equal, uneven, empty, large) f64/f32; send untouched; N=1,2,3,4,5,8",
    "ring_attention": "merge: 3 parts in a row from l=-inf vs softmax over the union, logits > +1000, in place, "
                      "f64 1e-12 / f32 kept; ring: output, dQ, dK, dV vs whole-sequence causal attention, contiguous "
                      "and zigzag, overlap off/on, N=1,2,3,4,8; N-1 whole K/V blocks to r+1 from r-1; Ssend",
}


def run_one(planted, wrong):
    """(ok, seconds, result) of one corpus entry."""
    from minipar.course.grader import check
    from minipar.course.planted import apply
    from minipar.course.student import copy_reference_tree, reference_root

    with tempfile.TemporaryDirectory(prefix="minipar-corpus-") as scratch:
        tree = Path(scratch) / "course" / "tree"
        copy_reference_tree(reference_root(), tree)
        apply(planted, tree)
        started = time.perf_counter()
        result = check(planted.exercise, tree, limit=planted.limit, out=lambda line: None)
        seconds = time.perf_counter() - started
    report = "\n".join(result.lines)
    ok = (result.passed < result.total and planted.expect in report) if wrong else result.passed == result.total
    return ok, seconds, result


def main(argv=None):
    from minipar.course.planted import ALTERNATIVES, PLANTED
    from minipar.course.registry import EXERCISES

    parser = argparse.ArgumentParser(prog="python -m minipar.course.corpus")
    parser.add_argument("--only", default="", help="comma-separated exercise names (default: all)")
    parser.add_argument("--jsonl", default=None, help="also write one JSON line per entry here")
    arguments = parser.parse_args(argv)
    names = arguments.only.split(",") if arguments.only else [exercise.name for exercise in EXERCISES]
    rows = {name: {"caught": 0, "wrong": 0, "accepted": 0, "alternatives": 0, "seconds": []} for name in names}
    log = open(arguments.jsonl, "w") if arguments.jsonl else None  # noqa: SIM115 - closed below
    for wrong, corpus in ((True, PLANTED), (False, ALTERNATIVES)):
        for planted in corpus:
            if planted.exercise not in rows:
                continue
            ok, seconds, result = run_one(planted, wrong)
            row = rows[planted.exercise]
            row["wrong" if wrong else "alternatives"] += 1
            row["caught" if wrong else "accepted"] += ok
            if wrong:
                row["seconds"].append(seconds)
            line = {"ok": ok, "wrong": wrong, "exercise": planted.exercise, "name": planted.name,
                    "seconds": round(seconds, 1), "status": result.status, "score": f"{result.passed}/{result.total}"}
            print(("ok   " if ok else "MISS ") + json.dumps(line, ensure_ascii=False), flush=True)
            if not ok:
                print("\n".join("      " + text for text in result.lines[:12]), flush=True)
            if log:
                log.write(json.dumps({**line, "report": result.lines}, ensure_ascii=False) + "\n")
    if log:
        log.close()
    print("\n| exercise | contract graded | wrong caught | alternatives accepted | failing check, s (median / worst) |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        times = row["seconds"] or [0.0]
        print(f"| {name} | {CONTRACTS.get(name, '')} | {row['caught']}/{row['wrong']} | "
              f"{row['accepted']}/{row['alternatives']} | {statistics.median(times):.0f} / {max(times):.0f} |")


if __name__ == "__main__":
    main()
