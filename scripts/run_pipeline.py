"""`make demo`: run the pipeline job, show what happens as it goes, end with a summary a person reads.

    .venv/bin/python scripts/run_pipeline.py [--profile demo] [--job pipeline]

Dagster's own event log (thousands of lines) goes to ``<home>/logs/<time>-<job>.log``; the console
gets one line when a stage starts and when it ends, and the stages' progress lines (training,
recovery and evaluation steps, with an ETA). At the end, one table: stage, seconds, bytes, the
key quality figure, check verdicts; then the release verdict with the path of the bundle, or the
gates that blocked it and why, in a paragraph; and how to open the UI.

Exit status: 0 released, 2 blocked by a release gate, 1 a stage failed, 128 + the signal when
stopped by SIGTERM, SIGHUP or Ctrl-C (Dagster and the stage's processes end with it). Run it again
after a crash or a stop: finished stages are reused (their identity exists), training resumes from its
last checkpoint and the report from its last scored model.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHECK_PREFIXES = ("raw_corpus_", "deduped_corpus_", "verified_corpus_", "benchmark_report_")
# what a reader wants to know of each stage, from its materialization metadata
KEY_FIGURES = {
    "raw_corpus": lambda m: f"{m.get('records_kept')} of {m.get('records_read')} records kept",
    "deduped_corpus": lambda m: f"{m.get('records_kept')} kept, {_pct(m.get('removed_rate'))} removed",
    "verified_corpus": lambda m: f"English share {_pct(m.get('english_share'))}",
    "base_model": lambda m: f"perplexity {_num(m.get('perplexity'))}",
    "qlora_model": lambda m: f"val loss {_num(m.get('val_loss_first'))} -> {_num(m.get('val_loss_last'))}",
    "pruned_model": lambda m: f"sparsity {_pct(m.get('sparsity'))}, perplexity {_num(m.get('perplexity'))}",
    "awq_model": lambda m: f"perplexity {_num(m.get('perplexity'))}",
    "gguf_zst": lambda m: f"KL from awq_model {_num(m.get('export_kld'), 4)}",
    "recovered_model": lambda m: f"held-out KL {_num(m.get('heldout_kl_before'), 4)} -> "
                                 f"{_num(m.get('heldout_kl_after'), 4)}",
    "quant_baselines": lambda m: "llama.cpp's own quantizations",
    "benchmark_report": lambda m: f"shipped KLD {_num(m.get('kld_mean'), 4)} (upper {_num(m.get('kld_ci_high'), 4)})",
    "release": lambda m: f"{_mb(m.get('gguf_zst_bytes'))} model.gguf.zst",
}
STEP_LINE = re.compile(r" - (?P<step>[a-z_]+) - (?P<event>STEP_START|STEP_SUCCESS|STEP_FAILURE|STEP_UP_FOR_RETRY)\b")
MESSAGE_LINE = re.compile(r" - [0-9a-f-]{36} - (?:\d+ - )?(?P<step>[a-z_]+) - (?P<message>.*ETA.*)$")


def _num(x: Any, digits: int = 2) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{100 * x:.1f}%"


def _mb(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x / 1e6:,.1f} MB"


class Stopped(Exception):
    """A signal asked this process to end (SIGTERM from a process manager, SIGHUP from a closed terminal)."""


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


def _end_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End ``proc`` (Dagster) and every process under it (the stage's runner, its workers). Without
    this they outlive this process and run the job on their own, unseen. Dagster is killed first:
    a SIGTERM makes it start the interrupted stage again (seen: a new runner, orphaned); the stage's
    processes then get SIGTERM, and SIGKILL after ``grace`` seconds. Finished stages and checkpoints
    stay; a killed stage leaves nothing that looks finished (artifacts are staged), so the next run
    continues."""
    import psutil

    try:
        dagster = psutil.Process(proc.pid)
        procs = dagster.children(recursive=True)
        dagster.kill()
    except psutil.NoSuchProcess:
        procs = []
    proc.wait()
    for p in list(procs):  # what they started meanwhile
        try:
            procs += [c for c in p.children(recursive=True) if c not in procs]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _mark_canceled(dagster_home: str, since: float, message: str) -> None:
    """The run this driver started, if Dagster recorded it, as CANCELED: its process was killed
    before it could say so, and the UI would show it running forever."""
    import dagster as dg

    try:
        instance = dg.DagsterInstance.from_config(dagster_home)
        for record in instance.get_run_records(limit=1):
            if (record.create_timestamp.timestamp() >= since - 1
                    and record.dagster_run.status in (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)):
                instance.report_run_canceled(record.dagster_run, message=message)
    except Exception as exc:  # bookkeeping: the stop itself has happened and must still be reported
        print(f"(the run could not be marked canceled in Dagster: {exc})", flush=True)


