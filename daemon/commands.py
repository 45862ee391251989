"""The operator commands of the CLI: status, list, timeline, retry, cancel, compensate,
stats, search. They talk to the database directly (no daemon needed) and print readable
tables, or JSON with --json."""

from __future__ import annotations

import argparse
import getpass
import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel

from engine import UnstorableValueError, WorkflowService, WorkflowState
from engine.idempotency import check_storable_text
from engine.limits import UNCHANGED, concurrency_problem, rate_limit_problem
from engine.records import LimitRecord, ScheduleRecord, StepRecord, TimelineEvent, TypeFlow, WorkflowRecord
from engine.schedules import MISSED_TICKS, Schedule
from engine.service import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    LIST_PAGE_MAX,
    SEARCH_QUERY_MAX_LENGTH,
    check_idempotency_key,
)

MESSAGE_WIDTH = 60

# A record the CLI lists (a schedule, a limit).
R = TypeVar("R", bound=BaseModel)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns under upper-case headers; None prints as '-'."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]
    lines = ["  ".join(header.upper().ljust(width) for header, width in zip(headers, widths, strict=True))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    text = str(value)
    return text if len(text) <= MESSAGE_WIDTH else text[: MESSAGE_WIDTH - 1] + "…"


def to_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> str:
    """Records (or a list or dict of them) as indented JSON."""

    def plain(item: Any) -> Any:
        if isinstance(item, BaseModel):
            return item.model_dump(mode="json")
        if isinstance(item, dict):
            return {key: plain(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [plain(inner) for inner in item]
        return item

    return json.dumps(plain(value), indent=2, ensure_ascii=False, sort_keys=True)


def _message(error: dict[str, Any] | None) -> str | None:
    return None if error is None else str(error.get("message", error))


async def workflows_table(workflows: Sequence[WorkflowRecord], service: WorkflowService) -> str:
    """One row a workflow, its completed steps counted as `status` counts them."""
    done = await service.count_completed_steps(workflows)
    rows = [
        (w.id, w.type, w.state, w.user_id, f"{done[w.id]}/{w.total_steps}", w.created_at) for w in workflows
    ]
    return render_table(("id", "type", "state", "user", "steps done", "created"), rows)


def steps_table(steps: Sequence[StepRecord]) -> str:
    rows = [(s.step_index, s.step_name, s.state, s.attempt, s.retry_count, _message(s.error)) for s in steps]
    return render_table(("#", "step", "state", "attempts", "retries", "error"), rows)


def timeline_table(events: Sequence[TimelineEvent]) -> str:
    rows = [
        (
            e.at,
            e.step_name or "(workflow)",
            f"{e.from_state or '-'} -> {e.to_state}",
            e.attempt,
            e.worker_id,
            _message(e.error),
        )
        for e in events
    ]
    return render_table(("at", "what", "transition", "attempt", "worker", "error"), rows)


async def cmd_status(args: argparse.Namespace, service: WorkflowService) -> str:
    workflow = await service.get_workflow(args.id)
    steps = await service.get_steps(workflow.id)
    summary = await service.get_execution_summary(workflow.id)
    if args.json:
        return to_json({"workflow": workflow, "steps": steps, "summary": summary})
    facts = [
        ("workflow", workflow.id),
        ("type", workflow.type),
        (
            "state",
            workflow.state
            + (" (cancel requested)" if workflow.cancel_requested and workflow.state == "running" else ""),
        ),
        ("user", workflow.user_id),
        ("wallet", workflow.wallet_address),
        (
            "progress",
            f"{summary.completed_steps}/{summary.total_steps} steps ({summary.progress_percentage:g} %)",
        ),
        ("current step", summary.current_step),
        ("retries", summary.retries),
        ("duration", None if summary.duration_seconds is None else f"{summary.duration_seconds:g} s"),
        ("error", _message(workflow.error)),
        (
            "output",
            None
            if workflow.output is None
            else json.dumps(workflow.output, ensure_ascii=False, sort_keys=True),
        ),
        ("idempotency key", workflow.idempotency_key),
    ]
    block = "\n".join(f"{name:<16} {'-' if value is None else value}" for name, value in facts)
    return block + ("\n\n" + steps_table(steps) if steps else "")


async def cmd_list(args: argparse.Namespace, service: WorkflowService) -> str:
    page = await service.list_workflows(
        page=args.page, limit=args.limit, state=args.state, type=args.type, user_id=args.user
    )
    if args.json:
        return to_json(page)
    shown = f"page {page.page}, {len(page.items)} of {page.total} workflows"
    return (await workflows_table(page.items, service) + "\n" if page.items else "") + shown


async def cmd_timeline(args: argparse.Namespace, service: WorkflowService) -> str:
    events = await service.get_timeline(args.id)
    return to_json(events) if args.json else timeline_table(events)


def cli_actor() -> str:
    """Who runs a command from the shell, for the timeline: cli:<os user>."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # a uid without a name, as in some containers
        user = str(os.getuid())
    return f"cli:{user}"


async def cmd_retry(args: argparse.Namespace, service: WorkflowService) -> str:
    workflow = await service.retry_workflow(args.id, force=args.force, actor=cli_actor())
    return _after_command(workflow, args.json)


async def cmd_cancel(args: argparse.Namespace, service: WorkflowService) -> str:
    return _after_command(await service.cancel_workflow(args.id, actor=cli_actor()), args.json)


async def cmd_compensate(args: argparse.Namespace, service: WorkflowService) -> str:
    return _after_command(await service.compensate_workflow(args.id, actor=cli_actor()), args.json)


def _after_command(workflow: WorkflowRecord, as_json: bool) -> str:
    if as_json:
        return to_json(workflow)
    note = " (cancel requested: it stops at its next step boundary)" if workflow.cancel_requested else ""
    return f"workflow {workflow.id} is {workflow.state}{note}"


async def cmd_stats(args: argparse.Namespace, service: WorkflowService) -> str:
    stats = await service.get_stats()
    if args.json:
        return to_json(stats)
    states = sorted({state for counts in stats.by_type.values() for state in counts})
    by_type = [(t, *(counts.get(s, 0) for s in states)) for t, counts in sorted(stats.by_type.items())]
    workers = [(w.id, w.host, w.pid, ",".join(w.types), w.last_seen_at) for w in stats.live_workers]
    oldest = stats.oldest_due_age_seconds
    parts = [
        render_table(("type", *states), by_type) if by_type else "no workflows",
        f"last minute: {stats.completed_last_minute} completed, {stats.failed_last_minute} failed; "
        f"last hour: {stats.completed_last_hour} completed, {stats.failed_last_hour} failed",
        "oldest due workflow: " + ("none" if oldest is None else f"{oldest:.1f} s overdue"),
        flow_table(stats.flow) if stats.flow else "nothing runnable",
        render_table(("worker", "host", "pid", "types", "last seen"), workers)
        if workers
        else "no live workers",
    ]
    if stats.unserved_types:
        parts.append(
            "due work no live worker serves (type, or type@version): " + ", ".join(stats.unserved_types)
        )
    return "\n\n".join(parts)


def flow_table(flow: Sequence[TypeFlow]) -> str:
    """In flight against the limits, due, throttled (held back by a limit: limited, not
    stuck) and the oldest due age, by type."""
    rows = [
        (each.type, f"{each.in_flight} / {_limit_text(each.max_concurrency)}",
         f"{each.started_in_period} / {each.rate_limit}" if each.rate_limit else "none",
         str(each.due), str(each.throttled),
         "-" if each.oldest_due_age_seconds is None else f"{each.oldest_due_age_seconds:.1f} s")
        for each in flow
    ]  # fmt: skip
    return render_table(
        ("type", "in flight / limit", "started / rate", "due", "throttled", "oldest due"), rows
    )


async def cmd_versions(args: argparse.Namespace, service: WorkflowService) -> str:
    versions = await service.get_versions()
    if args.json:
        return to_json(versions)
    if not versions:
        return "no workflows"
    rows = [
        (v.type, "none yet" if v.version is None else v.version, v.in_flight, v.finished, v.served_by)
        for v in versions
    ]
    waiting = [v for v in versions if v.in_flight and not v.served_by]
    table = render_table(("type", "version", "in flight", "finished", "live workers serving it"), rows)
    if not waiting:
        return table
    names = ", ".join(f"{v.type} v{v.version}" if v.version else v.type for v in waiting)
    return f"{table}\n\nwaiting for a daemon that serves them: {names}"


async def cmd_search(args: argparse.Namespace, service: WorkflowService) -> str:
    found = await service.search_workflows(args.query)
    if args.json:
        return to_json(found)
    return await workflows_table(found, service) if found else f"no workflow matches {args.query!r}"


def schedules_table(schedules: Sequence[ScheduleRecord]) -> str:
    rows = [
        (s.name, s.cron, s.timezone, s.type, "yes" if s.enabled else "paused", s.next_fire_at,
         s.last_fired_at, "code" if s.declared else "run time")
        for s in schedules
    ]  # fmt: skip
    return render_table(
        ("name", "cron", "zone", "type", "enabled", "next tick", "last fired", "declared in"), rows
    )


async def cmd_schedule_add(args: argparse.Namespace, service: WorkflowService) -> str:
    schedule = Schedule(
        name=args.name, cron=args.cron, type=args.type, input=args.input, user_id=args.user,
        timezone=args.tz, missed=args.missed,
    )  # fmt: skip
    record = await service.add_schedule(schedule, require_served=not args.allow_unserved)
    return (
        to_json(record)
        if args.json
        else f"schedule {record.name}: next tick {record.next_fire_at.isoformat()}"
    )


def listing(records: Sequence[R], as_json: bool, table: Callable[[Sequence[R]], str], nothing: str) -> str:
    """A list of records as JSON, or as a table, or `nothing` when it is empty."""
    if as_json:
        return to_json(records)
    return table(records) if records else nothing


async def cmd_schedule_list(args: argparse.Namespace, service: WorkflowService) -> str:
    return listing(await service.list_schedules(), args.json, schedules_table, "no schedules")


async def cmd_schedule_pause(args: argparse.Namespace, service: WorkflowService) -> str:
    record = await service.pause_schedule(args.name)
    return to_json(record) if args.json else f"schedule {record.name} is paused"


async def cmd_schedule_resume(args: argparse.Namespace, service: WorkflowService) -> str:
    record = await service.resume_schedule(args.name)
    return (
        to_json(record)
        if args.json
        else f"schedule {record.name} resumed: next tick {record.next_fire_at.isoformat()}"
    )


async def cmd_schedule_remove(args: argparse.Namespace, service: WorkflowService) -> str:
    await service.remove_schedule(args.name)
    return to_json({"removed": args.name}) if args.json else f"schedule {args.name} removed"


async def cmd_send_event(args: argparse.Namespace, service: WorkflowService) -> str:
    delivered = await service.send_event(args.id, args.name, args.payload, event_id=args.event_id)
    if args.json:
        return to_json({"delivered": delivered})
    return (
        f"event {args.name} sent to workflow {args.id}"
        if delivered
        else (f"event {args.name} was sent to workflow {args.id} before (same event id): nothing new")
    )


def add_event_command(commands: Any, json_value: Callable[[str], Any]) -> None:
    """`workflowd send-event ID NAME --payload JSON [--event-id K]`."""
    send = commands.add_parser("send-event", help="send an event to a workflow, for a step that waits for it")
    send.add_argument("--json", action="store_true", help="print JSON")
    send.add_argument("id", metavar="ID", help="the workflow id")
    send.add_argument("name", metavar="NAME", type=storable_text, help="the event's name")
    send.add_argument(
        "--payload", type=json_value, default=None, help="the event's payload, JSON (the step's output)"
    )
    send.add_argument(
        "--event-id", type=storable_text, default=None,
        help="your id of the event: sent again, it is a no-op (default: name and payload)",
    )  # fmt: skip
    send.set_defaults(service_handler=cmd_send_event)


async def cmd_set_priority(args: argparse.Namespace, service: WorkflowService) -> str:
    workflow = await service.set_priority(args.id, args.priority)
    return to_json(workflow) if args.json else f"workflow {workflow.id}: priority {workflow.priority}"


def add_priority_command(commands: Any, priority_value: Callable[[str], int]) -> None:
    """`workflowd set-priority ID N`."""
    change = commands.add_parser(
        "set-priority", help="change the priority of a workflow still to run (its next claim goes by it)"
    )
    change.add_argument("--json", action="store_true", help="print JSON")
    change.add_argument("id", metavar="ID", help="the workflow id")
    change.add_argument("priority", metavar="N", type=priority_value, help="-100 to 100, smaller runs first")
    change.set_defaults(service_handler=cmd_set_priority)


def command_group(commands: Any, name: str, help: str) -> Callable[[str, Any, str], argparse.ArgumentParser]:
    """A command of actions (`workflowd NAME ACTION ...`); returns the function that adds
    an action, each with --json."""
    actions = commands.add_parser(name, help=help).add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )

    def action(action_name: str, handler: Any, action_help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(action_name, help=action_help)
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(service_handler=handler)
        return parser

    return action


def add_schedule_commands(commands: Any, json_object: Callable[[str], dict[str, Any]]) -> None:
    """`workflowd schedule add|list|pause|resume|remove`."""
    action = command_group(commands, "schedule", "cron schedules: add, list, pause, resume, remove")

    add = action("add", cmd_schedule_add, "add a schedule, or change the one of that name")
    add.add_argument("name", metavar="NAME", type=storable_text, help="the schedule's name")
    add.add_argument("--cron", required=True, metavar="EXPR",
                     help="five fields (minute hour day month weekday), or six, seconds last")  # fmt: skip
    add.add_argument("--type", required=True, type=storable_text, help="the workflow type each tick starts")
    add.add_argument("--input", type=json_object, default={}, help="the input, a JSON object")
    add.add_argument("--user", type=storable_text, default=None, help="the user the workflows run for")
    add.add_argument("--tz", default="UTC", metavar="ZONE", help="the time zone the expression is read in")
    add.add_argument("--missed", choices=MISSED_TICKS, default="latest",
                     help="after an outage: the newest missed tick once (latest), or each (all)")  # fmt: skip
    add.add_argument("--allow-unserved", action="store_true", help="even if no live worker serves the type")
    action("list", cmd_schedule_list, "every schedule, its next tick and its last")
    for name, handler, help in (
        ("pause", cmd_schedule_pause, "fire no more ticks until resumed"),
        ("resume", cmd_schedule_resume, "fire again from the next tick after now"),
        ("remove", cmd_schedule_remove, "delete a schedule (its workflows stay)"),
    ):
        action(name, handler, help).add_argument("name", metavar="NAME", help="the schedule's name")


def limits_table(limits: Sequence[LimitRecord]) -> str:
    rows = [
        (limit.type, _limit_text(limit.max_concurrency), _limit_text(limit.declared_max_concurrency),
         _limit_text(limit.rate_limit), _limit_text(limit.declared_rate_limit),
         f"set by {limit.set_by or 'an operator'}" if limit.overridden else "definition",
         str(limit.in_flight), str(limit.started_in_period), str(limit.due))
        for limit in limits
    ]  # fmt: skip
    header = ("type", "concurrency", "definition's", "rate", "definition's", "from", "in flight",
              "started in period", "due")  # fmt: skip
    return render_table(header, rows)


def _limit_text(limit: int | str | None) -> str:
    return "none" if limit is None else str(limit)


async def cmd_limits_list(args: argparse.Namespace, service: WorkflowService) -> str:
    return listing(await service.list_limits(), args.json, limits_table, "no limits")


async def cmd_limits_set(args: argparse.Namespace, service: WorkflowService) -> str:
    record = await service.set_limit(args.type, args.concurrency, rate_limit=args.rate, actor=cli_actor())
    return to_json(record) if args.json else limits_table([record])


async def cmd_limits_reset(args: argparse.Namespace, service: WorkflowService) -> str:
    record = await service.reset_limit(args.type)
    if record is None:
        none = {"type": args.type, "max_concurrency": None, "rate_limit": None}
        return to_json(none) if args.json else f"{args.type}: no limit"
    return to_json(record) if args.json else limits_table([record])


def concurrency_value(text: str) -> int | None:
    """An argparse type: a concurrency limit, a whole number 1 or more, or `none`."""
    if text == "none":
        return None
    try:
        value: object = int(text)
    except ValueError:
        value = text
    if problem := concurrency_problem(value):
        raise argparse.ArgumentTypeError(f"{problem} (or none)")
    return int(text)


def rate_value(text: str) -> str | None:
    """An argparse type: a rate limit (10/s, 600/min, 5/10s), or `none`."""
    if text == "none":
        return None
    if problem := rate_limit_problem(text):
        raise argparse.ArgumentTypeError(f"{problem} (or none)")
    return text


def add_limits_commands(commands: Any) -> None:
    """`workflowd limits list|set|reset`."""
    action = command_group(
        commands, "limits", "concurrency and rate limits of workflow types: list, set, reset"
    )

    action("list", cmd_limits_list, "every type with a limit, its workflows in flight and due")
    setting = action(
        "set", cmd_limits_set, "set a type's limits over its definition's (the daemons hold to them in 2 s)"
    )
    setting.add_argument("type", metavar="TYPE", type=storable_text, help="the workflow type")
    setting.add_argument(
        "--concurrency", type=concurrency_value, default=UNCHANGED, metavar="N",
        help="at most N of its workflows hold a lease at once, across every daemon; none: no limit",
    )  # fmt: skip
    setting.add_argument(
        "--rate", type=rate_value, default=UNCHANGED, metavar="RATE",
        help="at most this many step starts per period, across every daemon (10/s, 600/min); none: no limit",
    )  # fmt: skip
    reset = action("reset", cmd_limits_reset, "back to the definition's limits")
    reset.add_argument("type", metavar="TYPE", type=storable_text, help="the workflow type")


def workflow_state(text: str) -> WorkflowState:
    """A state as typed on the command line, in any case; argparse shows the error."""
    try:
        return WorkflowState(text.lower())
    except ValueError:
        states = ", ".join(state.value for state in WorkflowState)
        raise argparse.ArgumentTypeError(f"{text!r} is not a state: one of {states}") from None


def whole_number(what: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high`, refused naming what was typed
    and the range."""

    def parse(text: str) -> int:
        try:
            number: int | None = int(text)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}: a whole number from {low} to {high}")
        return number

    return parse


def as_typed(text: str) -> str:
    """`text` quoted as it was typed, cut to MESSAGE_WIDTH: bytes that are not UTF-8, which
    Python holds as lone surrogates, show as \\xNN, the byte the user's terminal sent."""
    return "'" + _cell(os.fsencode(text).decode("utf-8", "backslashreplace")) + "'"


def storable_text(text: str) -> str:
    """An argparse type: text the database can store. A NUL cannot be in an argument at all,
    so what gets refused here is text of another encoding than UTF-8."""
    try:
        check_storable_text(text)
    except UnstorableValueError:
        raise argparse.ArgumentTypeError(
            f"{as_typed(text)} is not UTF-8 text, the only text the database stores"
        ) from None
    return text


def idempotency_key(text: str) -> str:
    """An argparse type: a key the engine accepts (its length rule is the engine's)."""
    try:
        check_idempotency_key(storable_text(text))
    except UnstorableValueError as error:
        raise argparse.ArgumentTypeError(f"{as_typed(text)} ({len(text)} characters): {error}") from None
    return text


def search_query(text: str) -> str:
    """An argparse type: a search, 1 to SEARCH_QUERY_MAX_LENGTH characters of UTF-8."""
    if not 1 <= len(text) <= SEARCH_QUERY_MAX_LENGTH:
        raise argparse.ArgumentTypeError(
            f"{as_typed(text)} ({len(text)} characters): a search has 1 to "
            f"{SEARCH_QUERY_MAX_LENGTH} characters"
        )
    return storable_text(text)


def add_operator_commands(commands: Any) -> None:
    """Register the operator commands on the CLI's subparsers."""

    def command(name: str, handler: Any, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help)
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(service_handler=handler)
        return parser

    one_workflow = {
        name: command(name, handler, help)
        for name, handler, help in (
            ("status", cmd_status, "a workflow with its steps and progress"),
            ("timeline", cmd_timeline, "every transition of a workflow, in order"),
            ("retry", cmd_retry, "resume a failed workflow at its failed step"),
            ("cancel", cmd_cancel, "cancel a workflow (at its next step boundary if running)"),
            ("compensate", cmd_compensate, "undo the completed steps of a failed or cancelled workflow"),
        )
    }
    for parser in one_workflow.values():
        parser.add_argument("id", metavar="ID", help="the workflow id")
    one_workflow["retry"].add_argument(
        "--force",
        action="store_true",
        help="retry a workflow whose outcome is unknown (a step that must not run twice was "
        "interrupted): check the outside service first",
    )
    listing = command("list", cmd_list, "workflows, newest first")
    listing.add_argument("--state", type=workflow_state, default=None, help="only this state")
    listing.add_argument("--type", type=storable_text, default=None, help="only this type")
    listing.add_argument("--user", type=storable_text, default=None, help="only this user id")
    listing.add_argument("--page", type=whole_number("a page", 1, LIST_PAGE_MAX), default=1)
    listing.add_argument(
        "--limit",
        type=whole_number("a page size", 1, LIST_LIMIT_MAX),
        default=LIST_LIMIT_DEFAULT,
        help=f"page size (at most {LIST_LIMIT_MAX})",
    )
    command("stats", cmd_stats, "counts, recent outcomes, live workers, unserved types")
    command(
        "versions", cmd_versions, "each type's definition versions: workflows in flight, finished, served by"
    )
    command("search", cmd_search, "workflows by id, idempotency key, type, user id or wallet").add_argument(
        "query", metavar="Q", type=search_query
    )
