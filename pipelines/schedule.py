"""Scheduled retraining on Vertex AI (PipelineJobSchedule) and Kubeflow (recurring runs).

    vlmtune schedule create --target vertex --name nightly --cron "0 3 * * *" --time-zone Europe/Paris \\
        --project P --region us-central1 --pipeline-root gs://BUCKET/root --params run.yaml [--service-account SA]
    vlmtune schedule create --target kubeflow --name nightly --cron "0 3 * * *" --host http://KFP --namespace NS \\
        --pipeline-root gs://BUCKET/root --params run.yaml
    vlmtune schedule list   --target vertex --project P --region R       | --target kubeflow --host H --namespace NS
    vlmtune schedule pause|resume|delete --target ... ID

Cron: give the usual 5 fields (minute hour day-of-month month day-of-week). Vertex takes them as they are, with
the time zone as a ``TZ=Area/City`` prefix. Kubeflow recurring runs take 6 fields, seconds first: the 5 fields
get a leading "0"; 6 fields are accepted as they are for Kubeflow. Kubeflow fires in the scheduler's time zone
(UTC unless its operator changed it), so `--time-zone` there must be UTC.

What a scheduled run trains on: the same parameters every time, so name the data as a moving snapshot
(``gs://BUCKET/exports/{date}/sft`` or a ``.../LATEST`` pointer file; see components/common/snapshots.py),
which the pipeline resolves when the run starts. Checkpoint URIs are left to the pipeline (a fixed one would
make every run resume the previous run's checkpoint), and registration still goes through the evaluation gate.
"""
from __future__ import annotations

import argparse
import re
import sys
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from components.common.cli import EXIT_INPUT, input_error_types
from pipelines.kubeflow import KubeflowOptions, create_kubeflow, list_kubeflow
from pipelines.params import SubmitError
from pipelines.targets import TARGETS, add_target_arguments, checked_inputs, pipeline_template
from pipelines.vertex import create_vertex, list_vertex, vertex_schedule

MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
#: (name, low, high, names mapped to low.., allows '?') per 5-field cron position.
FIELDS5 = [("minute", 0, 59, None, False), ("hour", 0, 23, None, False), ("day-of-month", 1, 31, None, True),
           ("month", 1, 12, MONTHS, False), ("day-of-week", 0, 7, DAYS, True)]
SECONDS = ("second", 0, 59, None, False)
UTC_NAMES = {"UTC", "Etc/UTC", "GMT", "Etc/GMT", "Z"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,127}$")


class CronError(ValueError):
    pass


def _check_value(token: str, low: int, high: int, names: list[str] | None, where: str) -> None:
    if names and token.upper() in names:
        return
    if not token.isdigit():
        raise CronError(f"{where}: {token!r} is not a number" + (f" or one of {', '.join(names)}" if names else ""))
    if not low <= int(token) <= high:
        raise CronError(f"{where}: {token} is outside {low}-{high}")


def _check_field(text: str, spec: tuple, position: int) -> None:
    name, low, high, names, allows_question = spec
    where = f"cron field {position} ({name})"
    if text == "?" and allows_question:
        return
    for part in text.split(","):
        base, slash, step = part.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise CronError(f"{where}: step {step!r} in {part!r} must be a positive number")
        if base == "*":
            continue
        start, dash, end = base.partition("-")
        _check_value(start, low, high, names, where)
        if dash:
            _check_value(end, low, high, names, where)
        elif slash:
            continue  # "5/15": from 5 every 15
        if not part:
            raise CronError(f"{where}: empty list item in {text!r}")


def validate_cron(expr: str, fields: int = 5) -> str:
    """``expr`` normalised to single spaces, if it is a valid cron of ``fields`` fields; else CronError."""
    parts = expr.split()
    if expr.strip().startswith(("TZ=", "CRON_TZ=")):
        raise CronError(f"cron {expr!r}: give the time zone with --time-zone, not inside the expression")
    if expr.strip().startswith("@"):
        raise CronError(f"cron {expr!r}: macros like @daily are not portable; write the fields, e.g. '0 0 * * *'")
    if len(parts) != fields:
        hint = "minute hour day-of-month month day-of-week" if fields == 5 else "second minute hour day-of-month month day-of-week"
        raise CronError(f"cron {expr!r} has {len(parts)} fields; expected {fields}: {hint}")
    specs = FIELDS5 if fields == 5 else [SECONDS, *FIELDS5]
    for i, (text, spec) in enumerate(zip(parts, specs), start=1):
        _check_field(text, spec, i)
    return " ".join(parts)


def vertex_cron(expr: str, time_zone: str | None = None) -> str:
    """5-field cron (+ IANA time zone) -> Vertex's ``TZ=Area/City m h dom mon dow``."""
    if "?" in expr.split():
        raise CronError(f"cron {expr!r}: Vertex AI takes unix cron, which has no '?'; use '*'")
    cron = validate_cron(expr, 5)
    if not time_zone:
        return cron
    check_time_zone(time_zone)
    return f"TZ={time_zone} {cron}"


def kubeflow_cron(expr: str, time_zone: str | None = None) -> str:
    """5-field cron -> the 6-field cron KFP recurring runs take (seconds first); 6 fields pass through checked."""
    if time_zone and time_zone not in UTC_NAMES:
        check_time_zone(time_zone)
        raise CronError(f"--time-zone {time_zone}: Kubeflow recurring runs fire in the scheduler's time zone (UTC by "
                        f"default); write the cron in UTC and drop --time-zone")
    if len(expr.split()) == 6:
        return validate_cron(expr, 6)
    return "0 " + validate_cron(expr, 5)


