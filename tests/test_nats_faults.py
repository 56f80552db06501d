"""NATS faults against real servers and real replicas: a server restart, a cluster node killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamInfo
from pyexec_client.client import Client
from pyexec_client.errors import ClientError

from consumer.embedded import server_binary
from consumer.jobs.worker import DURABLE
from consumer.protocol import CodeRequest, Reply
from tests.conftest import (
    KEY_ID,
    SECRET,
    Caller,
    NatsServer,
    ReplicaProcess,
    free_port,
    start_replica,
    until,
)
from tests.test_operations import get, scrape, status, value

PREFIX = "pyexec"  # the default prefix: streams PYEXEC_JOBS and PYEXEC_RESULTS
JOBS = "PYEXEC_JOBS"
RESULTS = "PYEXEC_RESULTS"
# The key-value buckets of the replay store and the job ledger, as streams.
STORES = ("KV_PYEXEC_NONCES", "KV_PYEXEC_JOB_IDS")
QUICK = "def execute(ctx):\n    return ctx['n']\n"
SLOW = "import time\ndef execute(ctx):\n    time.sleep(ctx['seconds'])\n    return ctx['n'] * 10\n"
# Jobs come back quickly after a lost delivery; graceful stops do not hang the test.
JOB_ENV = {"EXECUTOR_JOB_ACK_WAIT": "3", "EXECUTOR_SHUTDOWN_GRACE": "5"}


async def until_async(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.05)


def events(replica: ReplicaProcess, event: str) -> list[dict[str, Any]]:
    return [record for record in replica.records() if record.get("event") == event]


def monitored_replica(nats_url: str, metrics_port: int, **env: str) -> ReplicaProcess:
    return start_replica(
        nats_url,
        PREFIX,
        EXECUTOR_METRICS_PORT=str(metrics_port),
        EXECUTOR_METRICS_HOST="127.0.0.1",
        **{**JOB_ENV, **env},
    )


def outage(server: NatsServer, worker: ReplicaProcess, port: int, seconds: float) -> int:
    """Stop the server for ``seconds`` and start it again; return the failed reconnects logged."""
    server.stop()  # SIGTERM
    down_at = time.monotonic()
    until(lambda: status(port, "/readyz") == 503, 10, "/readyz 503 with NATS down")
    samples = scrape(port)
    assert value(samples, "pyexec_nats_connected") == 0
    assert value(samples, "pyexec_ready") == 0
    assert value(samples, "pyexec_nats_disconnects_total") >= 1
    assert status(port, "/healthz") == 200  # alive: no liveness probe should restart it
    attempts_before = len(events(worker, "nats error"))
    time.sleep(max(0.0, down_at + seconds - time.monotonic()))
    failed_attempts = len(events(worker, "nats error")) - attempts_before
    assert worker.process.poll() is None
    assert status(port, "/readyz") == 503
    server.start()  # the same port, the same JetStream store
    return failed_attempts


async def jobs_after_restart(url: str) -> tuple[Reply, Reply, Reply]:
    """One job through the replica (mode async), one straight to JetStream; both awaited."""
    async with await Client.connect(url, KEY_ID, SECRET, prefix=PREFIX) as client:
        accepted = await client.send(
            f"{PREFIX}.code",
            CodeRequest(code=SLOW, ctx={"seconds": 0.1, "n": 4}, mode="async"),
            timeout=5,
        )
        assert accepted.job_id is not None
        direct = await client.submit_code(SLOW, {"seconds": 0.1, "n": 5}, timeout=5)
        return (
            accepted,
            await client.wait(accepted.job_id, timeout=30),
            await client.wait(direct, timeout=30),
        )


def test_replica_rides_out_a_nats_restart(server: NatsServer) -> None:
    """A replica outlives a NATS restart: unready while down, then serves again, same process."""
    port = free_port()
    worker = monitored_replica(server.url, port)
    try:
        pid = worker.process.pid
        caller = Caller(server.url, PREFIX)
        assert caller.code(QUICK, {"n": 1}, timeout=5).result == 1
        assert status(port, "/readyz") == 200

        # Several reconnect intervals (reconnect_time_wait is 1 s) without a server.
        failed_attempts = outage(server, worker, port, seconds=4.5)
        print("failed reconnection attempts logged during the outage:", failed_attempts)
        until(lambda: status(port, "/readyz") == 200, 20, "/readyz 200 after the restart")
        samples = scrape(port)
        assert value(samples, "pyexec_nats_connected") == 1
        assert value(samples, "pyexec_ready") == 1
        assert value(samples, "pyexec_nats_reconnects_total") >= 1
        assert events(worker, "nats reconnected")
        # Still the same process: it came back by itself, after trying again and again.
        assert worker.process.poll() is None
        assert worker.process.pid == pid
        assert failed_attempts >= 3, failed_attempts

        for n in range(5):
            reply = caller.code(QUICK, {"n": n}, timeout=5)
            assert reply.status == "ok", reply
            assert reply.result == n
        accepted, through_replica, direct = asyncio.run(jobs_after_restart(server.url))
        assert accepted.status == "accepted"
        assert (through_replica.status, through_replica.result) == ("ok", 40), through_replica
        assert (direct.status, direct.result) == ("ok", 50), direct
        assert worker.process.poll() is None
        assert worker.process.pid == pid
    finally:
        exit_code = worker.stop()
    assert exit_code == 0  # and it still stops gracefully


@dataclass
class Node:
    """One nats-server of a three-node JetStream cluster on loopback."""

    name: str
    port: int
    route_port: int
    monitor_port: int
    store: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, peers: list[Node]) -> None:
        routes = ",".join(f"nats://127.0.0.1:{peer.route_port}" for peer in peers)
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                [server_binary(), "-a", "127.0.0.1", "-p", str(self.port),
                 "-m", str(self.monitor_port), "-js", "-sd", str(self.store),
                 "--name", self.name, "--cluster_name", "pyexec-test",
                 "--cluster", f"nats://127.0.0.1:{self.route_port}", "--routes", routes],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )  # fmt: skip

    def monitor(self, path: str) -> dict[str, Any] | None:
        """A monitoring endpoint's JSON, or None while the server does not answer."""
        try:
            code, text, _ = get(self.monitor_port, path)
        except OSError:
            return None
        return json.loads(text) if code == 200 else None

    def replica_connections(self) -> set[str]:
        """Names of the pyexec replicas' connections on this server."""
        connz = self.monitor("/connz?limit=1000") or {}
        return {
            str(c.get("name"))
            for c in connz.get("connections") or []
            if str(c.get("name", "")).startswith("pyexec-")
        }

    def kill(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def cluster_ready(nodes: list[Node]) -> bool:
    """Every node healthy and agreeing on one JetStream meta leader of a three-node group."""
    leaders = set()
    for node in nodes:
        if node.monitor("/healthz") is None:
            return False
        meta = (node.monitor("/jsz") or {}).get("meta_cluster") or {}
        if not meta.get("leader") or meta.get("cluster_size") != len(nodes):
            return False
        leaders.add(meta["leader"])
    return len(leaders) == 1


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Node]]:
    """Three nats-servers with JetStream, routed to each other on loopback, with a meta leader."""
    ports: set[int] = set()
    while len(ports) < 9:
        ports.add(free_port())
    spare = sorted(ports)
    nodes = [
        Node(
            name=f"n{i}",
            port=spare[3 * i],
            route_port=spare[3 * i + 1],
            monitor_port=spare[3 * i + 2],
            store=tmp_path / f"js{i}",
            log=tmp_path / f"n{i}.log",
        )
        for i in range(3)
    ]
    try:
        for node in nodes:
            node.start([peer for peer in nodes if peer is not node])
        until(lambda: cluster_ready(nodes), 30, "a JetStream meta leader on a 3-node cluster")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@dataclass
