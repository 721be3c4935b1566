"""When a job fires: cron (with a time zone), a fixed interval, or one moment.

Pure functions of the schedule and the clock, so the scheduler's loop holds no date logic
and tests need no waiting.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator


class CronSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: str = Field(description="five fields: minute hour day-of-month month day-of-week")
    tz: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"not a five-field cron expression: {value!r}")
        return value

    @field_validator("tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Paris)") from None
        return value


class EverySchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every_s: float = Field(ge=1, le=366 * 24 * 3600)


class AtSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    at: datetime

    @field_validator("at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("`at` needs a time zone (e.g. 2026-12-01T09:00:00Z)")
        return value.astimezone(UTC)


AnySchedule = CronSchedule | EverySchedule | AtSchedule
Schedule = Annotated[AnySchedule, Field(union_mode="left_to_right")]


def next_fire(schedule: AnySchedule, after: datetime, anchor: datetime) -> datetime | None:
    """The first fire strictly after ``after``; None when the schedule has no more.

    Intervals count from ``anchor`` (the job's creation), so a restart does not shift them.
    """
    if isinstance(schedule, AtSchedule):
        return schedule.at if schedule.at > after else None
    if isinstance(schedule, EverySchedule):
        periods = max(0, math.floor((after - anchor).total_seconds() / schedule.every_s) + 1)
        return anchor + timedelta(seconds=periods * schedule.every_s)
    zone = ZoneInfo(schedule.tz)
    following: datetime = croniter(schedule.cron, after.astimezone(zone)).get_next(datetime)
    return following.astimezone(UTC)