def check_time_zone(name: str) -> None:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise CronError(f"--time-zone {name!r} is not an IANA time zone (e.g. Europe/Paris, America/New_York, UTC)") from e


# ------------------------------------------------------------------------------------------- CLI

def _print_rows(rows: list[dict], out=None) -> None:
    out = out or sys.stdout
    if not rows:
        print("no schedules", file=out)
        return
    cols = ["id", "name", "state", "cron", "next_run"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip(), file=out)
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip(), file=out)


def _cmd_create(args: argparse.Namespace) -> int:
    if not NAME_RE.match(args.name or ""):
        raise SubmitError(f"--name {args.name!r}: letters, digits, ' ', '_', '.', '-'; at most 128 characters")
    try:
        cron = vertex_cron(args.cron, args.time_zone) if args.target == "vertex" else kubeflow_cron(args.cron, args.time_zone)
    except CronError as e:
        raise SubmitError(str(e)) from e
    with pipeline_template(args.target, args.template, args.settings, args.registry_prefix, args.image_tag,
                           scheduled=True) as template:
        options, params = checked_inputs(args, template, scheduled=True)
        if args.dry_run:
            import yaml

            print(yaml.safe_dump({"target": args.target, "name": args.name, "cron": cron, "parameters": params}, sort_keys=False))
            return 0
        if args.target == "vertex":
            s = create_vertex(template, params, args.name, cron, options, max_run_count=args.max_runs,
                              max_concurrent_run_count=args.max_concurrent, start_time=args.start_time, end_time=args.end_time)
            print(f"created Vertex AI schedule {s.resource_name} ({cron})")
        else:
            r = create_kubeflow(template, params, args.name, cron, options, max_concurrency=args.max_concurrent,
                                start_time=args.start_time, end_time=args.end_time)
            print(f"created Kubeflow recurring run {r.recurring_run_id} ({cron})")
    return 0


def _kubeflow_client(args):
    options = KubeflowOptions.from_environment(args.host, args.namespace)
    problems = options.problems()
    if problems:
        raise SubmitError("\n  ".join(problems))
    return options.client()


def _check_vertex_location(args) -> None:
    missing = [f for f, v in (("--project", args.project), ("--region", args.region)) if not v]
    if missing:
        raise SubmitError(f"{' and '.join(missing)}: required for Vertex AI schedules")


def _cmd_list(args: argparse.Namespace) -> int:
    if args.target == "vertex":
        _check_vertex_location(args)
        rows = list_vertex(args.project, args.region)
    else:
        rows = list_kubeflow(_kubeflow_client(args), args.namespace)
    _print_rows(rows)
    return 0


def _cmd_change(args: argparse.Namespace) -> int:
    action = args.schedule_command
    if args.target == "vertex":
        _check_vertex_location(args)
        schedule = vertex_schedule(args.id, args.project, args.region)
        {"pause": schedule.pause, "resume": schedule.resume, "delete": schedule.delete}[action]()
    else:
        client = _kubeflow_client(args)
        {"pause": client.disable_recurring_run, "resume": client.enable_recurring_run,
         "delete": client.delete_recurring_run}[action](args.id)
    print(f"{action}d schedule {args.id}" if action != "pause" else f"paused schedule {args.id}")
    return 0


def _run(func):
    def wrapped(args):
        try:
            return func(args)
        except input_error_types() as e:  # SubmitError, CronError, and a settings or template file that is wrong
            print(f"error: {e}", file=sys.stderr)
            return EXIT_INPUT
    return wrapped


def _add_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--project")
    p.add_argument("--region")
    p.add_argument("--host", help="KFP API endpoint (default $KF_PIPELINES_ENDPOINT); token from $KFP_TOKEN")
    p.add_argument("--namespace")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="schedule_command", required=True)

    c = sub.add_parser("create", help="schedule the pipeline with a cron expression")
    add_target_arguments(c)
    c.add_argument("--name", required=True, help="schedule display name (also the runs' name prefix)")
    c.add_argument("--cron", required=True, help="5 fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * *'")
    c.add_argument("--time-zone", help="IANA time zone for the cron (Vertex only; default UTC)")
    c.add_argument("--max-runs", type=int, help="Vertex: stop after this many runs")
    c.add_argument("--max-concurrent", type=int, default=1, help="runs at once (default 1: a slow run delays the next)")
    c.add_argument("--start-time", help="RFC 3339 time of the first possible run")
    c.add_argument("--end-time", help="RFC 3339 time after which nothing runs")
    c.add_argument("--dry-run", action="store_true", help="validate and print the schedule; create nothing")
    c.set_defaults(func=_run(_cmd_create))

    ls = sub.add_parser("list", help="list schedules")
    _add_location(ls)
    ls.set_defaults(func=_run(_cmd_list))

    for action in ("pause", "resume", "delete"):
        a = sub.add_parser(action, help=f"{action} a schedule")
        _add_location(a)
        a.add_argument("id", help="schedule id (Vertex: the number or full resource name; Kubeflow: recurring run id)")
        a.set_defaults(func=_run(_cmd_change))
    return p


def main(argv: list[str] | None = None) -> int:
    """`vlmtune schedule create|list|pause|resume|delete ...`: 0 when done, 2 on bad input."""
    args = make_parser().parse_args(argv)
    return args.func(args)
