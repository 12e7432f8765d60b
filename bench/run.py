"""edge's benchmark (DESIGN.md section 9): prints figures and the ratios the targets name.

Absolute numbers drift on a shared machine; the ratios are measured in one run, side by
side, and each measurement carries the share of the machine other processes used
meanwhile ("others %"), so a disturbed figure can be recognised.

    python bench/run.py                  # W1, added latency, W2, W3, W4, W5
    python bench/run.py --peers          # ... and thumbor and ipx (installed on demand)
    python bench/run.py --only w1,w4 --seconds 5
    python bench/run.py --write-results  # also refresh the figures in bench/RESULTS.md

Everything runs on loopback; every load is bounded in time (and, for the Python
generators, in requests); scratch files live in bench/.scratch (not committed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ceiling
import harness
import peers
from harness import (
    HOST,
    SCRATCH,
    LoadResult,
    Originals,
    OthersMeter,
    Server,
    closed_loop,
    cores,
    edge_server,
    http_get,
    metric,
    scrape_metrics,
)

WORKLOADS = ("w1", "latency", "w2", "w3", "w4", "w5")
W1_QUERY = "width=720&height=588&format=jpeg&quality=80"
W1_SIZE = (720, 588)
W2_INPUTS = ("png", "webp", "avif")
W2_OUTPUTS = ("jpeg", "webp", "avif")
W2_MIN_RESPONSES = 10
W5_QUERY = "width=2000&height=2000&format=jpeg&quality=80"
RESULTS = harness.BENCH / "RESULTS.md"
BLOCK_BEGIN = "<!-- bench-figures:begin -->"
BLOCK_END = "<!-- bench-figures:end -->"
MiB = 1024 * 1024


# --------------------------------------------------------------------------- report


@dataclass
class Target:
    name: str
    value: float | None
    goal: str
    #: value -> met
    test: Callable[[float], bool]
    unit: str = ""
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        return "met" if self.test(self.value) else "MISSED"


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    sections: list[Section] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def section(self, title: str, header: list[str]) -> Section:
        section = Section(title, header)
        self.sections.append(section)
        return section

    def markdown(self) -> str:
        lines: list[str] = []
        for section in self.sections:
            lines += [f"### {section.title}", ""]
            lines += _table(section.header, section.rows)
            lines += [f"- {note}" for note in section.notes]
            lines.append("")
        lines += ["### Targets", ""]
        rows = [
            [
                target.name,
                target.goal,
                "-" if target.value is None else f"{target.value:.3g}{target.unit}",
                target.status,
                target.note,
            ]
            for target in self.targets
        ]
        lines += _table(["target", "goal", "measured", "status", "by how much"], rows)
        return "\n".join(lines).rstrip() + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(cell) for cell in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(row) for row in rows
    ]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def shortfall(value: float | None, goal: float, *, higher_is_better: bool = True) -> str:
    if value is None or not goal:
        return ""
    delta = value / goal - 1
    if higher_is_better:
        return f"{abs(delta) * 100:.0f}% {'above' if delta >= 0 else 'below'} the goal"
    return f"{abs(delta) * 100:.0f}% {'under' if delta <= 0 else 'over'} the goal"


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    args: argparse.Namespace
    originals: Originals
    report: Report = field(default_factory=Report)
    w1_edge_rps: float | None = None

    @property
    def seconds(self) -> float:
        return float(self.args.seconds)

    def load(self, server: Server, paths: Sequence[str], seconds: float) -> LoadResult:
        return closed_loop(
            server.base,
            paths,
            connections=self.args.connections,
            seconds=seconds,
            force_python=self.args.python_load,
        )

    def warm(self, server: Server, paths: Sequence[str]) -> None:
        self.load(server, paths, max(1.0, self.args.warmup))


def _check_image(
    base: str, path: str, want_type: str, want_size: tuple[int, int] | None
) -> tuple[str, int]:
    """GET one response: (problem or "", body bytes)."""
    try:
        status, headers, body = http_get(base + path, timeout=120)
    except OSError as error:
        return f"no answer: {error}", 0
    content_type = headers.get("Content-Type", headers.get("content-type", ""))
    if status != 200:
        return f"status {status}: {body[:120]!r}", len(body)
    if not content_type.startswith(want_type):
        return f"content type {content_type}", len(body)
    size = harness.image_size(body)
    if want_size is not None and size != want_size:
        return f"size {size} instead of {want_size}", len(body)
    return "", len(body)


def _cpu_percent(pids: Sequence[int], before: dict[int, float], seconds: float) -> float:
    used = sum(harness.process_cpu_seconds(pid) - before.get(pid, 0.0) for pid in pids)
    return 100 * used / seconds if seconds else 0.0


def _cpu_snapshot(pids: Sequence[int]) -> dict[int, float]:
    return {pid: harness.process_cpu_seconds(pid) for pid in pids}


def _stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    means = {}
    for stage in ("fetch", "queue", "transform"):
        total = metric(after, "edge_stage_duration_seconds_sum", stage=stage) - metric(
            before, "edge_stage_duration_seconds_sum", stage=stage
        )
        count = metric(after, "edge_stage_duration_seconds_count", stage=stage) - metric(
            before, "edge_stage_duration_seconds_count", stage=stage
        )
        if count:
            means[stage] = 1000 * total / count
    return means


# --------------------------------------------------------------------------- W1


def w1_paths(run: Run) -> list[str]:
    return [f"/{key}?{W1_QUERY}" for key in run.originals.w1]


@dataclass
class Measured:
    """One contender's figures; with rounds, the best round's (and every round's rate)."""

    label: str
    rps: float
    p50_ms: float
    p99_ms: float | None
    #: CPU milliseconds per successful response (server) or per transform (ceiling)
    cpu_ms: float
    others: float
    note: str = ""
    rounds: list[float] = field(default_factory=list)

    def best_of(self, other: Measured | None) -> Measured:
        if other is None:
            self.rounds = [self.rps]
            return self
        rounds = [*other.rounds, self.rps]
        best = self if self.rps > other.rps else other
        best.rounds = rounds
        best.cpu_ms = min(self.cpu_ms, other.cpu_ms)
        return best

    def row(self) -> list[str]:
        rate = fmt_rate(self.rps)
        if len(self.rounds) > 1:
            rate += " (" + ", ".join(fmt_rate(value) for value in self.rounds) + ")"
        return [
            self.label,
            rate,
            f"{self.p50_ms:.1f}",
            "" if self.p99_ms is None else f"{self.p99_ms:.1f}",
            f"{self.cpu_ms:.3g}",
            f"{self.others:.0f}",
            self.note,
        ]


def _server_once(
    run: Run,
    server: Server,
    paths: Sequence[str],
    label: str,
    connections: int | None = None,
    *,
    rivals: Sequence[Server] = (),
) -> tuple[Measured, LoadResult]:
    """One closed-loop measurement of a running server, with its CPU per response.
    ``rivals``: servers left running beside it, first given time to finish what the
    previous round left them (a peer still rendering would slow edge down unseen: its
    CPU counts as ours, not as others')."""
    for rival in rivals:
        harness.wait_idle(rival.all_pids())
    pids = server.all_pids()
    harness.wait_idle(pids)
    cpu_before = _cpu_snapshot(pids)
    others = OthersMeter()
    result = closed_loop(
        server.base,
        paths,
        connections=connections or run.args.connections,
        seconds=run.seconds,
        force_python=run.args.python_load,
    )
    others_pct = others.percent()
    used = sum(harness.process_cpu_seconds(pid) - cpu_before.get(pid, 0.0) for pid in pids)
    ok = result.requests - result.non_2xx
    measured = Measured(
        label=label,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_ms=1000 * used / ok if ok else float("nan"),
        others=others_pct,
        note=f"non-2xx {result.non_2xx}, errors {result.errors}"
        if result.non_2xx or result.errors
        else "",
    )
    return measured, result


CEILING_LABELS = {
    "edge": "ceiling: edge.imaging probe/plan/transform",
    "thumbnail": "ceiling: pyvips thumbnail_buffer + jpegsave",
}


def _ceiling_once(run: Run, variant: str, mode: str) -> tuple[Measured, ceiling.CeilingResult]:
    log(f"W1 ceiling: {variant} x {cores()} {mode} ...")
    sources = [harness.ORIGIN / key for key in run.originals.w1]
    others = OthersMeter()
    found = ceiling.measure(variant, mode, cores(), W1_QUERY, sources, run.seconds)
    measured = Measured(
        label=f"{CEILING_LABELS[variant]}, {cores()} {mode}",
        rps=found.rps,
        p50_ms=found.p50_ms,
        p99_ms=None,
        cpu_ms=found.cpu_ms_per_op,
        others=others.percent(),
        note=f"{found.output_bytes} B, {found.output_size[0]}x{found.output_size[1]}",
    )
    return measured, found


def run_w1(run: Run) -> None:
    paths = w1_paths(run)
    rounds = max(1, run.args.rounds)
    section = run.report.section(
        "W1 uncached (64 keys -> 720x588 JPEG q80)",
        ["what", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "others %", "notes"],
    )
    edge_best: Measured | None = None
    ceilings: dict[tuple[str, str], Measured] = {}
    stages: dict[str, float] = {}
    coalesced = 0.0
    with edge_server("edge-w1", {"EDGE_CACHE": "none"}) as edge:
        problem, size = _check_image(edge.base, paths[0], "image/jpeg", W1_SIZE)
        if problem:
            section.notes.append(f"edge's W1 response is wrong: {problem}")
        run.warm(edge, paths)
        for index in range(rounds):
            log(f"W1 uncached: edge (round {index + 1} of {rounds}) ...")
            before = scrape_metrics(edge.base)
            measured, _ = _server_once(
                run, edge, paths, f"edge ({run.args.connections} conns, {result_tool(run)})"
            )
            after = scrape_metrics(edge.base)
            if edge_best is None or measured.rps > edge_best.rps:
                stages = _stage_means(before, after)
            coalesced += metric(after, "edge_coalesced_requests_total") - metric(
                before, "edge_coalesced_requests_total"
            )
            edge_best = measured.best_of(edge_best)
            variants = [("edge", "processes"), ("thumbnail", "processes")]
            if index == 0:
                variants.append(("edge", "threads"))
            for variant, mode in variants:
                found, _ = _ceiling_once(run, variant, mode)
                ceilings[variant, mode] = found.best_of(ceilings.get((variant, mode)))
    assert edge_best is not None
    tuned = _w1_tuned(run, paths, rounds)
    stage_text = ", ".join(f"{name} {ms:.1f} ms" for name, ms in stages.items())
    edge_best.note = "; ".join(
        part
        for part in (
            f"{size} B/response",
            edge_best.note,
            f"mean stages: {stage_text}",
            f"coalesced {coalesced:.0f}" if coalesced else "",
        )
        if part
    )
    run.w1_edge_rps = edge_best.rps
    section.rows.append(edge_best.row())
    section.rows.extend(found.row() for found in ceilings.values())
    best = max(ceilings.values(), key=lambda found: found.rps)
    value = ratio(edge_best.rps, best.rps)
    cpu_value = ratio(best.cpu_ms, edge_best.cpu_ms)
    section.rows.append(["edge / ceiling (best of the above)", fmt_ratio(value)] + [""] * 5)
    section.rows.append(
        ["CPU-normalised: ceiling CPU per op / edge CPU per request", fmt_ratio(cpu_value)]
        + [""] * 5
    )
    section.rows.append(tuned.row())
    section.rows.append(
        [
            f"{TUNED_LABEL} / ceiling (reported, not the target)",
            fmt_ratio(ratio(tuned.rps, best.rps)),
        ]
        + [""] * 5
    )
    section.notes.append(
        f"{TUNED_LABEL}: one transform more than the default (cores), what a host that only "
        "transforms may tune; it fills cores left idle while a transform waits on libvips' "
        "hand-overs or the GIL, at the cost of more contention (see the analysis)"
    )
    if rounds > 1:
        section.notes.append(
            f"best of {rounds} interleaved rounds (every round's rate in brackets)"
        )
    section.notes.append(
        "CPU ms/req: the server process's CPU (every thread) per 2xx response, or the "
        "ceiling workers' CPU per transform; it hardly moves when other processes share "
        "the machine, unlike req/s"
    )
    run.report.raw["w1"] = {
        "edge": edge_best.__dict__,
        "edge_tuned": tuned.__dict__,
        "ceilings": {f"{v}/{m}": found.__dict__ for (v, m), found in ceilings.items()},
        "stages_ms": stages,
    }
    run.report.targets.append(
        Target(
            "W1 edge / raw ceiling", value, ">= 0.9", lambda v: v >= 0.9, note=shortfall(value, 0.9)
        )
    )
    run.report.targets.append(
        Target(
            "W1 (CPU-normalised) edge / ceiling",
            cpu_value,
            ">= 0.9 (diagnostic)",
            lambda v: v >= 0.9,
            note=shortfall(cpu_value, 0.9),
        )
    )


TUNED_LABEL = "edge, EDGE_MAX_CONCURRENCY = cores + 1"


def _w1_tuned(run: Run, paths: Sequence[str], rounds: int) -> Measured:
    """W1 again with one transform slot more than the default: what tuning gets here."""
    env = {"EDGE_CACHE": "none", "EDGE_MAX_CONCURRENCY": str(cores() + 1)}
    best: Measured | None = None
    with edge_server("edge-w1-tuned", env) as edge:
        run.warm(edge, paths)
        for index in range(rounds):
            log(f"W1 uncached: {TUNED_LABEL} (round {index + 1} of {rounds}) ...")
            measured, _ = _server_once(run, edge, paths, TUNED_LABEL)
            best = measured.best_of(best)
    assert best is not None
    return best


def result_tool(run: Run) -> str:
    return "wrk" if harness.have_wrk() and not run.args.python_load else "python"


# --------------------------------------------------------------------------- latency


def run_latency(run: Run) -> None:
    """p50 of sequential requests minus p50 of the same transform in-process; with rounds,
    the two alternate and each keeps its lowest p50 (interference only adds)."""
    seconds = max(3.0, run.seconds / 2)
    paths = w1_paths(run)
    sources = [harness.ORIGIN / key for key in run.originals.w1]
    section = run.report.section(
        "Added latency (one request at a time, W1 transform)",
        ["what", "p50 ms", "p99 ms", "others %", "rounds (p50 ms)"],
    )
    served: list[tuple[float, float, float]] = []
    raw: list[tuple[float, float, float]] = []
    with edge_server("edge-latency", {"EDGE_CACHE": "none"}) as edge:
        closed_loop(
            edge.base, paths[:4], connections=1, seconds=1, force_python=run.args.python_load
        )
        for index in range(max(1, run.args.rounds)):
            log(f"added latency: sequential requests vs in-process (round {index + 1}) ...")
            others = OthersMeter()
            single = closed_loop(
                edge.base, paths, connections=1, seconds=seconds, force_python=run.args.python_load
            )
            served.append((single.p50_ms, single.p99_ms, others.percent()))
            others = OthersMeter()
            found = ceiling.sequential_latency("edge", W1_QUERY, sources, seconds)
            ordered = sorted(found.latencies)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000 if ordered else 0
            raw.append((found.p50_ms, p99, others.percent()))
    best_served, best_raw = min(served), min(raw)

    def rounds_text(values: list[tuple[float, float, float]]) -> str:
        return ", ".join(f"{value[0]:.1f}" for value in values)

    section.rows += [
        [
            "edge over HTTP (1 connection)",
            f"{best_served[0]:.1f}",
            f"{best_served[1]:.1f}",
            f"{best_served[2]:.0f}",
            rounds_text(served),
        ],
        [
            "edge.imaging in-process (1 thread)",
            f"{best_raw[0]:.1f}",
            f"{best_raw[1]:.1f}",
            f"{best_raw[2]:.0f}",
            rounds_text(raw),
        ],
    ]
    added = best_served[0] - best_raw[0]
    section.rows.append(["added by the service (p50 difference)", f"{added:.1f}", "", "", ""])
    run.report.raw["latency"] = {"served": served, "raw": raw}
    run.report.targets.append(
        Target(
            "added latency (p50)",
            added,
            "<= 5 ms",
            lambda v: v <= 5,
            unit=" ms",
            note=f"{abs(5 - added):.1f} ms {'under' if added <= 5 else 'over'} the goal",
        )
    )


# --------------------------------------------------------------------------- W2


def w2_edge_paths(run: Run, fmt_in: str, fmt_out: str) -> list[str]:
    return [f"/{key}?width=512&height=512&format={fmt_out}" for key in run.originals.w2[fmt_in]]


def _w2_expected(fmt_out: str) -> str:
    return f"image/{fmt_out}"


def w2_measure(
    run: Run, server: Server, path_for: Callable[[str, str], list[str]]
) -> dict[tuple[str, str], tuple[float | None, int, str]]:
    """req/s, body bytes and any problem for each (input, output) pair."""
    seconds = max(4.0, run.seconds / 2)
    found: dict[tuple[str, str], tuple[float | None, int, str]] = {}
    for fmt_in in W2_INPUTS:
        for fmt_out in W2_OUTPUTS:
            paths = path_for(fmt_in, fmt_out)
            harness.wait_idle(server.all_pids())
            problem, size = _check_image(server.base, paths[0], _w2_expected(fmt_out), None)
            if problem:
                found[fmt_in, fmt_out] = (None, size, problem)
                continue
            closed_loop(
                server.base,
                paths,
                connections=run.args.connections,
                seconds=1,
                force_python=run.args.python_load,
            )
            result = run.load(server, paths, seconds)
            if result.requests < W2_MIN_RESPONSES:
                # too few answers in the window for a rate: once more, three times longer
                harness.wait_idle(server.all_pids())
                result = run.load(server, paths, min(30.0, 3 * seconds))
            note = f"non-2xx {result.non_2xx}" if result.non_2xx or result.errors else ""
            found[fmt_in, fmt_out] = (result.rps, size, note)
    return found


def run_w2(run: Run) -> dict[tuple[str, str], tuple[float | None, int, str]]:
    log("W2 formats: edge ...")
    with edge_server("edge-w2", {"EDGE_CACHE": "none"}) as edge:
        others = OthersMeter()
        found = w2_measure(run, edge, lambda i, o: w2_edge_paths(run, i, o))
        run.report.raw["w2_edge_others"] = others.percent()
    run.report.raw["w2_edge"] = {f"{i}->{o}": v[0] for (i, o), v in found.items()}
    return found


def report_w2(
    run: Run,
    edge: dict[tuple[str, str], tuple[float | None, int, str]],
    peer_results: dict[str, dict[tuple[str, str], tuple[float | None, int, str]]],
) -> None:
    header = ["input -> output", "edge req/s", "edge bytes"]
    for name in peer_results:
        header += [f"{name} req/s", f"{name} bytes", f"edge/{name}"]
    header.append("notes")
    section = run.report.section("W2 formats (-> fit inside 512x512)", header)
    others = run.report.raw.get("w2_edge_others")
    if others is not None:
        section.notes.append(f"others used {others:.0f}% of the machine during edge's W2 runs")
    for (fmt_in, fmt_out), (rps, size, note) in edge.items():
        row = [f"{fmt_in} -> {fmt_out}", fmt_rate(rps), str(size)]
        notes = [f"edge: {note}"] if note else []
        for name, results in peer_results.items():
            peer_rps, peer_size, peer_note = results.get((fmt_in, fmt_out), (None, 0, "n/a"))
            row += [fmt_rate(peer_rps), str(peer_size), fmt_ratio(ratio(rps, peer_rps))]
            if peer_note:
                notes.append(f"{name}: {peer_note}")
        row.append("; ".join(notes))
        section.rows.append(row)


# --------------------------------------------------------------------------- peers


def run_peers(
    run: Run, w2_edge: dict[tuple[str, str], tuple[float | None, int, str]] | None
) -> dict[str, dict[tuple[str, str], tuple[float | None, int, str]]]:
    """W1 against each peer, edge and the peer measured in alternation; then W2 for each."""
    w2_results: dict[str, dict[tuple[str, str], tuple[float | None, int, str]]] = {}
    section = run.report.section(
        "Peers, W1 (same 64 originals, 720x588 JPEG q80, same load generator)",
        ["what", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "others %", "notes"],
    )
    goals = {"thumbor": 1.3, "ipx": 1.05}
    edge_paths = w1_paths(run)
    rounds = max(1, run.args.rounds)
    with edge_server("edge-peers", {"EDGE_CACHE": "none"}) as edge:
        run.warm(edge, edge_paths)
        for make in (peers.thumbor, peers.ipx):
            name = make.__name__
            log(f"peer {name} ...")
            try:
                peer = make()
                peer.server.start()
            except (peers.PeerUnavailable, RuntimeError, OSError) as error:
                section.rows.append([name, "-", "-", "-", "-", "-", f"not run: {error}"])
                run.report.targets.append(
                    Target(
                        f"W1 edge / {name}",
                        None,
                        f">= {goals[name]}",
                        lambda v: True,
                        note=f"{name} could not run here",
                    )
                )
                continue
            try:
                if "w1" in run.args.workloads:
                    _peer_w1(run, section, edge, peer, goals[name], rounds)
                if w2_edge is not None:
                    log(f"W2 formats: {name} ...")
                    w2_results[name] = w2_measure(
                        run,
                        peer.server,
                        lambda i, o, peer=peer: [
                            peer.w2_path(key, o) for key in run.originals.w2[i]
                        ],
                    )
            finally:
                peer.server.stop()
    section.notes.append(
        f"edge and each peer are measured in alternation, best of {rounds} round(s) each; "
        "the edge rows here come from these paired runs, not from the W1 table"
    )
    section.notes.append(
        "thumbor: --processes = cores, file loader, no storage, no result storage, "
        "PROGRESSIVE_JPEG off, AVIF_SPEED 9; URL /unsafe/fit-in/WxH/filters:quality(Q):"
        "format(F)/key (fit-in = edge's fit=inside)"
    )
    section.notes.append(
        "ipx 3 (sharp) as shipped, one node process (sharp's libuv pool uses every core); "
        "URL /s_WxH,fit_inside,f_F,q_Q/key; ipx cannot set sharp's AVIF effort (sharp's "
        "default 4 against edge's 0), so its AVIF figures are not like for like"
    )
    return w2_results


def _peer_w1(
    run: Run, section: Section, edge: Server, peer: peers.Peer, goal: float, rounds: int
) -> None:
    name = peer.name
    paths = [peer.w1_path(key) for key in run.originals.w1]
    problem, size = _check_image(peer.server.base, paths[0], "image/jpeg", W1_SIZE)
    run.warm(peer.server, paths)
    edge_best: Measured | None = None
    peer_best: Measured | None = None
    for index in range(rounds):
        log(f"W1: edge vs {name} (round {index + 1} of {rounds}) ...")
        found, _ = _server_once(run, edge, w1_paths(run), f"edge (vs {name})", rivals=[peer.server])
        edge_best = found.best_of(edge_best)
        found, _ = _server_once(run, peer.server, paths, name, rivals=[edge])
        peer_best = found.best_of(peer_best)
    assert edge_best is not None
    assert peer_best is not None
    peer_best.note = "; ".join(
        part
        for part in (
            f"{size} B/response",
            peer_best.note,
            f"WRONG OUTPUT: {problem}" if problem else "",
        )
        if part
    )
    value = ratio(edge_best.rps, peer_best.rps)
    cpu_value = ratio(peer_best.cpu_ms, edge_best.cpu_ms)
    section.rows += [edge_best.row(), peer_best.row()]
    section.rows.append([f"edge / {name}", fmt_ratio(value)] + [""] * 5)
    section.rows.append(
        [f"CPU-normalised: {name} CPU per response / edge's", fmt_ratio(cpu_value)] + [""] * 5
    )
    run.report.raw[f"w1_{name}"] = {"edge": edge_best.__dict__, name: peer_best.__dict__}
    run.report.targets.append(
        Target(
            f"W1 edge / {name}",
            value,
            f">= {goal}",
            lambda v, goal=goal: v >= goal,
            note=shortfall(value, goal),
        )
    )


# --------------------------------------------------------------------------- W3


def run_w3(run: Run) -> None:
    log("W3 cache hits: edge (EDGE_CACHE=memory) vs a bare aiohttp handler ...")
    section = run.report.section(
        "W3 cache hits (one URL, warm)",
        ["what", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "others %", "notes"],
    )
    import edge.settings

    workers = "EDGE_WORKERS" in {var.name for var in getattr(edge.settings, "VARS", ())}
    if workers:
        section.notes.append("edge runs with EDGE_WORKERS=1 (one process), as the bare server")
    else:
        section.notes.append("EDGE_WORKERS is not implemented yet: edge runs as one process")
    path = f"/{run.originals.w1[0]}?{W1_QUERY}"
    body_file = SCRATCH / "w3-body.jpg"
    connections = run.args.hit_connections
    env = {"EDGE_CACHE": "memory"} | ({"EDGE_WORKERS": "1"} if workers else {})
    with edge_server("edge-w3", env) as edge:
        http_get(edge.base + path, timeout=60)
        status, headers, body = http_get(edge.base + path, timeout=60)
        cache = headers.get("X-Edge-Cache", "?")
        if status != 200 or cache != "hit":
            section.notes.append(
                f"edge's second request for the URL answered {status} with X-Edge-Cache: "
                f"{cache} (not a hit), so W3 is not measured"
            )
            run.report.targets.append(
                Target(
                    "W3 edge hits / bare aiohttp",
                    None,
                    ">= 0.8",
                    lambda v: True,
                    note=f"no cache hit (X-Edge-Cache: {cache})",
                )
            )
            return
        body_file.write_bytes(body)
        headers_file = SCRATCH / "w3-headers.json"
        headers_file.write_text(json.dumps(headers))
        port = harness.free_port()
        bare = Server(
            name="bare",
            argv=[
                sys.executable,
                str(harness.BENCH / "bare_server.py"),
                "--port",
                str(port),
                "--body",
                str(body_file),
                "--headers",
                str(headers_file),
            ],
            port=port,
        )
        with bare:
            best: dict[str, Measured] = {}
            for index in range(max(1, run.args.rounds)):
                for name, server, label in (
                    ("edge", edge, "edge (memory tier)"),
                    ("bare", bare, "bare aiohttp handler"),
                ):
                    log(f"W3: {name} (round {index + 1}) ...")
                    measured = _hits_once(run, server, path, label, connections)
                    best[name] = measured.best_of(best.get(name))
    section.rows.extend(found.row() for found in best.values())
    spread: Measured | None = None
    if workers and cores() > 1:
        log(f"W3: edge with EDGE_WORKERS={cores()} ...")
        with edge_server("edge-w3-workers", {**env, "EDGE_WORKERS": str(cores())}) as edge:
            http_get(edge.base + path, timeout=60)
            label = f"edge, EDGE_WORKERS={cores()}"
            spread = _hits_once(run, edge, path, label, connections)
        section.rows.append(spread.row())
    value = ratio(best["edge"].rps, best["bare"].rps)
    cpu_value = ratio(best["bare"].cpu_ms, best["edge"].cpu_ms)
    section.rows.append(["edge / bare", fmt_ratio(value)] + [""] * 5)
    spread_value = ratio(spread.rps, best["bare"].rps) if spread is not None else None
    if spread is not None:
        section.rows.append(
            [f"edge EDGE_WORKERS={cores()} / bare (one process)", fmt_ratio(spread_value)]
            + [""] * 5
        )
    section.rows.append(
        ["CPU-normalised: bare CPU per response / edge's", fmt_ratio(cpu_value)] + [""] * 5
    )
    section.notes.append(
        f"edge's response: {len(body)} B; the bare handler sends the same body and "
        "headers (no middleware, metrics or logging)"
    )
    run.report.raw["w3"] = {name: found.__dict__ for name, found in best.items()}
    run.report.targets.append(
        Target(
            "W3 edge hits / bare aiohttp",
            value,
            ">= 0.8",
            lambda v: v >= 0.8,
            note=shortfall(value, 0.8),
        )
    )
    if spread is not None:
        run.report.targets.append(
            Target(
                f"W3 edge (EDGE_WORKERS={cores()}) hits / bare aiohttp (one process)",
                spread_value,
                ">= 0.8 (EDGE_WORKERS as the hit lever)",
                lambda v: v >= 0.8,
                note=shortfall(spread_value, 0.8),
            )
        )


def _hits_once(run: Run, server: Server, path: str, label: str, connections: int) -> Measured:
    """Warm ``server`` on the one W3 URL for the warm-up time, then measure it."""
    closed_loop(
        server.base,
        [path],
        connections=connections,
        seconds=max(1.0, run.args.warmup),
        force_python=run.args.python_load,
    )
    measured, _ = _server_once(run, server, [path], f"{label}, {connections} conns", connections)
    return measured


# --------------------------------------------------------------------------- W4


def run_w4(run: Run) -> None:
    section = run.report.section(
        "W4 overload (open loop at 4x W1 capacity, EDGE_QUEUE_SIZE small)",
        ["figure", "value", "notes"],
    )
    queue = str(run.args.w4_queue)
    paths = w1_paths(run)
    capacity = run.w1_edge_rps
    if run.args.w4_rate:
        capacity = run.args.w4_rate / 4
        section.notes.append(f"offered rate fixed by --w4-rate at {run.args.w4_rate:.1f} req/s")
    if capacity is None:
        log("W4: measuring W1 capacity first ...")
        with edge_server("edge-w4-capacity", {"EDGE_CACHE": "none"}) as edge:
            run.warm(edge, paths)
            capacity = run.load(edge, paths, max(3.0, run.seconds / 2)).rps
        section.notes.append(f"W1 capacity measured for W4 alone: {capacity:.1f} req/s")
    with edge_server("edge-w4", {"EDGE_CACHE": "none", "EDGE_QUEUE_SIZE": queue}) as edge:
        rate = 4 * capacity
        log(f"W4 overload: {rate:.0f} req/s open loop for {run.seconds:.0f}s ...")
        paths_file = SCRATCH / "w4-paths.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        before = scrape_metrics(edge.base)
        cpu_before = _cpu_snapshot([edge.pid])
        others = OthersMeter()
        data = harness.run_loadgen(
            [
                "open",
                "--base",
                edge.base,
                "--paths",
                str(paths_file),
                "--rate",
                f"{rate:.3f}",
                "--seconds",
                str(run.seconds),
                "--timeout",
                "30",
            ],
            timeout=run.seconds + 120,
        )
        others_pct = others.percent()
        edge_cpu = _cpu_percent([edge.pid], cpu_before, float(data["seconds"]))
        after = scrape_metrics(edge.base)
    window = int(data["sent"]) / rate if rate else 0.0
    statuses: dict[str, int] = data["statuses"]
    ok = statuses.get("200", 0)
    shed = statuses.get("503", 0)
    goodput = ok / window if window else 0.0
    latency = data["latency_ms"]
    shed_latency = latency.get("503", {})
    ok_latency = latency.get("200", {})
    reasons = {
        reason: metric(after, "edge_load_shed_total", reason=reason)
        - metric(before, "edge_load_shed_total", reason=reason)
        for reason in ("queue_full", "queue_timeout", "memory", "origin")
    }
    reason_text = ", ".join(f"{k} {v:.0f}" for k, v in reasons.items() if v)
    others_status = {k: v for k, v in statuses.items() if k not in ("200", "503")}
    nan = float("nan")
    lag = data["lag_ms"]
    kinds = data["error_kinds"] or ""
    rows = [
        ["offered rate", f"{rate:.1f} req/s", f"4 x W1 {capacity:.1f}; EDGE_QUEUE_SIZE={queue}"],
        ["sent", str(data["sent"]), f"over {window:.1f}s; errors {data['errors']} {kinds}"],
        [
            "503 latency p50 / p99",
            f"{shed_latency.get('p50', nan):.2f} / {shed_latency.get('p99', nan):.2f} ms",
            f"{shed} shed ({reason_text or 'no reason counted'})",
        ],
        [
            "200 latency p50 / p99",
            f"{ok_latency.get('p50', nan):.0f} / {ok_latency.get('p99', nan):.0f} ms",
            f"{ok} answered 200",
        ],
        [
            "goodput (200s/s)",
            f"{goodput:.1f}",
            f"vs W1 {capacity:.1f} req/s: {goodput / capacity:.2f}" if capacity else "",
        ],
        [
            "generator CPU",
            f"{data['cpu_percent']:.0f}% of a core",
            f"send lag p50 {lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms",
        ],
        ["edge CPU", f"{edge_cpu:.0f}%", f"others used {others_pct:.0f}% of the machine"],
    ]
    if others_status:
        rows.append(["other statuses", str(others_status), ""])
    section.rows.extend(rows)
    run.report.raw["w4"] = data
    p99 = shed_latency.get("p99")
    p99_note = ""
    if p99 is not None:
        p99_note = f"{abs(10 - p99):.1f} ms {'under' if p99 <= 10 else 'over'} the goal"
    run.report.targets.append(
        Target("W4 503 p99", p99, "<= 10 ms", lambda v: v <= 10, unit=" ms", note=p99_note)
    )
    value = ratio(goodput, capacity)
    run.report.targets.append(
        Target("W4 goodput / W1", value, ">= 0.9", lambda v: v >= 0.9, note=shortfall(value, 0.9))
    )


# --------------------------------------------------------------------------- W5


#: the allocator settings of deploy/docker/Dockerfile
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


def jemalloc_library() -> str | None:
    for pattern in ("/usr/lib/*-linux-gnu/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _w5_once(run: Run, name: str, env: dict[str, str], paths: list[str]) -> dict[str, Any]:
    log(f"W5 memory ({name}): warm-up, baseline, {len(paths)} concurrent misses ...")
    with edge_server("edge-w5", env) as edge:
        for path in paths[:4]:
            http_get(edge.base + path, timeout=60)
        time.sleep(1.0)
        with harness.RssSampler(edge.pid, 0.05) as idle:
            time.sleep(1.0)
        baseline = int(statistics.median(rss for _, rss in idle.samples))
        paths_file = SCRATCH / "w5-paths.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        before = scrape_metrics(edge.base)
        with harness.RssSampler(edge.pid, 0.05) as sampler:
            data = harness.run_loadgen(
                [
                    "burst",
                    "--base",
                    edge.base,
                    "--paths",
                    str(paths_file),
                    "--rounds",
                    str(run.args.w5_rounds),
                    "--timeout",
                    "90",
                ],
                timeout=300,
            )
            finished = time.monotonic()
            time.sleep(run.args.w5_settle)
        after = scrape_metrics(edge.base)
    samples = sampler.samples
    return {
        "baseline": baseline,
        "peak": sampler.peak,
        "right_after": next((rss for t, rss in samples if t >= finished), samples[-1][1]),
        "settled": int(statistics.median(rss for t, rss in samples if t >= samples[-1][0] - 1.0)),
        "statuses": data["statuses"],
        "errors": data["errors"],
        "latency": data["latency_ms"]["all"],
        "sheds": {
            reason: metric(after, "edge_load_shed_total", reason=reason)
            - metric(before, "edge_load_shed_total", reason=reason)
            for reason in ("memory", "queue_full", "queue_timeout")
        },
    }


def run_w5(run: Run) -> None:
    limit = run.args.w5_limit_mib * MiB
    paths = [f"/{key}?{W5_QUERY}" for key in run.originals.w5]
    original_bytes = (harness.ORIGIN / run.originals.w5[0]).stat().st_size
    env = {
        "EDGE_CACHE": "none",
        "EDGE_MEMORY_LIMIT": str(limit),
        "EDGE_QUEUE_SIZE": str(len(paths)),
        "EDGE_BACKEND_TIMEOUT": "60",
    }
    allocators: list[tuple[str, dict[str, str]]] = [("glibc malloc", {})]
    library = jemalloc_library()
    if library:
        allocators.append(
            ("jemalloc (as deployed)", {"LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF})
        )
    found = {name: _w5_once(run, name, {**env, **extra}, paths) for name, extra in allocators}
    section = run.report.section(
        f"W5 memory (64 concurrent misses on ~6000x4900 JPEGs, EDGE_MEMORY_LIMIT="
        f"{run.args.w5_limit_mib}MiB)",
        ["figure", *found, "notes"],
    )

    def row(label: str, cell: Callable[[dict[str, Any]], str], note: str = "") -> list[str]:
        return [label, *(cell(result) for result in found.values()), note]

    def mib(value: float) -> str:
        return f"{value / MiB:.0f} MiB"

    settle = f"{run.args.w5_settle:.0f}s"
    section.rows += [
        row(
            "baseline RSS (after warm-up)",
            lambda r: mib(r["baseline"]),
            f"original {original_bytes / MiB:.1f} MiB, request ?{W5_QUERY}",
        ),
        row(
            "peak RSS",
            lambda r: f"{mib(r['peak'])} ({r['peak'] / limit:.2f} x limit)",
            "sampled every 50 ms from /proc/<pid>/status",
        ),
        row(
            "responses",
            lambda r: str(r["statuses"]),
            f"{run.args.w5_rounds} round(s) of {len(paths)} at once",
        ),
        row(
            "latency p50 / max",
            lambda r: f"{r['latency']['p50']:.0f} / {r['latency']['max']:.0f} ms",
        ),
        row(
            "503 memory sheds",
            lambda r: f"{r['sheds']['memory']:.0f}",
            "queue_full / queue_timeout: "
            + ", ".join(
                f"{r['sheds']['queue_full']:.0f} / {r['sheds']['queue_timeout']:.0f}"
                for r in found.values()
            ),
        ),
        row("RSS right after the burst", lambda r: mib(r["right_after"])),
        row(
            f"RSS {settle} after",
            lambda r: f"{mib(r['settled'])} ({r['settled'] / r['baseline']:.2f} x baseline)",
        ),
    ]
    if not library:
        section.notes.append(
            "libjemalloc2 is not installed: the deployed allocator is not measured"
        )
    section.notes.append(
        "jemalloc as deploy/docker/Dockerfile sets it: LD_PRELOAD and MALLOC_CONF=" + JEMALLOC_CONF
    )
    run.report.raw["w5"] = found
    for name, result in found.items():
        peak = result["peak"] / limit
        drift = result["settled"] / result["baseline"]
        run.report.targets.append(
            Target(
                f"W5 peak RSS / limit ({name})",
                peak,
                "<= 1.0",
                lambda v: v <= 1.0,
                note=shortfall(peak, 1.0, higher_is_better=False),
            )
        )
        run.report.targets.append(
            Target(
                f"W5 RSS {settle} after / before ({name})",
                drift,
                "<= 1.2",
                lambda v: v <= 1.2,
                note=f"{abs(drift - 1) * 100:.0f}% {'above' if drift >= 1 else 'below'} "
                "the baseline",
            )
        )


# --------------------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    import aiohttp
    import pyvips

    wrk = "not installed (Python generator)"
    if harness.have_wrk():
        done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        wrk = (done.stdout + done.stderr).strip().splitlines()[0]
    return {
        "nproc": str(os.cpu_count()),
        "cores used": str(cores()),
        "cpu": model,
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
        "pyvips": str(getattr(pyvips, "__version__", "?")),
        "aiohttp": aiohttp.__version__,
        "load generator": wrk,
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def edge_version(ref: str | None) -> str:
    """Which edge was measured: a commit, or the work tree and how it differs from HEAD."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(harness.REPO), *argv], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    if ref:
        return f"{ref} = {git('rev-parse', '--short=12', ref)}"
    head = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--", "edge")
    return f"work tree at {head}" + (" with uncommitted edge/ changes" if dirty else "")


def write_results(report: Report, info: dict[str, str], command: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = [
        BLOCK_BEGIN,
        f"Run finished {stamp}: `{command}`",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in info.items()],
        "",
        report.markdown().rstrip(),
        BLOCK_END,
    ]
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else f"# Benchmark results\n\n{BLOCK_BEGIN}\n{BLOCK_END}\n"
    )
    if BLOCK_BEGIN not in text:
        text += f"\n{BLOCK_BEGIN}\n{BLOCK_END}\n"
    pattern = re.compile(re.escape(BLOCK_BEGIN) + ".*?" + re.escape(BLOCK_END), re.DOTALL)
    RESULTS.write_text(pattern.sub(lambda _: "\n".join(block), text))
    log(f"figures written to {RESULTS.relative_to(harness.REPO)}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", action="store_true", help="also measure thumbor and ipx")
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of W1 and W3 (best kept)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each")
    parser.add_argument("--connections", type=int, default=8, help="W1/W2 connections")
    parser.add_argument("--hit-connections", type=int, default=8, help="W3 connections")
    parser.add_argument("--python-load", action="store_true", help="do not use wrk")
    parser.add_argument("--w4-queue", type=int, default=2, help="EDGE_QUEUE_SIZE in W4")
    parser.add_argument(
        "--w4-rate", type=float, help="W4 arrival rate (default: 4 x the W1 rate just measured)"
    )
    parser.add_argument("--w5-limit-mib", type=int, default=600)
    parser.add_argument("--w5-rounds", type=int, default=1)
    parser.add_argument("--w5-settle", type=float, default=5.0)
    parser.add_argument(
        "--edge-ref", help="benchmark edge as committed at this git ref (default: the work tree)"
    )
    parser.add_argument(
        "--edge-path",
        type=Path,
        help="benchmark the edge package found in this folder (e.g. a patched copy)",
    )
    parser.add_argument(
        "--write-results", action="store_true", help="replace the figures block of bench/RESULTS.md"
    )
    args = parser.parse_args(argv)
    args.workloads = [name.strip().lower() for name in args.only.split(",") if name.strip()]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if args.edge_ref or args.edge_path:
        source = args.edge_path or harness.export_edge(args.edge_ref)
        harness.EDGE_SOURCE = source.resolve()
        # the ceiling's workers import edge.imaging too: from the same source
        sys.path.insert(0, str(harness.EDGE_SOURCE))
        log(f"edge from {harness.EDGE_SOURCE}")
    info = machine()
    info["edge"] = (
        f"patched copy in {args.edge_path.name}" if args.edge_path else edge_version(args.edge_ref)
    )
    log(f"edge benchmark on {HOST}: {info['cores used']} cores, {info['cpu']}")
    if not harness.have_wrk() and not args.python_load:
        log("wrk is not installed (Debian: apt-get install wrk): using the Python generator")
    log("preparing originals in bench/.scratch/origin ...")
    run = Run(args, harness.prepare_originals(log))
    w2_edge = None
    if "w1" in args.workloads:
        run_w1(run)
    if "latency" in args.workloads:
        run_latency(run)
    if "w2" in args.workloads:
        w2_edge = run_w2(run)
    peer_w2: dict[str, dict[tuple[str, str], tuple[float | None, int, str]]] = {}
    if args.peers and ({"w1", "w2"} & set(args.workloads)):
        peer_w2 = run_peers(run, w2_edge)
    if w2_edge is not None:
        report_w2(run, w2_edge, peer_w2)
    if "w3" in args.workloads:
        run_w3(run)
    if "w4" in args.workloads:
        run_w4(run)
    if "w5" in args.workloads:
        run_w5(run)
    text = run.report.markdown()
    print()
    print(text)
    command = "python bench/run.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        command = "python bench/run.py " + " ".join(sys.argv[1:])
    (SCRATCH / "results-latest.json").write_text(
        json.dumps({"machine": info, "raw": run.report.raw}, indent=2, default=str)
    )
    if args.write_results:
        write_results(run.report, info, command.replace(" --write-results", ""))
    log(f"total {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
