#!/usr/bin/env python3
"""Helpers of scripts/gpu_check.sh, standard library only (no torch import but in `stamp`):

  stamp --repo DIR --mode MODE         the build stamp: a hash of the extension's sources,
                                       setup.py, the torch / CUDA / Python versions and MODE
                                       ("cuda:9.0" or "cpu"), printed as 16 hex digits
  summary --work DIR --out DIR ...     summary.json and summary.txt in --out from the stage
                                       table and the logs under --work/logs; --print prints
                                       summary.txt (the last thing the check prints)

summary.json (format "fusedrnn-gpu-check/1"): ok, dry_run, final, stopped, seconds, budget_s,
env, stages (every stage of STAGES, in order, each with status, seconds, limit_s, rc, detail),
build, inline, pytest, bench (per run), failures (every failure line, per case and dtype),
files (what $OUT holds) and layout (whether that is at most MAX_FILES files, at most MAX_DEPTH
folders deep).
"""

import argparse
import glob
import hashlib
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

STAGES = (
    "env",
    "build",
    "inline",
    "pytest",
    "bench_float32",
    "bench_bfloat16",
    "memcheck",
    "bench_compiled",
    "plot",
)
BENCH_RUNS = ("float32", "bfloat16", "compiled")
MAX_FILES = 8
MAX_DEPTH = 2
SUMMARY_FILES = ("summary.json", "summary.txt")
# what summary.txt may take of the 12,000 characters of output that come back
MAX_TEXT = 9000
# statuses that fail the check (the shell script decides which stage outcome is which)
FAILING = ("FAIL",)

SOURCE_SUFFIXES = (".cpp", ".cc", ".h", ".hpp", ".cu", ".cuh")


# --- stamp ------------------------------------------------------------------------------------


