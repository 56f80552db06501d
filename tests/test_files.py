"""Files larger than a message (contract 1.1, "Files"), against a real replica, nats-server and
object store: a workbook of several megabytes in and CSVs out with their digests checked, a job's
outputs under its job id, and every bad reference refused as ``invalid_request`` naming the
alias with nothing run. Below the service, with the policy layer off: ``in/`` is read-only to
the run, and links the script makes in ``out/`` are not followed by the pool.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import openpyxl
import pytest
from pyexec_client.client import Client

from consumer.protocol import CodeRequest, FileRef, Reply
from sandbox import InputFile, Job, Pool, PoolConfig
from tests.conftest import (
    KEY_ID,
    OLD_KEY_ID,
    OLD_SECRET,
    SECRET,
    NatsServer,
    ReplicaProcess,
    free_port,
    start_replica,
    until,
)

PREFIX = "files"
ROWS = 40_000

SUMMARY = """
import pandas as pd
def execute(ctx):
    frame = pd.read_excel("in/book.xlsx")
    totals = frame.groupby("region")["amount"].sum().round(2)
    totals.to_csv("out/summary.csv")
    frame.to_csv("out/all.csv", index=False)
    return {"rows": len(frame), "regions": sorted(totals.index)}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, ReplicaProcess]]:
    server = NatsServer(port=free_port(), store=tmp_path_factory.mktemp("files-js"))
    server.start()
    replica = start_replica(
        server.url,
        PREFIX,
        EXECUTOR_WORKERS="2",
        EXECUTOR_FILES_MAX_MB="24",
        EXECUTOR_SCRATCH_MB="64",
        EXECUTOR_MAX_TIMEOUT="60",
        EXECUTOR_MAX_JOB_TIMEOUT="60",
    )
    try:
        yield server, replica
    finally:
        replica.stop()
        server.stop()