def run(job: str, env: dict[str, str], log_path: Path) -> int:
    """Run the job, the full log to ``log_path``, a concise account to the console."""
    dagster = str(Path(sys.executable).with_name("dagster"))
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([dagster, "job", "execute", "-f", "definitions.py", "-j", job], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            return _follow(proc, log)
        except (Stopped, KeyboardInterrupt):
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second one must not cut the cleanup short
                signal.signal(signum, signal.SIG_IGN)
            _end_tree(proc)
            raise


def _follow(proc: subprocess.Popen, log: Any) -> int:
    """Copy the job's output to ``log``; print the stage lines and progress; its exit status."""
    started: dict[str, float] = {}
    last_progress: dict[str, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        step = STEP_LINE.search(line)
        if step and not step["step"].startswith(CHECK_PREFIXES) and not step["step"].endswith("_artifact_intact"):
            name, event = step["step"], step["event"]
            if event == "STEP_START":
                started[name] = time.monotonic()
                print(f"  {time.strftime('%H:%M:%S')}  {name} ...", flush=True)
            else:
                took = time.monotonic() - started.get(name, time.monotonic())
                word = {"STEP_SUCCESS": "done", "STEP_FAILURE": "FAILED",
                        "STEP_UP_FOR_RETRY": "failed, retrying"}[event]
                print(f"  {time.strftime('%H:%M:%S')}  {name} {word} ({took:.0f} s)", flush=True)
            continue
        message = MESSAGE_LINE.search(line)
        if message and time.monotonic() - last_progress.get(message["step"], 0) >= 20:
            last_progress[message["step"]] = time.monotonic()
            print(f"      {message['message'][:150]}", flush=True)
    return proc.wait()


def summary(instance: Any, run_id: str, home: Path) -> tuple[str, int]:
    """The table, the verdict paragraph and the exit status of run ``run_id``."""
    import dagster as dg

    steps = {s.step_key: s for s in instance.get_run_step_stats(run_id)}
    materialized: dict[str, dict[str, Any]] = {}
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
        m = record.event_log_entry.dagster_event.event_specific_data.materialization
        materialized[m.asset_key.to_user_string()] = {k: v.value for k, v in m.metadata.items()}
    checks: dict[str, list[tuple[str, bool, str]]] = {}
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records:
        e = record.event_log_entry.dagster_event.event_specific_data
        checks.setdefault(e.asset_key.to_user_string(), []).append(
            (e.check_name, e.passed, (e.description or "") if not e.passed else ""))
    rows = [("stage", "seconds", "bytes", "key figure", "checks")]
    for name, stat in sorted(steps.items(), key=lambda kv: kv[1].start_time or 0):
        if name.startswith(CHECK_PREFIXES) or name.endswith("_artifact_intact"):
            continue
        meta = materialized.get(name, {})
        seconds = (stat.end_time or time.time()) - (stat.start_time or time.time())
        verdicts = checks.get(name, [])
        ok = sum(1 for _, passed, _ in verdicts if passed)
        status = stat.status.value.lower()
        figure = KEY_FIGURES.get(name, lambda m: "")(meta) if meta else status
        if meta.get("reused"):
            figure += " (reused)"
        rows.append((name, f"{seconds:,.0f}", _mb(meta.get("bytes_on_disk") or meta.get("gguf_zst_bytes")),
                     figure, f"{ok}/{len(verdicts)} passed" if verdicts else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    total = sum((s.end_time or 0) - (s.start_time or 0) for s in steps.values() if s.end_time and s.start_time)

    blocked = [(asset, name, why) for asset, found in checks.items() for name, passed, why in found if not passed]
    if "release" in materialized:
        verdict, code = (f"RELEASED: {materialized['release']['path']}\n  model card: "
                         f"{materialized['release']['path']}/README.md; report: "
                         f"{materialized['benchmark_report'].get('path', '?')}/report.md"), 0
    elif blocked:
        reasons = " ".join(f"Check {asset}:{name} failed" + (f": {why.rstrip('.')}." if why else ".")
                           for asset, name, why in blocked)
        verdict, code = (f"NOT RELEASED. {reasons} The benchmark report (benchmark_report's report.md) has every "
                         "measurement behind this."), 2
    else:
        failed = [n for n, s in steps.items() if s.status.value == "FAILURE"]
        verdict, code = (f"FAILED: {', '.join(failed) or 'the run'} did not finish; the log says why. Run it again "
                         "to continue from the last finished stage."), 1
    text = (f"\n{table}\n\nsteps took {total:,.0f} s in all\n\n{verdict}\n\n"
            f"The UI: `make ui` (profile PROFILE=...), then http://127.0.0.1:3000 (run {run_id[:8]}); "
            f"everything is under {home}.")
    return text, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("REFINERY_PROFILE", "demo"))
    parser.add_argument("--job", default="pipeline")
    args = parser.parse_args(argv)

    import dagster as dg

    from refinery.config import home_dir, load_profile
    from refinery.home import prepare_home

    load_profile(args.profile)  # a broken profile stops here, naming the file and key
    home = prepare_home(home_dir())
    env = {**os.environ, "REFINERY_PROFILE": args.profile, "REFINERY_HOME": str(home),
           "DAGSTER_HOME": os.environ.get("DAGSTER_HOME") or str(home / "dagster")}
    (home / "logs").mkdir(exist_ok=True)
    log_path = home / "logs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{args.job}.log"
    print(f"refinery: job {args.job}, profile {args.profile}, home {home}\n  full log: {log_path}", flush=True)
    start = time.monotonic()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_stopped)
    began = time.time()
    try:
        code = run(args.job, env, log_path)
    except (Stopped, KeyboardInterrupt) as exc:
        signum = exc.args[0] if isinstance(exc, Stopped) else signal.SIGINT
        name = signal.Signals(signum).name
        _mark_canceled(env["DAGSTER_HOME"], began, f"make demo stopped by {name}")
        print(f"\nstopped by {name}: the run's processes were ended. Run it again to continue from the last "
              "finished stage.", flush=True)
        return 128 + signum
    instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
    runs = instance.get_runs(limit=1)
    if not runs:
        print(f"no run was recorded (exit code {code}); see {log_path}")
        return 1
    text, status = summary(instance, runs[0].run_id, home)
    print(text + f"\nwall time {time.monotonic() - start:,.0f} s")
    return status if code == 0 or status else 1


if __name__ == "__main__":
    sys.exit(main())
