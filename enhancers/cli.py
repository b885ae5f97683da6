"""The ``enhancers`` command: process a file, run an evaluation, list the stages.

``enhancers process --stages vad,limiter IN.wav OUT.wav`` runs the streaming
executor over a file; ``enhancers eval --task TASK ...`` hands over to the
module ``enhancers.eval.TASK`` (``add_arguments(parser)`` and ``run(args)``),
imported only when asked for, so a missing task gives a message, not a
traceback; ``enhancers stages`` lists the stage specs users can ask for.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from enhancers.process_name import spawn_without_main
from enhancers.registry import CHAIN_ORDER, STAGES, create_stage, parse_stage_list

EVAL_TASKS = ("denoise", "aec", "dereverb", "wer")
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_stage_settings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["limiter.ceiling_db=-3"]`` -> ``{"limiter": {"ceiling_db": -3}}``."""
    settings: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        spec, dot, option = key.rpartition(".")
        if not sep or not dot or not spec or not option:
            raise CliError(f"--set expects SPEC.OPTION=VALUE, got {item!r}")
        settings.setdefault(spec.strip().lower(), {})[option.strip()] = _parse_value(value)
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enhancers", description="Server-side audio enhancement stages.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log executor activity")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    process = commands.add_parser("process", help="run a stage chain over a sound file")
    process.add_argument("--stages", required=True, help="comma-separated stage specs, e.g. aec,denoise")
    process.add_argument("--reference", type=Path, help="far-end (echo reference) file for aec")
    process.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    process.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="SPEC.OPTION=VALUE",
        help="stage constructor option, e.g. limiter.ceiling_db=-3 (repeatable)",
    )
    process.add_argument("input", type=Path, metavar="IN.wav")
    process.add_argument("output", type=Path, metavar="OUT.wav")

    stages = commands.add_parser("stages", help="list the known stage specs")
    stages.add_argument("--check", action="store_true", help="load each stage and show its latency")

    serve = commands.add_parser("serve-executor", help="run the batched stages as a service for media processes")
    serve.add_argument("--listen", default="127.0.0.1:7070",
                       help="HOST:PORT (port 0: any free one) or unix:PATH (default 127.0.0.1:7070)")
    serve.add_argument("--token-file", type=Path,
                       help="file holding the shared token (default: env MEDIASERVER_EXECUTOR_TOKEN)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    serve.add_argument("--max-wait-ms", type=float, default=2.0,
                       help="after a job arrives, how long to wait for the other clients' jobs of the tick")
    serve.add_argument("--preload", default="", help="stage specs to load at start, e.g. denoise,aec")

    # The task's own options are added once the task module is imported (see run_eval).
    evaluate = commands.add_parser(
        "eval", add_help=False, allow_abbrev=False, help="evaluate a stage on real recordings"
    )
    evaluate.add_argument("--task", help=f"one of: {', '.join(EVAL_TASKS)}")
    evaluate.add_argument("-h", "--help", action="store_true")
    return parser


def run_process(args: argparse.Namespace) -> int:
    from enhancers.file_pipeline import process_file

    try:
        specs = [s.spec for s in parse_stage_list(args.stages)]
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not specs:
        raise CliError("--stages is empty")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda asked for, but torch sees no CUDA device")
    for label, path in (("input", args.input), ("reference", args.reference)):
        if path is not None:
            check_readable(label, path)
    settings = parse_stage_settings(args.settings)
    unknown = sorted(set(settings) - set(STAGES) - set(CHAIN_ORDER))
    if unknown:
        raise CliError(f"--set names unknown stage(s): {', '.join(unknown)}")
    try:
        result = process_file(
            args.input, args.output, specs, args.reference, device=args.device, stage_options=settings
        )
    except (ImportError, TypeError, ValueError) as exc:
        raise CliError(f"cannot load stages {','.join(specs)}: {exc}", code=1) from None
    run = result.run
    summary = {
        "input": str(args.input),
        "output": str(args.output),
        "stages": specs,
        "sample_rate": result.in_rate,
        "seconds": round(result.seconds, 3),
        "latency_samples_48k": run.latency_samples,
        "chunks": run.chunks,
        "bypassed_chunks": run.bypassed_chunks,
        "stage_errors": run.stats.get("bypass_error", 0),
    }
    print(json.dumps(summary))
    if run.bypassed_chunks:
        print(f"warning: {run.bypassed_chunks} chunk(s) passed through unprocessed", file=sys.stderr)
    return 0


