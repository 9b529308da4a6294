"""Command line: argv -> Settings -> logging -> asyncio.run(app.…) -> exit code.

The only place that catches everything and the only place that decides the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog

from sidecar import __version__
from sidecar.config import VARIABLES, Settings
from sidecar.errors import ExitCode, SidecarError, environment_fault
from sidecar.log import configure_logging
from sidecar.process.identity import make_non_dumpable
from sidecar.redact import redact

__all__ = ["entrypoint", "main"]

log = structlog.get_logger(component="sidecar")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidecar",
        description="Hydrate a project from a signed snapshot and keep it in sync over "
        "Supabase Realtime. Configuration comes from the environment (see README).",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="container entrypoint: hydrate, sync, run CMD as a child")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the dev server command (after --)")
    sub.add_parser("hydrate", help="one-shot: hydrate and verify PROJECT_DIR, then exit")
    sub.add_parser("sync", help="apply live deltas to an already hydrated PROJECT_DIR")
    snap = sub.add_parser("snapshot", help="snapshot tools")
    snap_sub = snap.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    build = snap_sub.add_parser("build", help="build a format-1 snapshot (.tar.zst) of DIR")
    build.add_argument("dir", type=Path)
    build.add_argument("-o", "--output", type=Path, required=True)
    build.add_argument("--project-id", default=None)
    build.add_argument("--snapshot-id", default=None)
    build.add_argument("--seq", type=int, default=None)
    build.add_argument(
        "--created-at",
        default=None,
        metavar="MS|ISO8601",
        help="the snapshot's created_at (ms since 1970 or an ISO 8601 time) and every member's "
        "mtime; default SOURCE_DATE_EPOCH if set, else now. Fixed: byte-for-byte reproducible",
    )
    build.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    db = sub.add_parser("db", help="the database side (SQL migration)")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sql = db_sub.add_parser("sql", help="print the migration (psql -f, or a Supabase migration)")
    db_sql.add_argument(
        "--allow-client-broadcast",
        action="store_true",
        help="append the opt-in policy letting an `editor` token broadcast on its channel",
    )
    from sidecar.orch.commands import add_parsers

    add_parsers(sub, snap_sub)
    demo = sub.add_parser("demo", help="the whole loop against an embedded local stack")
    demo.add_argument("--dir", type=Path, default=None, help="project directory (default: temp)")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the stack and the sidecar running until Ctrl-C",
    )
    return p


def _environment_help() -> str:
    width = max(len(v.name) for v in VARIABLES)
    lines = [f"  {v.name:<{width}}  {v.doc}" for v in VARIABLES]
    return "environment variables (see README, Configuration):\n" + "\n".join(lines)


# One-shot commands whose process ends with the command: once it has returned, the state DB is
# closed, every thread joined and every log line written, so the interpreter's teardown (about
# 50 ms after a 25,000-file hydration: freeing the manifest, finalizing aiohttp) is skipped.
_ONE_SHOT = frozenset({"hydrate", "snapshot", "db", "token"})


def entrypoint() -> NoReturn:
    """The `sidecar` console script and `python -m sidecar`: run, then exit with the code."""
    args = _parser().parse_args()
    code = _main(args)
    if args.command in _ONE_SHOT:
        atexit._run_exitfuncs()  # what a normal exit would still run (coverage, profilers)
        _flush_or_drop()
        os._exit(code)
    _flush_or_drop()
    sys.exit(code)


def _flush_or_drop() -> None:
    """Flush stdout and stderr; what they cannot take (a file on a full disk, a closed pipe) is
    dropped, as sidecar/log.py's LinePrinter drops log lines, by pointing the descriptor at
    /dev/null: otherwise the interpreter's own last flush fails and the exit status is 120,
    not the child's."""
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        try:
            stream.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    return _main(_parser().parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    if args.command == "db":
        return _db(args)  # prints package data: needs no configuration or logging
    from sidecar.orch.commands import is_orchestrator_command

    if is_orchestrator_command(args):
        # Outside the container, with the service-role credentials Settings.from_env refuses.
        return _main_orchestrator(args)
    try:
        settings = Settings.from_env(os.environ, isatty=sys.stdout.isatty())
    except SidecarError as exc:
        configure_logging("console" if sys.stderr.isatty() else "json")
        return _fail(exc)
    configure_logging(
        settings.log_format,
        settings.log_level,
        project_id=settings.project_id,
        session_id=settings.session_id,
    )
    # The child and anything else of the same uid must not read our token or signed URL
    # through /proc/<pid>/environ or mem (sidecar/process/identity.py).
    make_non_dumpable()
    return _guarded(lambda: _dispatch(args, settings))


def _main_orchestrator(args: argparse.Namespace) -> int:
    from sidecar.orch.commands import dispatch, logging_options

    try:
        fmt, level = logging_options(os.environ, isatty=sys.stderr.isatty())
    except SidecarError as exc:
        configure_logging("console" if sys.stderr.isatty() else "json", stream=sys.stderr)
        return _fail(exc)
    # Logs go to stderr: stdout carries what the orchestrator reads (a token, SNAPSHOT_URL=...).
    configure_logging(
        fmt,
        level,
        project_id=getattr(args, "project", None) or "-",
        session_id=getattr(args, "session", None) or "-",
        stream=sys.stderr,
    )
    make_non_dumpable()  # it holds the service-role key or the JWT signing key
    return _guarded(lambda: dispatch(args, os.environ))


def _guarded(command: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run the command's coroutine; map every failure to its exit code (70 only for a bug)."""
    code = int(ExitCode.INTERNAL)
    try:
        try:
            code = asyncio.run(command())
        except* SidecarError as group:
            code = _fail(_first(group))
        except* Exception as group:
            first = _first(group)
            fault = environment_fault(first)
            if fault is not None:  # a full disk, a read-only mount...: not a bug (exit 70)
                code = _fail(fault)
            else:
                log.exception("sidecar.crashed", error=type(first).__name__, exc_info=first)
                print(f"sidecar: internal error: {redact(str(first))}", file=sys.stderr)
                code = int(ExitCode.INTERNAL)
    except KeyboardInterrupt:
        code = 128 + 2
    return code


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    # Imports live in the branches: `sidecar hydrate` then loads only the download/extract path
    # (no realtime, pydantic, watchfiles), which keeps its start-up time and memory small.
    if args.command == "run":
        from sidecar import app

        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        return await app.run(settings, tuple(cmd))
    if args.command == "hydrate":
        from sidecar.snapshot.hydrate import hydrate_once

        return await hydrate_once(settings)
    if args.command == "sync":
        from sidecar import app

        return await app.sync_only(settings)
    if args.command == "snapshot" and args.snapshot_command == "build":
        from sidecar.snapshot.build import build_snapshot, parse_created_at

        created_at = None if args.created_at is None else parse_created_at(args.created_at)
        manifest = await asyncio.to_thread(
            build_snapshot,
            args.dir,
            args.output,
            project_id=args.project_id or settings.project_id,
            snapshot_id=args.snapshot_id,
            created_at=created_at,
            seq=args.seq,
            level=args.level,
        )
        log.info(
            "snapshot.built",
            output=str(args.output),
            files=len(manifest.files),
            bytes=manifest.total_bytes,
            snapshot_id=manifest.snapshot_id,
        )
        return 0
    if args.command == "demo":
        from sidecar import demo

        return await demo.run(args.dir, keep_running=args.keep_running)
    raise AssertionError(args.command)


def _db(args: argparse.Namespace) -> int:
    from sidecar import sql

    text = sql.migration_sql()
    if args.allow_client_broadcast:
        text += "\n" + sql.option_sql("client_broadcast")
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _first(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _fail(exc: BaseException) -> int:
    code = int(getattr(exc, "exit_code", ExitCode.INTERNAL))
    reason = redact(str(exc))
    log.error("sidecar.failed", error=type(exc).__name__, reason=reason, exit_code=code)
    print(f"sidecar: error: {reason}", file=sys.stderr)
    return code
