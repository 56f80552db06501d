"""The ``pyexec`` command: serve, call, job, keygen, scripts, doctor, bench."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
from pyexec_client.client import Client
from pyexec_client.errors import ClientError

from consumer import bench, config, logs
from consumer.catalog import Catalog
from consumer.config import Keyring, Settings
from consumer.embedded import EmbeddedNats
from consumer.errors import ConfigError, InvalidRequest, UnknownScript
from consumer.protocol import CodeRequest, NamedRequest
from consumer.service import Replica
from consumer.target import DEV_ENV_FILE, Target, find_target
from sandbox import LayerStatus, Pool, TierState

DEV_KEY_ID = "dev"
EXIT_CODES = {"ok": 0, "accepted": 0, "error": 1, "timeout": 1, "rejected": 2}


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except (ConfigError, ClientError, OSError) as exc:
        print(f"pyexec: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyexec", description="Sandboxed Python execution over NATS."
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run a replica (embedded NATS unless NATS_URL)")
    serve.set_defaults(handler=_serve)

    call = commands.add_parser("call", help="sign and send one request, print the reply")
    source = call.add_mutually_exclusive_group(required=True)
    source.add_argument("file", nargs="?", type=Path, help="a .py file that defines execute(ctx)")
    source.add_argument("--name", help="an installed script's name, e.g. text.normalize")
    call.add_argument("--ctx", default="{}", help="the ctx object as JSON (default {})")
    call.add_argument("--timeout", type=float, help="seconds (default: the executor's)")
    call.add_argument("--async", dest="run_async", action="store_true", help="submit as a job")
    call.add_argument("--request-id", help="echoed back in the reply")
    call.add_argument("--msgpack", action="store_true", help="send and receive MessagePack")
    call.add_argument("--key-id", help="which key of EXECUTOR_API_KEYS signs (default: first)")
    call.add_argument(
        "--file",
        dest="files",
        action="append",
        default=[],
        metavar="ALIAS=PATH",
        help="put PATH into the file store and give it to the script at in/ALIAS (repeatable)",
    )
    call.add_argument(
        "--out", type=Path, help="save the files the script leaves in out/ into this folder"
    )
    call.set_defaults(handler=_call)

    job = commands.add_parser("job", help="ask about or cancel an async job")
    job.add_argument("action", choices=("status", "cancel"), help="what to do with the job")
    job.add_argument("job_id", help="the job id (from an accepted reply)")
    job.add_argument("--key-id", help="which key of EXECUTOR_API_KEYS signs (default: first)")
    job.set_defaults(handler=_job)

    keygen = commands.add_parser("keygen", help="print a new id:secret for EXECUTOR_API_KEYS")
    keygen.add_argument("--id", default=None, help="the key id (default: a random one)")
    keygen.set_defaults(handler=_keygen)

    scripts = commands.add_parser(
        "scripts", help="list the installed scripts, or show one with its input"
    )
    scripts.add_argument("name", nargs="?", help="show this script's description and input")
    scripts.set_defaults(handler=_scripts)

    doctor = commands.add_parser("doctor", help="say which isolation layers work on this host")
    doctor.add_argument(
        "--timings", action="store_true", help="also show what each step costs, in milliseconds"
    )
    doctor.set_defaults(handler=_doctor)

    bench_parser = commands.add_parser("bench", help="run the load benchmark over NATS")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=bench.main)
    return parser


# -- serve -------------------------------------------------------------------------------------


def _serve(_args: argparse.Namespace) -> int:
    settings = config.load()
    logs.configure(settings.log_format)
    if not settings.embedded:
        if not settings.keys:
            raise ConfigError(
                "NATS_URL is set but no signing key is: set EXECUTOR_API_KEYS or EXECUTOR_API_KEY"
            )
        asyncio.run(Replica(settings, list(settings.nats_urls or ())).run())
        return 0
    server = EmbeddedNats(settings.data_dir)
    server.start()
    try:
        settings = _dev_settings(settings, server.url)
        asyncio.run(Replica(settings, [server.url]).run())
    finally:
        server.stop()
    return 0


def _dev_settings(settings: Settings, url: str) -> Settings:
    """Make a dev key if none is set, and write where ``pyexec call`` finds the server."""
    lines = [f"NATS_URL={url}"]
    generated = not settings.keys
    if generated:
        secret = secrets.token_hex(32)
        settings = dataclasses.replace(settings, keys=Keyring({DEV_KEY_ID: secret}))
        lines.append(f"EXECUTOR_API_KEYS={DEV_KEY_ID}:{secret}")
    env_file = settings.data_dir / DEV_ENV_FILE
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    print(f"pyexec: embedded NATS server at {url} (JetStream data in {settings.data_dir})")
    if generated:
        print(f"pyexec: development key made: EXECUTOR_API_KEYS={lines[1].split('=', 1)[1]}")
    print(f"pyexec: settings for 'pyexec call' written to {env_file}")
    print('pyexec: try: pyexec call --name text.normalize --ctx \'{"text": "  Hello   World "}\'')
    sys.stdout.flush()
    return settings


# -- call --------------------------------------------------------------------------------------


def _call(args: argparse.Namespace) -> int:
    try:
        ctx = json.loads(args.ctx)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--ctx is not valid JSON: {exc}") from None
    if not isinstance(ctx, dict):
        raise ConfigError("--ctx must be a JSON object")
    files = _file_arguments(args.files)
    target = find_target(args.key_id)
    reply = asyncio.run(_send(args, target, ctx=ctx, files=files))
    print(json.dumps(msgspec.to_builtins(reply), indent=2, ensure_ascii=False))
    return EXIT_CODES.get(reply.status, 1)


def _job(args: argparse.Namespace) -> int:
    target = find_target(args.key_id)

    async def ask() -> Any:
        async with await target.connect() as client:
            if args.action == "cancel":
                return await client.cancel(args.job_id)
            return await client.status(args.job_id)

    answer = asyncio.run(ask())
    print(json.dumps(msgspec.to_builtins(answer), indent=2, ensure_ascii=False))
    return 0 if answer.state != "unknown" else 1


def _file_arguments(given: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for item in given:
        alias, sep, path = item.partition("=")
        if not sep or not alias or not path:
            raise ConfigError(f"--file takes ALIAS=PATH, not '{item}'")
        if alias in files:
            raise ConfigError(f"--file: alias '{alias}' is given twice")
        if not Path(path).is_file():
            raise ConfigError(f"--file {alias}: no file at '{path}'")
        files[alias] = Path(path)
    return files


async def _send(
    args: argparse.Namespace, target: Target, *, ctx: dict[str, Any], files: dict[str, Path]
) -> Any:
    encoding = "msgpack" if args.msgpack else "json"
    async with await target.connect(encoding) as client:
        refs = {
            alias: await client.put_file(path, f"{uuid.uuid4().hex}/{path.name}")
            for alias, path in files.items()
        }
        reply = await _request(args, client, ctx, refs or None)
        if args.out is not None and reply.files:
            args.out.mkdir(parents=True, exist_ok=True)
            for item in reply.files:
                await client.get_file(item.object, args.out / item.name, sha256=item.sha256)
                print(f"pyexec: saved {args.out / item.name}", file=sys.stderr)
        return reply


async def _request(
    args: argparse.Namespace, client: Client, ctx: dict[str, Any], files: dict[str, Any] | None
) -> Any:
    prefix = client.prefix
    if args.run_async:
        # Submitted through the replica (mode async); then the completion is awaited.
        if args.name:
            request: Any = NamedRequest(
                name=args.name, ctx=ctx, timeout=args.timeout, mode="async",
                request_id=args.request_id, files=files,
            )  # fmt: skip
        else:
            request = CodeRequest(
                code=args.file.read_text(encoding="utf-8"), ctx=ctx, timeout=args.timeout,
                mode="async", request_id=args.request_id, files=files,
            )  # fmt: skip
        kind = "named" if args.name else "code"
        accepted = await client.send(f"{prefix}.{kind}", request, 5)
        if accepted.status != "accepted" or accepted.job_id is None:
            return accepted
        print(f"pyexec: job {accepted.job_id} accepted; waiting for its completion",
              file=sys.stderr)  # fmt: skip
        return await client.wait(accepted.job_id, (args.timeout or 30) + 60)
    if args.name:
        return await client.execute_named(
            args.name, ctx, timeout=args.timeout, request_id=args.request_id, files=files
        )
    code = args.file.read_text(encoding="utf-8")
    return await client.execute_code(
        code, ctx, timeout=args.timeout, request_id=args.request_id, files=files
    )


# -- keygen, scripts ---------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    key_id = args.id or f"key-{secrets.token_hex(4)}"
    if not config.KEY_ID.fullmatch(key_id):
        raise ConfigError("--id may hold letters, digits, '.', '_' and '-' only")
    print(f"{key_id}:{secrets.token_hex(32)}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """Start a pool as ``serve`` would and report its isolation layers and warm parents; 1 if
    any layer is missing."""
    settings = config.load()

    async def inspect() -> tuple[list[LayerStatus], list[TierState], dict[str, float]]:
        async with Pool(settings.pool) as pool:
            return pool.layers, pool.states(), pool.timings

    found, tiers, timings = asyncio.run(inspect())
    for layer in found:
        mark = "active  " if layer.active else "INACTIVE"
        print(f"{layer.name:9} {mark} {layer.detail}")
    print("\nwarm parents (each applies every layer above to its children):")
    for tier in tiers:
        print(
            f"  {tier.tier:7} {tier.preloaded:3} modules preloaded, "
            f"{tier.timings.get('import libraries', 0):7.1f} ms to import, "
            f"{tier.huge_pages_mb:6.1f} MB in huge pages"
        )
    if args.timings:
        print("\ntimings (ms):")
        for step, ms in timings.items():
            print(f"  {step:55} {ms:9.3f}")
    missing = [layer.name for layer in found if not layer.active]
    if missing:
        print(
            f"missing: {', '.join(missing)}; 'pyexec serve' warns, or refuses to start with "
            "EXECUTOR_REQUIRE_ISOLATION=1"
        )
        return 1
    print("all isolation layers are active")
    return 0


def _scripts(args: argparse.Namespace) -> int:
    settings = config.load()
    catalog = Catalog(settings.scripts_dir)
    if args.name is None:
        for info in catalog.scripts():
            print(f"{info.name:30} {info.summary}")
        return 0
    try:
        print(catalog.describe(args.name))
    except (UnknownScript, InvalidRequest) as exc:
        print(f"pyexec: {exc}", file=sys.stderr)
        return 1
    return 0