@pytest.fixture(scope="module")
def workbook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workbook of a few megabytes: 40 000 rows, one column of incompressible text."""
    path = tmp_path_factory.mktemp("book") / "book.xlsx"
    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("orders")
    sheet.append(["order", "region", "amount", "token"])
    regions = ("north", "south", "east", "west")
    for i in range(ROWS):
        token = base64.b64encode(os.urandom(60)).decode()
        sheet.append([i, regions[i % 4], (i % 1000) / 10, token])
    book.save(path)
    return path


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def client_for(server: NatsServer, key_id: str = KEY_ID, secret: str = SECRET) -> Client:
    return await Client.connect(server.url, key_id, secret, prefix=PREFIX)


def test_a_workbook_of_megabytes_in_and_csvs_out(
    fleet: tuple[NatsServer, ReplicaProcess], workbook: Path
) -> None:
    """The workbook is put under the key, the script reads it at in/book.xlsx and leaves two
    CSVs in out/: the reply lists them under <key id>/<request id>/ with sizes and digests,
    and what get_file returns matches them."""
    server, _ = fleet
    assert workbook.stat().st_size > 2_500_000

    async def scenario() -> tuple[Reply, dict[str, bytes], FileRef]:
        async with await client_for(server) as client:
            ref = await client.put_file(workbook, "inputs/book.xlsx")
            reply = await client.execute_code(
                SUMMARY, files={"book.xlsx": ref}, timeout=60, request_id="summary-1"
            )
            fetched = {}
            for item in reply.files or []:
                fetched[item.name] = await client.get_file(item.object, sha256=item.sha256)
            return reply, fetched, ref

    reply, fetched, ref = run(scenario())
    assert ref.sha256 == hashlib.sha256(workbook.read_bytes()).hexdigest()
    assert reply.status == "ok", reply.error
    assert reply.result == {"rows": ROWS, "regions": ["east", "north", "south", "west"]}
    listed = {item.name: item for item in reply.files or []}
    assert sorted(listed) == ["all.csv", "summary.csv"]
    for name, item in listed.items():
        assert item.object == f"{KEY_ID}/summary-1/{name}"
        assert item.bytes == len(fetched[name])
        assert item.sha256 == hashlib.sha256(fetched[name]).hexdigest()
    assert fetched["summary.csv"].decode().splitlines()[0] == "region,amount"
    assert len(fetched["all.csv"]) > 2_000_000


def test_files_field_is_absent_without_files_and_empty_when_none_were_written(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    server, _ = fleet

    async def scenario() -> tuple[Reply, Reply, Reply]:
        async with await client_for(server) as client:
            ref = await client.put_file(b"a,b\n1,2\n", "small.csv")
            plain = await client.execute_code("def execute(ctx):\n    return 1\n")
            read_only = await client.execute_code(
                "def execute(ctx):\n    return open('in/t.csv').read()\n", files={"t.csv": ref}
            )
            writes = await client.execute_code(
                "def execute(ctx):\n    open('out/n.txt', 'w').write('x')\n    return 2\n"
            )
            return plain, read_only, writes

    plain, read_only, writes = run(scenario())
    assert plain.files is msgspec.UNSET
    assert (read_only.result, read_only.files) == ("a,b\n1,2\n", [])
    assert [f.name for f in writes.files or []] == ["n.txt"]


def test_a_job_reads_files_and_its_outputs_are_stored_under_its_job_id(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    server, _ = fleet

    async def scenario() -> tuple[str, Reply]:
        async with await client_for(server) as client:
            ref = await client.put_file(b"hello", "job-in.txt")
            job_id = await client.submit_code(
                "def execute(ctx):\n"
                "    text = open('in/x.txt').read()\n"
                "    open('out/upper.txt', 'w').write(text.upper())\n"
                "    return text\n",
                files={"x.txt": ref},
            )
            completion = await client.wait(job_id, timeout=60)
            assert completion.files
            data = await client.get_file(completion.files[0].object)
            assert data == b"HELLO"
            return job_id, completion

    job_id, completion = run(scenario())
    assert completion.result == "hello"
    assert completion.files is not None
    assert completion.files[0].object == f"{KEY_ID}/{job_id}/upper.txt"


@pytest.mark.parametrize(
    ("alias", "edit", "expected"),
    [
        ("data.csv", {"sha256": "0" * 64}, "does not have the SHA-256 given"),
        ("data.csv", {"object": f"{KEY_ID}/missing.csv"}, "no object"),
        ("data.csv", {"object": f"{OLD_KEY_ID}/theirs.csv"}, "is not under this key's prefix"),
        ("data.csv", {"object": f"{KEY_ID}/../{OLD_KEY_ID}/theirs.csv"}, "'..' part"),
        ("data.csv", {"object": f"{KEY_ID}//x.csv"}, "an empty"),
        ("sub/data.csv", {}, "is not a plain file name"),
        ("..", {}, "is not a plain file name"),
        (".hidden", {}, "is not a plain file name"),
    ],
)
def test_every_bad_file_reference_is_invalid_request_naming_it(
    fleet: tuple[NatsServer, ReplicaProcess], alias: str, edit: dict[str, str], expected: str
) -> None:
    """A wrong digest, a missing object, another key's object, names that would leave the
    caller's prefix or the scratch folder: rejected/invalid_request, sync and async, and the
    script (which would leave a file in out/) never runs."""
    server, _ = fleet
    source = "def execute(ctx):\n    open('out/ran.txt', 'w').write('ran')\n    return 1\n"

    async def scenario() -> tuple[Reply, Reply]:
        async with await client_for(server, OLD_KEY_ID, OLD_SECRET) as other:
            await other.put_file(b"secret", "theirs.csv")
        async with await client_for(server) as client:
            ref = await client.put_file(b"x,y\n", "data.csv")
            changed = FileRef(
                object=edit.get("object", ref.object), sha256=edit.get("sha256", ref.sha256)
            )
            sync = await client.execute_code(source, files={alias: changed})
            submitted = await client.send(
                f"{PREFIX}.code",
                CodeRequest(
                    code=source,
                    mode="async",
                    files={alias: changed},
                    request_id=os.urandom(8).hex(),
                ),
            )
            return sync, submitted

    sync, submitted = run(scenario())
    for reply in (sync, submitted):
        assert reply.status == "rejected"
        assert reply.error is not None
        assert reply.error.code == "invalid_request"
        assert expected in reply.error.message
        assert repr(alias)[1:-1] in reply.error.message or alias in reply.error.message
        assert reply.files is msgspec.UNSET


def test_too_many_or_too_large_out_files_end_output_limit(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """101 files in out/, or 30 MB over the 24 MB limit: output_limit, nothing stored; a
    result too large for a reply says to write to out/ instead."""
    server, _ = fleet
    many = (
        "def execute(ctx):\n"
        "    for i in range(101):\n"
        "        open('out/f%d.txt' % i, 'w').write('x')\n"
    )
    large = (
        "def execute(ctx):\n"
        "    block = 'x' * (1024 * 1024)\n"
        "    for i in range(3):\n"
        "        with open('out/big%d.txt' % i, 'w') as f:\n"
        "            for _ in range(10):\n"
        "                f.write(block)\n"
    )
    huge_result = "def execute(ctx):\n    return 'x' * 2_000_000\n"

    async def scenario() -> list[Reply]:
        async with await client_for(server) as client:
            return [
                await client.execute_code(source, timeout=60)
                for source in (many, large, huge_result)
            ]

    replies = run(scenario())
    for reply in replies:
        assert reply.status == "error"
        assert reply.error is not None
        assert reply.error.code == "output_limit"
        assert reply.files is msgspec.UNSET
    assert "more than 100 files" in replies[0].error.message  # type: ignore[union-attr]
    assert "24 MB" in replies[1].error.message  # type: ignore[union-attr]
    assert "out/" in replies[2].error.message  # type: ignore[union-attr]


# -- below the service --------------------------------------------------------------------------


def test_with_the_policy_off_inputs_are_read_only_and_out_links_are_not_followed(
    tmp_path: Path,
) -> None:
    """Plain Python (import os): writing, appending to or chmod-ing in/ fails; a symbolic link
    and a hard link left in out/ (to the service's files) are not read by the pool: only the
    script's own plain file is listed."""
    secret = tmp_path / "service-secret.txt"
    secret.write_text("do not leak")
    source = f"""
import os
def execute(ctx):
    failures = []
    for attempt in (lambda: open("in/data.txt", "a"),
                    lambda: os.chmod("in/data.txt", 0o666),
                    lambda: os.unlink("in/data.txt"),
                    lambda: open("in/new.txt", "w")):
        try:
            attempt()
            failures.append("allowed")
        except OSError as exc:
            failures.append(type(exc).__name__)
    for make in (lambda: os.symlink({str(secret)!r}, "out/link.txt"),
                 lambda: os.link({str(secret)!r}, "out/hard.txt"),
                 lambda: os.symlink("/etc/passwd", "out/passwd")):
        try:
            make()
        except OSError:
            pass
    open("out/own.txt", "w").write("mine")
    return [failures, open("in/data.txt").read(), os.getcwd()]
"""

    async def scenario() -> Any:
        config = PoolConfig(workers=1, warm_children=1, disabled_layers=("policy",))
        async with Pool(config) as pool:
            with tempfile.TemporaryFile() as handle:
                handle.write(b"input")
                handle.flush()
                outcome = await pool.run(
                    Job(
                        source=source,
                        ctx={},
                        timeout=20,
                        inputs=(InputFile(alias="data.txt", fd=handle.fileno(), size=5),),
                    )
                )
            names = {item.name: os.pread(item.fd, 100, 0) for item in outcome.files}
            for item in outcome.files:
                os.close(item.fd)
            # The run's folder, its read-only in/ included, is removed once it is reaped
            # (while the pool, and so its scratch root, is still there).
            folder = Path(outcome.result[2])
            await asyncio.to_thread(
                until, lambda: not folder.exists(), what="the run's folder removed"
            )
            return outcome, names

    outcome, names = run(scenario())
    assert outcome.status == "ok", outcome.error
    failures, content, _ = outcome.result
    assert "allowed" not in failures
    assert content == "input"
    assert names == {"own.txt": b"mine"}


def test_named_scripts_take_and_make_files(fleet: tuple[NatsServer, ReplicaProcess]) -> None:
    """excel.write leaves its workbook in out/ (out_file), which goes straight back in as
    excel.read's in_file and table.describe's; table.aggregate reads a CSV file and writes its
    result as one; inline base64 still works for small workbooks."""
    server, _ = fleet
    rows = [{"region": ["north", "south"][i % 2], "amount": i} for i in range(500)]

    async def scenario() -> dict[str, Any]:
        async with await client_for(server) as client:
            written = await client.execute_named(
                "excel.write",
                {"sheets": [{"name": "orders", "rows": rows}], "out_file": "orders.xlsx"},
                request_id="named-write",
            )
            assert written.files, written.error
            book = written.files[0]
            ref = FileRef(object=book.object, sha256=book.sha256)
            read = await client.execute_named(
                "excel.read", {"in_file": "book.xlsx"}, files={"book.xlsx": ref}
            )
            described = await client.execute_named(
                "table.describe", {"in_file": "book.xlsx"}, files={"book.xlsx": ref}
            )
            csv = await client.put_file(
                (
                    "region,amount\n" + "".join(f"{r['region']},{r['amount']}\n" for r in rows)
                ).encode(),
                "orders.csv",
            )
            aggregated = await client.execute_named(
                "table.aggregate",
                {
                    "in_file": "orders.csv",
                    "group_by": ["region"],
                    "aggregations": [{"column": "amount", "op": "sum"}],
                    "out_file": "totals.csv",
                },
                files={"orders.csv": csv},
            )
            totals = await client.get_file(aggregated.files[0].object) if aggregated.files else None
            inline = await client.execute_named(
                "excel.write", {"sheets": [{"name": "s", "rows": [[1]]}]}
            )
            return {
                "written": written,
                "read": read,
                "described": described,
                "aggregated": aggregated,
                "totals": totals,
                "inline": inline,
            }

    seen = run(scenario())
    assert seen["written"].result["out_file"] == "orders.xlsx"
    assert "file" not in seen["written"].result
    assert seen["written"].files[0].object == f"{KEY_ID}/named-write/orders.xlsx"
    sheet = seen["read"].result["sheets"][0]
    assert sheet["columns"] == ["region", "amount"]
    assert len(sheet["rows"]) == 500
    assert seen["described"].result["rows"] == 500
    assert seen["aggregated"].status == "ok", seen["aggregated"].error
    assert seen["aggregated"].result["out_file"] == "totals.csv"
    assert seen["totals"].decode().splitlines() == [
        "region,amount_sum",
        f"north,{sum(range(0, 500, 2))}",
        f"south,{sum(range(1, 500, 2))}",
    ]
    assert seen["inline"].result["file"]
    assert seen["inline"].files is msgspec.UNSET


def test_input_files_over_the_limit_are_refused_before_anything_runs(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """The request's files may hold EXECUTOR_FILES_MAX_MB (24 here) in all: 25 MB is
    invalid_request naming the alias, nothing runs."""
    server, _ = fleet

    async def scenario() -> Reply:
        async with await client_for(server) as client:
            ref = await client.put_file(os.urandom(25 * 1024 * 1024), "too-big.bin")
            return await client.execute_code(
                "def execute(ctx):\n    open('out/ran.txt', 'w').write('ran')\n",
                files={"big.bin": ref},
            )

    reply = run(scenario())
    assert reply.status == "rejected"
    assert reply.error is not None
    assert reply.error.code == "invalid_request"
    assert "'big.bin'" in reply.error.message
    assert "24 MB" in reply.error.message


@pytest.mark.parametrize("disabled", [(), ("policy",)], ids=["all layers", "policy off"])
def test_input_files_count_toward_the_scratch_quota(disabled: tuple[str, ...]) -> None:
    """A run whose scratch folder may hold 8 MB gets a 6 MB input: writing 1 MB more is fine,
    writing 3 MB more ends disk_limit (the input is counted), with the policy layer off too."""
    write = (
        "def execute(ctx):\n"
        "    with open('mine.bin', 'wb') as handle:\n"
        "        for _ in range(ctx['mb']):\n"
        "            handle.write(b'x' * (1024 * 1024))\n"
        "    return ctx['mb']\n"
    )

    async def scenario() -> list[Any]:
        config = PoolConfig(
            workers=1, warm_children=1, scratch_limit_mb=8, disabled_layers=disabled
        )
        outcomes = []
        async with Pool(config) as pool:
            with tempfile.TemporaryFile() as handle:
                handle.write(os.urandom(6 * 1024 * 1024))
                handle.flush()
                item = InputFile(alias="six.bin", fd=handle.fileno(), size=6 * 1024 * 1024)
                for mb in (1, 3):
                    job = Job(source=write, ctx={"mb": mb}, timeout=20, inputs=(item,))
                    outcomes.append(await pool.run(job))
        return outcomes

    fits, over = run(scenario())
    assert (fits.status, fits.result) == ("ok", 1)
    assert over.status == "error"
    assert over.error is not None
    assert over.error.code == "disk_limit"


def held_in_deleted_files(pid: int) -> int:
    """Bytes a process holds in open files that have no name any more (staged inputs)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).endswith("(deleted)"):
                total += fd.stat().st_blocks * 512
        except OSError:
            continue
    return total


def test_files_are_fetched_only_by_requests_that_hold_a_worker(server: NatsServer) -> None:
    """One worker, no queue: twelve requests at once naming an 8 MB object. The replica fetches
    the object for the one request that runs, never for all twelve at once: the others are
    answered 'overloaded' without it, and what it holds of staged files stays one object."""
    replica = start_replica(
        server.url,
        "filesbound",
        EXECUTOR_WORKERS="1",
        EXECUTOR_QUEUE_LIMIT="0",
        EXECUTOR_FILES_MAX_MB="16",
    )
    peak = [0]
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            peak[0] = max(peak[0], held_in_deleted_files(replica.process.pid))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    try:

        async def scenario() -> list[Reply]:
            async with await Client.connect(server.url, KEY_ID, SECRET, prefix="filesbound") as c:
                ref = await c.put_file(os.urandom(8 * 1024 * 1024), "eight.bin")
                source = "import time\ndef execute(ctx):\n    time.sleep(1)\n    return 1\n"
                watcher.start()
                return list(
                    await asyncio.gather(
                        *(c.execute_code(source, files={"e.bin": ref}) for _ in range(12))
                    )
                )

        replies = run(scenario())
    finally:
        watching.set()
        replica.stop()
    statuses = sorted(r.status for r in replies)
    assert "ok" in statuses
    assert set(statuses) <= {"ok", "rejected"}
    assert all(r.error.code == "overloaded" for r in replies if r.status == "rejected")
    assert peak[0] <= 10 * 1024 * 1024, peak[0]


async def plant_meta(nc: Any, bucket: str, meta: dict[str, Any]) -> None:
    """Write object metadata as any client allowed to write the bucket could."""
    token = base64.urlsafe_b64encode(meta["name"].encode()).decode()
    await nc.jetstream().publish(
        f"$O.{bucket}.M.{token}", json.dumps(meta).encode(), headers={"Nats-Rollup": "sub"}
    )


def test_metadata_that_borrows_another_objects_data_is_refused(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """Key 'old' copies the metadata of key 'test''s object (chunk id, size, digest) under a
    name of its own, or names every chunk ('>') or many one-byte chunks: each is
    invalid_request, and the victim's data never reaches the attacker's run."""
    server, _ = fleet
    bucket = "PYEXEC_FILES_FILES"
    source = "def execute(ctx):\n    return open('in/x', 'rb').read().decode()\n"

    async def scenario() -> list[Reply]:
        async with await client_for(server) as victim:
            secret = await victim.put_file(b"salary,alice,123456\n", "payroll.csv")
            store = await victim.nc.jetstream().object_store(bucket)
            info = await store.get_info(secret.object)
        async with await client_for(server, OLD_KEY_ID, OLD_SECRET) as attacker:
            nc = attacker.nc
            borrowed = {**info.as_dict(), "name": f"{OLD_KEY_ID}/borrowed.csv"}
            every = {**borrowed, "name": f"{OLD_KEY_ID}/every.csv", "nuid": ">"}
            await plant_meta(nc, bucket, borrowed)
            await plant_meta(nc, bucket, every)
            tiny_nuid = "tiny0123456789"
            for _ in range(300):
                await nc.jetstream().publish(f"$O.{bucket}.C.{tiny_nuid}", b"x")
            tiny = {
                **borrowed,
                "name": f"{OLD_KEY_ID}/tiny.bin",
                "nuid": tiny_nuid,
                "size": 300,
                "chunks": 300,
                "digest": "SHA-256="
                + base64.urlsafe_b64encode(hashlib.sha256(b"x" * 300).digest()).decode(),
            }
            await plant_meta(nc, bucket, tiny)
            replies = []
            for name, digest in (
                ("borrowed.csv", secret.sha256),
                ("every.csv", secret.sha256),
                ("tiny.bin", hashlib.sha256(b"x" * 300).hexdigest()),
            ):
                ref = FileRef(object=f"{OLD_KEY_ID}/{name}", sha256=digest)
                replies.append(await attacker.execute_code(source, files={"x": ref}))
            return replies

    for reply in run(scenario()):
        assert reply.status == "rejected", reply
        assert reply.error is not None
        assert reply.error.code == "invalid_request"
        assert "files['x']" in reply.error.message
        assert "salary" not in json.dumps(msgspec.to_builtins(reply))


def test_metadata_planted_at_an_output_name_purges_nothing(
    fleet: tuple[NatsServer, ReplicaProcess],
) -> None:
    """Metadata planted at the name a run's output will get, naming every chunk ('>'): the
    replica stores the output over it, and every other object is still there, intact."""
    server, _ = fleet
    bucket = "PYEXEC_FILES_FILES"

    async def scenario() -> tuple[Reply, bytes | None]:
        async with await client_for(server) as client:
            keep = await client.put_file(b"keep me", "keep.txt")
            request_id = f"planted-{time.time_ns()}"
            await plant_meta(
                client.nc,
                bucket,
                {
                    "name": f"{KEY_ID}/{request_id}/report.csv",
                    "bucket": bucket,
                    "nuid": ">",
                    "size": 1,
                    "chunks": 1,
                    "digest": "SHA-256=x",
                    "deleted": False,
                    "options": {"max_chunk_size": 131072},
                },
            )
            reply = await client.execute_code(
                "def execute(ctx):\n    open('out/report.csv', 'w').write('r')\n",
                request_id=request_id,
            )
            return reply, await client.get_file(keep.object, sha256=keep.sha256)

    reply, kept = run(scenario())
    assert reply.status == "ok", reply.error
    assert kept == b"keep me"


def test_open_takes_a_path_not_a_url(fleet: tuple[NatsServer, ReplicaProcess]) -> None:
    """open('http://...') is a policy violation: open reads and writes the scratch folder."""
    server, _ = fleet

    async def scenario() -> Reply:
        async with await client_for(server) as client:
            return await client.execute_code(
                "def execute(ctx):\n    return open('http:/etc/passwd').read()\n"
            )

    reply = run(scenario())
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "policy_violation"
    assert "URL" in reply.error.message


@pytest.mark.parametrize(
    ("call", "refused"),
    [
        ("open('/etc/passwd')", "only the run's scratch folder"),
        ("open('../x', 'w')", "only the run's scratch folder"),
        ("open(0)", "file descriptor"),
        ("open('out/x', 'wb', 0)", "unbuffered"),
        ("open('out/x', 'w', opener=len)", "opener"),
    ],
)
def test_open_is_guarded(fleet: tuple[NatsServer, ReplicaProcess], call: str, refused: str) -> None:
    """The open builtin refuses paths outside the scratch folder, descriptors, raw unbuffered
    files and openers, as policy violations."""
    server, _ = fleet

    async def scenario() -> Reply:
        async with await client_for(server) as client:
            return await client.execute_code(f"def execute(ctx):\n    return {call}\n")

    reply = run(scenario())
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code == "policy_violation", reply.error
    assert refused in reply.error.message
