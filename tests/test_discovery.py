"""NATS micro service discovery: ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` for ``pyexec``.

Other test modules run replicas on the same server, so answers to the shared subjects are
picked out by the ``id`` of the replica under test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import nats
import pytest
from nats.micro.service import EndpointStats, ServiceInfo, ServicePing

from tests.conftest import Caller, NatsServer, ReplicaProcess, start_replica

SERVICE = "pyexec"
PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"
OK_SOURCE = "def execute(ctx):\n    return 1"


@dataclass
class Target:
    """A replica under test, its service id, and a caller for it."""

    replica: ReplicaProcess
    service_id: str
    caller: Caller


def target_of(nats_server: NatsServer, replica: ReplicaProcess) -> Target:
    service_id = str(replica.wait_for("replica ready")["service_id"])
    return Target(replica, service_id, Caller(nats_server.url, replica.prefix))


@pytest.fixture(scope="module")
def target(nats_server: NatsServer) -> Iterator[Target]:
    """A replica of this module's own."""
    replica = start_replica(nats_server.url, "disco")
    yield target_of(nats_server, replica)
    replica.stop()


def answer_from(url: str, subject: str, service_id: str, wait: float = 10.0) -> dict[str, Any]:
    """Send one request to ``subject`` and return the answer whose ``id`` is ``service_id``.

    Every replica on the server answers the shared subjects, so all answers are read until
    the one from the replica under test arrives.
    """

    async def go() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(subject, b"", reply=inbox)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except nats.errors.TimeoutError:
                    break
                answer: dict[str, Any] = json.loads(msg.data)
                if answer.get("id") == service_id:
                    return answer
            raise AssertionError(f"no answer on {subject} from replica {service_id}")
        finally:
            await nc.close()

    return asyncio.run(go())


def control_subject(verb: str, level: str, service_id: str) -> str:
    """``$SRV.<verb>`` (all services), ``$SRV.<verb>.pyexec`` or ``$SRV.<verb>.pyexec.<id>``."""
    tokens = {"all": [], "name": [SERVICE], "id": [SERVICE, service_id]}[level]
    return ".".join(["$SRV", verb, *tokens])


@pytest.mark.parametrize("level", ["all", "name", "id"])
def test_ping_answers_with_the_micro_v1_ping_response(
    nats_server: NatsServer, target: Target, level: str
) -> None:
    """``$SRV.PING``, ``$SRV.PING.pyexec`` and ``$SRV.PING.pyexec.<id>`` get a v1 ping response."""
    subject = control_subject("PING", level, target.service_id)
    answer = answer_from(nats_server.url, subject, target.service_id)
    assert answer["type"] == PING_TYPE
    assert answer["name"] == SERVICE
    assert answer["version"] == version("pyexec")
    assert isinstance(answer["metadata"], dict)
    ping = ServicePing.from_dict(answer)
    assert ping.id == target.service_id


@pytest.mark.parametrize("level", ["all", "name", "id"])
def test_info_lists_both_endpoints_with_subject_and_queue_group(
    nats_server: NatsServer, target: Target, level: str
) -> None:
    """``$SRV.INFO`` lists the code, named, job status and job cancel endpoints, their subjects
    and the queue group."""
    subject = control_subject("INFO", level, target.service_id)
    answer = answer_from(nats_server.url, subject, target.service_id)
    assert answer["type"] == INFO_TYPE
    assert answer["name"] == SERVICE
    assert isinstance(answer["description"], str)
    info = ServiceInfo.from_dict(answer)
    prefix = target.replica.prefix
    endpoints = {e.name: (e.subject, e.queue_group) for e in info.endpoints}
    assert endpoints == {
        "code": (f"{prefix}.code", prefix),
        "named": (f"{prefix}.named", prefix),
        "job_status": (f"{prefix}.job.status", prefix),
        "job_cancel": (f"{prefix}.job.cancel", prefix),
    }