def stamp(repo: str, mode: str) -> str:
    """16 hex digits that change with the extension's sources, setup.py, the torch, CUDA and
    Python versions, the build mode and the build's variables (FUSEDRNN_CPU_ARCH,
    FUSEDRNN_QUICK_BUILD, FUSEDRNN_DEBUG_INFO): a build with the same stamp is
    the same build."""
    import platform

    import torch

    h = hashlib.sha256()
    files = sorted(
        p
        for p in glob.glob(os.path.join(repo, "csrc", "**", "*"), recursive=True)
        if p.endswith(SOURCE_SUFFIXES) and os.path.isfile(p)
    )
    files.append(os.path.join(repo, "setup.py"))
    for path in files:
        h.update(os.path.relpath(path, repo).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    for part in (
        torch.__version__,
        str(torch.version.cuda),
        platform.python_version(),
        mode,
        os.environ.get("FUSEDRNN_CPU_ARCH", "none"),
        os.environ.get("FUSEDRNN_QUICK_BUILD", "0"),
        os.environ.get("FUSEDRNN_DEBUG_INFO", "0"),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


# --- reading the logs -------------------------------------------------------------------------


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_stages(path: str) -> Dict[str, dict]:
    """The stage table the shell script appends to: name, status, seconds, limit, rc, detail
    (tab-separated); a later line of a stage replaces an earlier one."""
    out: Dict[str, dict] = {}
    for line in _read(path).splitlines():
        parts = line.split("\t")
        if len(parts) < 6 or not parts[0]:
            continue
        name, status, seconds, limit, rc, detail = parts[:6]

        def num(text):
            try:
                return int(text)
            except ValueError:
                return None

        out[name] = {
            "stage": name,
            "status": status,
            "seconds": num(seconds),
            "limit_s": num(limit),
            "rc": num(rc),
            "detail": detail,
        }
    return out


def inline_section(path: str) -> Optional[dict]:
    doc = _load_json(path)
    if doc is None:
        return None
    return {
        "complete": doc.get("complete"),
        "device": doc.get("device"),
        "checks": doc.get("checks"),
        "cases": doc.get("cases"),
        "cases_by_dtype": doc.get("cases_by_dtype"),
        "not_ok": [o for o in doc.get("outcomes", []) if o.get("status") != "ok"],
        "failures": doc.get("failures", []),
    }


# pytest -v: "<node id> PASSED   [ 10%]"; a test still running has its node id and nothing after
OUTCOME = re.compile(r"^(\S+\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
NODE = re.compile(r"^(\S+\.py::\S+)")


def pytest_section(xml_path: str, log_path: str) -> Optional[dict]:
    """Per-test outcome of the pytest stage: from the junit XML when pytest wrote it (it does on
    a normal end and on SIGINT), else from the -v log; the test still running when the stage
    was stopped, from the -v log (its node id printed without an outcome)."""
    log = _read(log_path)
    if not log and not os.path.exists(xml_path):
        return None
    sec: dict = {
        "source": None,
        "passed": 0,
        "failed": 0,
        "errors": 0,
        "skipped": 0,
        "failed_tests": [],
        "slowest": [],
        "unfinished": [],
    }
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        root = None
    if root is not None:
        sec["source"] = "junit xml"
        times = []
        for case in root.iter("testcase"):
            if not case.get("name"):  # the entry pytest leaves for a test stopped by SIGINT
                continue
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            try:
                times.append((float(case.get("time", 0.0)), name))
            except ValueError:
                pass
            bad = case.find("failure")
            kind = "failed"
            if bad is None:
                bad, kind = case.find("error"), "errors"
            if bad is not None:
                sec[kind] += 1
                msg = (bad.get("message") or "").strip().splitlines()
                sec["failed_tests"].append(
                    {"test": name, "outcome": kind, "message": (msg[0] if msg else "")[:300]}
                )
            elif case.find("skipped") is not None:
                sec["skipped"] += 1
            else:
                sec["passed"] += 1
        sec["slowest"] = [
            {"test": n, "seconds": round(t, 2)} for t, n in sorted(times, reverse=True)[:5]
        ]
    done = set()
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0, "XFAIL": 0, "XPASS": 0}
    seen: List[str] = []
    for line in log.splitlines():
        m = OUTCOME.match(line)
        if m:
            done.add(m.group(1))
            counts[m.group(2)] += 1
            if root is None and m.group(2) in ("FAILED", "ERROR"):
                sec["failed_tests"].append(
                    {"test": m.group(1), "outcome": m.group(2).lower(), "message": ""}
                )
            continue
        m = NODE.match(line)
        if m:
            seen.append(m.group(1))
    sec["unfinished"] = [n for n in dict.fromkeys(seen) if n not in done]
    if root is None and done:
        sec["source"] = "pytest -v log"
        sec.update(
            passed=counts["PASSED"] + counts["XPASS"],
            failed=counts["FAILED"],
            errors=counts["ERROR"],
            skipped=counts["SKIPPED"] + counts["XFAIL"],
        )
    tail = [ln for ln in log.splitlines() if ln.startswith("=") and " in " in ln]
    sec["result_line"] = tail[-1].strip("= ") if tail else None
    return sec


def bench_section(path: str) -> Optional[dict]:
    doc = _load_json(path)
    if doc is None:
        return None
    rows, errors = [], []
    for rec in doc.get("results", []):
        impls = rec.get("impls", {})
        fused = impls.get("fused", {})
        rows.append(
            {
                "label": rec.get("label"),
                "shape": rec.get("shape_str"),
                "pass": rec.get("pass"),
                "fused_ms": fused.get("median_ms"),
                "speedup": rec.get("speedup", {}),
            }
        )
        for impl, e in impls.items():
            if e.get("status") == "error":
                errors.append(
                    f"{rec.get('label')} {rec.get('shape_str')} {rec.get('pass')} "
                    f"{impl}: {e.get('reason')}"
                )
    st = doc.get("settings", {})
    return {
        "complete": doc.get("complete", True),
        "interrupted": doc.get("interrupted"),
        "interrupt_reason": doc.get("interrupt_reason"),
        "cases_done": doc.get("cases_done"),
        "cases_total": doc.get("cases_total"),
        "dtype": st.get("dtype"),
        "device": st.get("device"),
        "tf32": st.get("tf32"),
        "tf32_flags": st.get("tf32_flags"),
        "compile": st.get("compile"),
        "rows": rows,
        "errors": errors,
    }


def list_files(out: str) -> List[str]:
    files = []
    for dirpath, _, names in os.walk(out):
        for n in names:
            files.append(os.path.relpath(os.path.join(dirpath, n), out))
    return sorted(files)


def layout(files: List[str]) -> dict:
    depth = max((f.count(os.sep) for f in files), default=0)
    ok = len(files) <= MAX_FILES and depth <= MAX_DEPTH
    return {
        "files": len(files),
        "max_files": MAX_FILES,
        "max_depth_found": depth,
        "max_depth": MAX_DEPTH,
        "ok": ok,
    }


# --- the summary ------------------------------------------------------------------------------


def build_summary(args) -> dict:
    logs = os.path.join(args.work, "logs")
    stages = read_stages(os.path.join(logs, "stages.tsv"))
    ordered = []
    for name in STAGES:
        ordered.append(
            stages.get(name)
            or {
                "stage": name,
                "status": "not run",
                "seconds": None,
                "limit_s": None,
                "rc": None,
                "detail": "stopped before this stage"
                if args.stopped
                else ("still to run" if not args.final else "not reached"),
            }
        )
    env = _load_json(os.path.join(logs, "env.json")) or {}
    build = _load_json(os.path.join(logs, "build.json")) or {}
    build["info"] = _load_json(os.path.join(logs, "build_info.json"))
    doc = {
        "format": "fusedrnn-gpu-check/1",
        "ok": False,
        "dry_run": bool(args.dry_run),
        "final": bool(args.final),
        "stopped": args.stopped or None,
        "seconds": args.seconds,
        "budget_s": args.budget,
        "env": env,
        "stages": ordered,
        "build": build,
        "inline": inline_section(os.path.join(logs, "inline.json")),
        "memcheck_inline": inline_section(os.path.join(logs, "memcheck_inline.json")),
        "pytest": pytest_section(
            os.path.join(logs, "pytest.xml"), os.path.join(logs, "pytest.log")
        ),
        "bench": {
            run: bench_section(os.path.join(logs, f"bench_{run}", "results.json"))
            for run in BENCH_RUNS
        },
    }
    failures = []
    for name in ("inline", "memcheck_inline"):
        sec = doc[name]
        if sec:
            failures += [f"{name}: {m}" for m in sec["failures"]]
    if doc["pytest"]:
        for t in doc["pytest"]["failed_tests"]:
            failures.append(f"pytest: {t['test']} {t['outcome']}: {t['message']}")
        for n in doc["pytest"]["unfinished"]:
            failures.append(f"pytest: {n} did not finish (stage stopped while it ran)")
    for run, sec in doc["bench"].items():
        if sec:
            failures += [f"bench {run}: {e}" for e in sec["errors"]]
    for st in ordered:
        if st["status"] in FAILING:
            failures.append(f"stage {st['stage']}: {st['detail']}")
    doc["failures"] = failures
    files = sorted(set(list_files(args.out)) | set(SUMMARY_FILES))
    doc["files"] = files
    doc["layout"] = layout(files)
    doc["ok"] = (
        bool(args.final)
        and not args.stopped
        and doc["layout"]["ok"]
        and not any(st["status"] in FAILING for st in ordered)
    )
    return doc


def _fmt(v: Optional[float], unit: str = "") -> str:
    if v is None:
        return "-"
    return (f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}") + unit


def format_text(doc: dict) -> str:
    env = doc.get("env") or {}
    verdict = "PASS" if doc["ok"] else ("FAIL" if doc["final"] else "INCOMPLETE")
    head = [
        f"fusedrnn GPU check: {verdict}"
        + (" (dry run on the CPU)" if doc["dry_run"] else "")
        + (f", stopped by {doc['stopped']}" if doc["stopped"] else "")
        + f"; {doc['seconds']} s of a {doc['budget_s']} s budget",
        f"device: {env.get('device_name', '?')} (capability "
        f"{env.get('capability') or '-'}), torch {env.get('torch', '?')}, CUDA "
        f"{env.get('cuda') or '-'}, python {env.get('python', '?')}, git "
        f"{(env.get('git') or '-')[:12]}",
    ]
    lines = head + ["", f"{'stage':<15} {'status':<11} {'time':>5} {'limit':>5}  detail"]
    for st in doc["stages"]:
        t = "-" if st["seconds"] is None else f"{st['seconds']}s"
        lim = "-" if st["limit_s"] is None else str(st["limit_s"])
        lines.append(
            f"{st['stage']:<15} {st['status']:<11} {t:>5} {lim:>5}  {(st['detail'] or '')[:200]}"
        )
    fails = doc["failures"]
    if fails:
        lines += ["", f"failures ({len(fails)}; every one in summary.json):"]
        lines += [f"  {f[:220]}" for f in fails[:25]]
        if len(fails) > 25:
            lines.append(f"  ... {len(fails) - 25} more")
    bench_lines = []
    for run, sec in doc["bench"].items():
        if not sec or not sec["rows"]:
            continue
        note = (
            ""
            if sec["complete"]
            else f" (partial: {sec['cases_done']} of {sec['cases_total']} cases)"
        )
        bench_lines.append(
            f"  {run}: {sec['dtype']}, TF32 {'on' if sec['tf32'] else 'off'} on both sides{note}"
        )
        baselines = [
            b for b in ("torch", "eager", "compiled") if any(b in r["speedup"] for r in sec["rows"])
        ]
        names = {"torch": "nn", "eager": "eager", "compiled": "compiled"}
        for r in sec["rows"]:
            line = (
                f"    {str(r['label'])[:18]:<18} {str(r['shape']):<14} {str(r['pass']):<7} "
                f"fused {_fmt(r['fused_ms'], ' ms'):>10}"
            )
            for b in baselines:
                line += f"  x {names[b]} {_fmt(r['speedup'].get(b)):>5}"
            bench_lines.append(line)
    if bench_lines:
        lines += [
            "",
            "benchmark (speed-up of fused = baseline median / fused median, > 1: fused faster):",
        ] + bench_lines
    lay = doc["layout"]
    lines += [
        "",
        f"files in $OUT ({lay['files']}, at most {lay['max_files']}, "
        f"{lay['max_depth_found']} folder(s) deep, at most {lay['max_depth']}"
        f"{'' if lay['ok'] else '; LAYOUT VIOLATED'}): {', '.join(doc['files'])}",
        f"overall: {verdict}",
    ]
    text = "\n".join(lines)
    if len(text) > MAX_TEXT:  # the bench table goes first: results.json has it all
        keep = [ln for ln in lines if ln not in bench_lines[1:]]
        keep.insert(-2, "  (benchmark rows left out for length: see bench/*.json)")
        text = "\n".join(keep)[-MAX_TEXT:]
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stamp")
    s.add_argument("--repo", required=True)
    s.add_argument("--mode", required=True)
    m = sub.add_parser("summary")
    m.add_argument("--work", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dry-run", type=int, default=0)
    m.add_argument("--final", type=int, default=0)
    m.add_argument("--stopped", default="")
    m.add_argument("--seconds", type=int, default=0)
    m.add_argument("--budget", type=int, default=0)
    m.add_argument("--print", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "stamp":
        print(stamp(args.repo, args.mode))
        return 0
    doc = build_summary(args)
    text = format_text(doc)
    for name, body in (
        ("summary.json", json.dumps(doc, indent=1, default=str)),
        ("summary.txt", text + "\n"),
    ):
        tmp = os.path.join(args.out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(body)
        os.replace(tmp, os.path.join(args.out, name))
    if args.print:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
