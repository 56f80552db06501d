"""NATS micro service discovery: ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` for the replica.

Written against the micro protocol (v1) rather than on ``nats.micro.Service`` because the
library serves each endpoint one request at a time and cancels in-flight work on stop; here
the endpoints are ordinary queue subscriptions and this module only answers the control
subjects and keeps the counters.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from consumer.subjects import ReplySubjects

SERVICE_NAME = "pyexec"
PING_TYPE = "io.nats.micro.v1.ping_response"
INFO_TYPE = "io.nats.micro.v1.info_response"
STATS_TYPE = "io.nats.micro.v1.stats_response"


@dataclass
class EndpointStats:
    """Counters of one endpoint as ``nats micro stats`` shows them."""

    name: str
    subject: str
    queue_group: str
    num_requests: int = 0
    num_errors: int = 0
    processing_time: int = 0
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        average = self.processing_time // self.num_requests if self.num_requests else 0
        return {
            "name": self.name,
            "subject": self.subject,
            "queue_group": self.queue_group,
            "num_requests": self.num_requests,
            "num_errors": self.num_errors,
            "processing_time": self.processing_time,
            "average_processing_time": average,
            "last_error": self.last_error,
            "data": None,
        }


@dataclass
class Discovery:
    """Answers the micro control subjects for one replica and keeps its endpoint counters."""

    service_id: str
    version: str
    description: str
    metadata: dict[str, str]
    endpoints: dict[str, EndpointStats]
    reply_subjects: ReplySubjects | None = None  # refuses answering into streams and APIs
    on_refused: Any = None  # called for a control request with a refused reply subject
    started: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    )
    _subscriptions: list[Subscription] = field(default_factory=list)

    def record(self, endpoint: str, elapsed_ns: int, error: str | None) -> None:
        """Count one answered request on ``endpoint``; ``error`` is set for rejections."""
        stats = self.endpoints[endpoint]
        stats.num_requests += 1
        stats.processing_time += elapsed_ns
        if error is not None:
            stats.num_errors += 1
            stats.last_error = error

    def _identity(self, kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "name": SERVICE_NAME,
            "id": self.service_id,
            "version": self.version,
            "metadata": self.metadata,
        }

    def ping(self) -> dict[str, Any]:
        return self._identity(PING_TYPE)

    def info(self) -> dict[str, Any]:
        return {
            **self._identity(INFO_TYPE),
            "description": self.description,
            "endpoints": [
                {
                    "name": stats.name,
                    "subject": stats.subject,
                    "queue_group": stats.queue_group,
                    "metadata": None,
                }
                for stats in self.endpoints.values()
            ],
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self._identity(STATS_TYPE),
            "started": self.started,
            "endpoints": [stats.to_dict() for stats in self.endpoints.values()],
        }

    async def start(self, nc: NatsClient) -> None:
        """Subscribe to ``$SRV.<VERB>``, ``$SRV.<VERB>.pyexec`` and ``$SRV.<VERB>.pyexec.<id>``."""
        answers = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}
        for verb, answer in answers.items():

            async def respond(msg: Msg, answer: Any = answer) -> None:
                if not msg.reply:
                    return
                if self.reply_subjects is not None and self.reply_subjects.refused(msg.reply):
                    if self.on_refused is not None:
                        self.on_refused(msg.subject, msg.reply)
                    return
                await msg.respond(json.dumps(answer()).encode())

            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{SERVICE_NAME}",
                f"$SRV.{verb}.{SERVICE_NAME}.{self.service_id}",
            ):
                self._subscriptions.append(await nc.subscribe(subject, cb=respond))

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        self._subscriptions.clear()


def elapsed_ns(started: float) -> int:
    """Nanoseconds since ``started`` (a ``time.perf_counter()`` value)."""
    return int((time.perf_counter() - started) * 1e9)