@pytest.mark.parametrize("level", ["all", "name", "id"])
def test_stats_answers_with_the_micro_v1_stats_response(
    nats_server: NatsServer, target: Target, level: str
) -> None:
    """``$SRV.STATS`` gets a v1 stats response: start time and one entry per endpoint."""
    subject = control_subject("STATS", level, target.service_id)
    answer = answer_from(nats_server.url, subject, target.service_id)
    assert answer["type"] == STATS_TYPE
    assert answer["name"] == SERVICE
    assert answer["version"] == version("pyexec")
    started = dt.datetime.fromisoformat(answer["started"])
    assert answer["started"].endswith("Z")
    assert started.utcoffset() == dt.timedelta(0)
    endpoints = [EndpointStats.from_dict(e) for e in answer["endpoints"]]
    prefix = target.replica.prefix
    assert sorted((e.name, e.subject, e.queue_group) for e in endpoints) == [
        ("code", f"{prefix}.code", prefix),
        ("job_cancel", f"{prefix}.job.cancel", prefix),
        ("job_status", f"{prefix}.job.status", prefix),
        ("named", f"{prefix}.named", prefix),
    ]


def test_ping_identity_matches_info_and_stats(nats_server: NatsServer, target: Target) -> None:
    """PING, INFO and STATS name the same service, id, version and metadata."""
    answers = [
        answer_from(nats_server.url, f"$SRV.{verb}.{SERVICE}", target.service_id)
        for verb in ("PING", "INFO", "STATS")
    ]
    identities = [{k: a[k] for k in ("name", "id", "version", "metadata")} for a in answers]
    assert identities[0] == identities[1] == identities[2]


def stats_of(target: Target, url: str) -> dict[str, dict[str, Any]]:
    subject = f"$SRV.STATS.{SERVICE}.{target.service_id}"
    answer = answer_from(url, subject, target.service_id)
    return {e["name"]: e for e in answer["endpoints"]}


def test_stats_count_requests_and_errors_per_endpoint(nats_server: NatsServer) -> None:
    """STATS counts each endpoint's requests; rejections count as errors on their own endpoint."""
    replica = start_replica(nats_server.url, "discostats")
    try:
        target = target_of(nats_server, replica)
        before = stats_of(target, nats_server.url)
        assert [before[k]["num_requests"] for k in ("code", "named")] == [0, 0]

        caller = target.caller
        assert caller.code(OK_SOURCE).status == "ok"
        assert caller.code(OK_SOURCE).status == "ok"
        invalid = caller.raw("code", b'{"code": 1}')
        assert invalid.reply.status == "rejected"
        unsigned = caller.raw("code", b'{"code": "x"}', signed=False)
        assert unsigned.reply.status == "rejected"
        assert caller.named("text.normalize", {"text": " a "}).status == "ok"
        unknown = caller.raw("named", b'{"name": "no.such.script"}')
        assert unknown.reply.status == "rejected"
        assert unknown.headers.get("Nats-Service-Error-Code") == "404"

        expected = {"code": (4, 2), "named": (2, 1), "job_status": (0, 0), "job_cancel": (0, 0)}
        deadline = time.monotonic() + 10
        stats = stats_of(target, nats_server.url)
        while time.monotonic() < deadline and any(
            stats[name]["num_requests"] < count for name, (count, _) in expected.items()
        ):
            time.sleep(0.05)
            stats = stats_of(target, nats_server.url)

        got = {name: (s["num_requests"], s["num_errors"]) for name, s in stats.items()}
        assert got == expected
        assert unsigned.reply.error is not None
        assert unknown.reply.error is not None
        assert stats["code"]["last_error"] == unsigned.reply.error.message
        assert stats["named"]["last_error"] == unknown.reply.error.message
        for name, entry in stats.items():
            if name in ("job_status", "job_cancel"):
                continue  # asked nothing
            assert entry["processing_time"] > 0
            assert entry["average_processing_time"] == (
                entry["processing_time"] // entry["num_requests"]
            )
    finally:
        replica.stop()


def test_info_metadata_lists_the_installed_scripts(nats_server: NatsServer, target: Target) -> None:
    """``$SRV.INFO`` names every installed script in the metadata field ``scripts``."""
    from consumer.catalog import Catalog
    from consumer.config import DEFAULT_SCRIPTS_DIR

    answer = answer_from(nats_server.url, control_subject("INFO", "id", target.service_id),
                         target.service_id)  # fmt: skip
    listed = answer["metadata"]["scripts"].split(",")
    assert listed == [info.name for info in Catalog(DEFAULT_SCRIPTS_DIR).scripts()]
    assert {"text.normalize", "sql.transpile"} <= set(listed)