class Monitored:
    replica: ReplicaProcess
    metrics_port: int

    @property
    def connection(self) -> str:
        """The replica's NATS connection name, as the servers list it."""
        return "pyexec-" + str(self.replica.wait_for("replica ready")["service_id"])[:8]


@pytest.fixture
def two_replicas(cluster: list[Node]) -> Iterator[tuple[Monitored, Monitored]]:
    """A replica on node A and one on node B, same prefix and queue group, R3 streams."""
    a, b, _ = cluster
    started: list[Monitored] = []
    try:
        # One after the other: the first creates the streams and the shared consumer.
        for node in (a, b):
            port = free_port()
            replica = monitored_replica(
                node.url, port, EXECUTOR_STREAM_REPLICAS="3", EXECUTOR_WORKERS="2"
            )
            started.append(Monitored(replica, port))
        yield started[0], started[1]
    finally:
        for monitored in started:
            monitored.replica.stop()


@dataclass
class Sent:
    """One sync request sent around the node kill, and what became of it."""

    n: int
    sent_at: float
    reply: Reply | None = None
    error: str | None = None

    @property
    def request_id(self) -> str:
        return f"sync-{self.n}"


async def send_sync(client: Client, stop: asyncio.Event, sent: list[Sent]) -> None:
    """A quick sync request every 0.2 s until ``stop``; wait for every reply (or failure)."""

    async def one(entry: Sent) -> None:
        try:
            entry.reply = await client.execute_code(
                QUICK, {"n": entry.n}, timeout=2, request_id=entry.request_id
            )
        except ClientError as exc:
            entry.error = str(exc)

    tasks = []
    while not stop.is_set():
        entry = Sent(len(sent), time.monotonic())
        sent.append(entry)
        tasks.append(asyncio.create_task(one(entry)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)
    await asyncio.gather(*tasks)


async def stream_info(client: Client, stream: str, subjects: str | None = None) -> StreamInfo:
    """Stream info, retried while a stream leader is being elected after the kill."""
    js = client.nc.jetstream()
    deadline = time.monotonic() + 30
    while True:
        try:
            return await js.stream_info(stream, subjects_filter=subjects)
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@dataclass
class Outcome:
    """What the client on node C saw around the kill of node A."""

    job_ids: list[str] = field(default_factory=list)
    completions: dict[str, Reply] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    timeline: dict[str, float] = field(default_factory=dict)
    leaders: dict[str, str | None] = field(default_factory=dict)


async def store_leader(client: Client, stream: str) -> str | None:
    """The stream's leader, or None while it has none (or cannot be asked)."""
    try:
        return await leader(client, stream)
    except Exception:  # noqa: BLE001 - no leader to answer yet
        return None


async def leader(client: Client, stream: str, consumer: str | None = None) -> str | None:
    js = client.nc.jetstream()
    info = await (js.consumer_info(stream, consumer) if consumer else js.stream_info(stream))
    return info.cluster.leader if info.cluster else None


async def lead_from(client: Client, node: Node, outcome: Outcome) -> None:
    """Check both streams are replicated on three nodes, then move the leaders of both streams
    and of the shared consumer to ``node``, so that killing it forces three elections."""
    for stream in (JOBS, RESULTS):
        info = await stream_info(client, stream)
        assert info.config.num_replicas == 3
        assert info.cluster is not None
        assert len(info.cluster.replicas or []) == 2
    preferred = json.dumps({"placement": {"preferred": node.name}}).encode()
    for stream, consumer in ((JOBS, None), (RESULTS, None), (JOBS, DURABLE)):
        api = (
            f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"
            if consumer
            else f"STREAM.LEADER.STEPDOWN.{stream}"
        )
        deadline = time.monotonic() + 15
        while await leader(client, stream, consumer) != node.name:
            assert time.monotonic() < deadline, f"{api}: no leader on {node.name}"
            await client.nc.request(f"$JS.API.{api}", preferred, timeout=5)
            await asyncio.sleep(0.5)
        outcome.leaders[consumer or stream] = node.name


async def stored_completions(client: Client) -> dict[str, int]:
    """How many completions the results stream holds, by subject."""
    info = await stream_info(client, RESULTS, f"{PREFIX}.results.>")
    return dict(info.state.subjects or {})


async def wait_for_every_job(client: Client, outcome: Outcome) -> None:
    """Until every job has a completion stored and the jobs stream is empty (all acked)."""
    wanted = {f"{PREFIX}.results.{job_id}" for job_id in outcome.job_ids}
    deadline = time.monotonic() + 60
    while not wanted <= set(await stored_completions(client)):
        assert time.monotonic() < deadline, "not every job completed in time"
        await asyncio.sleep(0.2)
    # A work queue drops a job once it is acknowledged: then nothing can run it again.
    while (await stream_info(client, JOBS)).state.messages:
        assert time.monotonic() < deadline, "jobs left unacknowledged in the jobs stream"
        await asyncio.sleep(0.2)
    outcome.stored = await stored_completions(client)
    for job_id in outcome.job_ids:
        outcome.completions[job_id] = await client.wait(job_id, timeout=10)


async def kill_under_load(node_a: Node, node_c: Node, on_a: ReplicaProcess) -> Outcome:
    """From a client on C: submit ten jobs, send sync requests, SIGKILL A mid-job."""
    outcome = Outcome()
    async with await Client.connect(node_c.url, KEY_ID, SECRET, prefix=PREFIX) as client:
        assert client.nc.connected_url is not None
        assert client.nc.connected_url.port == node_c.port
        await lead_from(client, node_a, outcome)
        outcome.job_ids = [
            await client.submit_code(SLOW, {"seconds": 1.0, "n": n}, timeout=10) for n in range(10)
        ]
        stop = asyncio.Event()
        sender = asyncio.create_task(send_sync(client, stop, outcome.sent))

        def a_runs_a_job() -> bool:
            done = {record.get("job_id") for record in events(on_a, "job completed")}
            return any(record.get("job_id") not in done for record in events(on_a, "job started"))

        await asyncio.sleep(0.5)
        await until_async(a_runs_a_job, 30, "the replica on A running a job")
        node_a.kill()
        outcome.timeline["kill"] = time.monotonic()
        await until_async(
            lambda: bool(events(on_a, "nats reconnected")), 30, "the replica on A reconnected"
        )
        # The shared stores every request uses elect new leaders too; until they have one a
        # request is refused 'overloaded' (fail closed), which under load can outlast the
        # replica's reconnect.
        for store in STORES:
            deadline = time.monotonic() + 30
            while await store_leader(client, store) in (None, node_a.name):
                assert time.monotonic() < deadline, f"{store}: no leader after the kill"
                await asyncio.sleep(0.2)
        outcome.timeline["reconnected"] = time.monotonic()
        await asyncio.sleep(3)  # requests that arrive after the reconnect
        stop.set()
        await sender
        outcome.timeline["sync done"] = time.monotonic()
        await wait_for_every_job(client, outcome)
        outcome.timeline["jobs done"] = time.monotonic()
    return outcome


def assert_jobs_completed_once(outcome: Outcome, replicas: list[ReplicaProcess]) -> None:
    assert outcome.stored == {f"{PREFIX}.results.{job_id}": 1 for job_id in outcome.job_ids}
    for n, job_id in enumerate(outcome.job_ids):
        reply = outcome.completions[job_id]
        assert (reply.status, reply.result, reply.job_id) == ("ok", n * 10, job_id), reply
    runs = Counter(
        str(record.get("job_id"))
        for replica in replicas
        for record in events(replica, "job completed")
    )
    redelivered = [
        (str(record.get("job_id"))[:8], record.get("deliveries"))
        for replica in replicas
        for record in events(replica, "job started")
        if record.get("deliveries") != 1
    ]
    print("runs per job:", sorted(runs.values()), "redeliveries:", redelivered)


def handled_ok(replica: ReplicaProcess) -> set[str]:
    return {
        str(record.get("request_id"))
        for record in events(replica, "request")
        if record.get("status") == "ok"
    }


def assert_sync_requests(outcome: Outcome, on_b: ReplicaProcess) -> None:
    """Only requests in flight on A's replica may fail, and requests sent before the reconnect
    and the shared stores' new leaders may be refused overloaded (the replay store's leader may
    have been on A); every one after both succeeds."""
    kill, reconnected = outcome.timeline["kill"], outcome.timeline["reconnected"]
    failed = [entry for entry in outcome.sent if entry.reply is None]
    print(
        f"sync: {len(outcome.sent)} sent, "
        f"{sum(entry.sent_at < kill for entry in outcome.sent)} before the kill, "
        f"{sum(entry.sent_at >= reconnected for entry in outcome.sent)} after the reconnect, "
        f"failed: {[(entry.n, entry.error) for entry in failed]}"
    )
    assert any(entry.sent_at < kill for entry in outcome.sent)
    assert sum(entry.sent_at >= reconnected for entry in outcome.sent) >= 5
    for entry in outcome.sent:
        if entry.reply is None:
            continue
        error = entry.reply.error
        if entry.sent_at < reconnected and error is not None and error.code == "overloaded":
            # The fleet's replay store lost its stream leader with the node: a request it
            # could not check for a replay meanwhile is refused (fail closed), never run.
            assert entry.request_id not in handled_ok(on_b), entry
            continue
        assert (entry.reply.status, entry.reply.result) == ("ok", entry.n), entry.reply
    handled_by_b = {str(record.get("request_id")) for record in events(on_b, "request")}
    for entry in failed:
        assert entry.sent_at < reconnected, entry
        assert entry.request_id not in handled_by_b, entry
    assert len(failed) <= 3, failed


def job_story(replica: ReplicaProcess) -> list[str]:
    """The replica's jobs, warnings and errors, one line each (shown when the test fails)."""
    lines = []
    for record in replica.records():
        if record.get("level") != "info":
            event = str(record.get("event")).splitlines()[0]
            lines.append(f"{record.get('timestamp')} {event} {record.get('error') or ''}")
        elif record.get("event") in ("job started", "job completed"):
            lines.append(
                f"{record.get('timestamp')} {record.get('event')} {record.get('job_id')} "
                f"delivery {record.get('deliveries')}"
            )
    return lines


@pytest.mark.timeout(180)
def test_cluster_node_killed_under_jobs_and_requests(
    cluster: list[Node], two_replicas: tuple[Monitored, Monitored]
) -> None:
    """SIGKILL of the node a replica uses: every job completes once, ok; requests keep working."""
    a, b, c = cluster
    on_a, on_b = two_replicas
    assert a.replica_connections() == {on_a.connection}
    assert b.replica_connections() == {on_b.connection}
    assert c.replica_connections() == set()

    started = time.monotonic()
    outcome = asyncio.run(kill_under_load(a, c, on_a.replica))
    print("leaders before the kill:", outcome.leaders)
    print({key: round(moment - started, 2) for key, moment in outcome.timeline.items()})
    for name, monitored in (("A", on_a), ("B", on_b)):
        print(f"replica on {name}:", *job_story(monitored.replica), sep="\n  ")
    assert_jobs_completed_once(outcome, [on_a.replica, on_b.replica])
    # The replica on A lost its server, came back on B or C by itself, and is ready again.
    assert on_a.replica.process.poll() is None
    assert events(on_a.replica, "nats disconnected")
    until(lambda: status(on_a.metrics_port, "/readyz") == 200, 10, "the replica on A ready")
    assert value(scrape(on_a.metrics_port), "pyexec_nats_reconnects_total") >= 1
    assert on_a.connection in b.replica_connections() | c.replica_connections()
    assert status(on_b.metrics_port, "/readyz") == 200
    assert_sync_requests(outcome, on_b.replica)