def check_readable(label: str, path: Path) -> None:
    """Fail early, with one line, on a missing or undecodable sound file."""
    import soundfile

    if not path.is_file():
        raise CliError(f"{label} file not found: {path}")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError) as exc:
        raise CliError(f"cannot read {label} file {path}: {exc}") from None
    if info.frames == 0:
        raise CliError(f"{label} file {path} holds no audio")


def run_stages(args: argparse.Namespace) -> int:
    for spec, target in STAGES.items():
        kind = spec.split(":", 1)[0]
        line = f"{spec:18s} {target:48s} position {CHAIN_ORDER.index(kind) + 1}"
        if args.check:
            try:
                latency = create_stage(spec).latency_samples  # built: some stages derive it from their model
                line += f"  available, latency {latency} samples"
            except Exception as exc:  # noqa: BLE001 - any import failure: report it, keep listing
                line += f"  unavailable ({type(exc).__name__}: {exc})"
        print(line)
    return 0


def available_tasks() -> list[str]:
    return [t for t in EVAL_TASKS if importlib.util.find_spec(f"enhancers.eval.{t}") is not None]


def load_task(task: str) -> ModuleType:
    if not task.isidentifier() or task.startswith("_"):
        raise CliError(f"invalid eval task {task!r}")
    name = f"enhancers.eval.{task}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            have = ", ".join(available_tasks()) or "none installed"
            raise CliError(f"unknown eval task {task!r} (available: {have})") from None
        raise CliError(f"eval task {task!r} cannot be imported: missing module {exc.name!r}") from None
    if not callable(getattr(module, "add_arguments", None)) or not callable(getattr(module, "run", None)):
        raise CliError(f"{name} is not an eval task (needs add_arguments(parser) and run(args))")
    return module


def run_eval(args: argparse.Namespace, rest: list[str]) -> int:
    if not args.task and rest and rest[0] in EVAL_TASKS:  # ``enhancers eval wer ...`` = ``--task wer``
        args.task, rest = rest[0], rest[1:]
    if not args.task:
        usage = "usage: enhancers eval --task TASK [task options]\n"
        usage += f"tasks: {', '.join(EVAL_TASKS)} (installed: {', '.join(available_tasks()) or 'none'})"
        print(usage, file=sys.stdout if args.help else sys.stderr)
        return 0 if args.help else EXIT_USAGE
    module = load_task(args.task)
    parser = argparse.ArgumentParser(prog=f"enhancers eval --task {args.task}")
    module.add_arguments(parser)
    task_args = parser.parse_args(rest + (["--help"] if args.help else []))
    task_args.task = args.task
    return int(module.run(task_args))


def run_serve_executor(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from enhancers.executor.loading import resolve_device
    from enhancers.executor.service import serve_executor

    token = (args.token_file.read_text().strip() if args.token_file else
             os.environ.get("MEDIASERVER_EXECUTOR_TOKEN", "")).encode()
    if not token:
        raise CliError("give --token-file or set MEDIASERVER_EXECUTOR_TOKEN (clients prove they know it)")
    preload = [s.spec for s in parse_stage_list(args.preload)] if args.preload else []
    try:
        asyncio.run(serve_executor(args.listen, token, device=str(resolve_device(args.device)),
                                   max_wait_ms=args.max_wait_ms, preload=preload))
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.command != "eval" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    spawn_without_main()
    try:
        if args.command == "process":
            return run_process(args)
        if args.command == "stages":
            return run_stages(args)
        if args.command == "serve-executor":
            return run_serve_executor(args)
        return run_eval(args, rest)
    except CliError as exc:
        print(f"enhancers: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
