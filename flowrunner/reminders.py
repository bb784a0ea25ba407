"""Deadlines of credentials, reminders before them, keep-alive refreshes, and alerts.

A reminder goes out once per threshold per credential (identified by a fingerprint,
never the token itself), recorded in the state store so that restarts neither repeat
nor skip one. A credential first seen past several thresholds gets one reminder, the
most urgent, not a burst. A new token starts a new series.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flowrunner.auth.provider import ProfileAuth
from flowrunner.events import RunEvent
from flowrunner.loader import Project
from flowrunner.model import BearerProfile, HttpStep, OAuth2Profile, Step
from flowrunner.notify import Notifier
from flowrunner.profile_status import ProfileState, profile_states, remind_before
from flowrunner.secrets import Masker, current_masker
from flowrunner.store.notifications import NotificationStore
from flowrunner.store.tokens import ProfileStatus

log = logging.getLogger("flowrunner.reminders")
ALERT_STATUSES = (ProfileStatus.REJECTED, ProfileStatus.NEEDS_LOGIN, ProfileStatus.FORBIDDEN)


@dataclass(frozen=True)
class Deadline:
    profile: str
    kind: str
    moment: datetime
    what: str  # "expires", "must be regenerated", "refresh token lapses"
    series: str  # identifies the credential whose deadline this is
    thresholds: tuple[int, ...]  # seconds before the moment, descending, ending with 0


@dataclass(frozen=True)
class Reminder:
    deadline: Deadline
    threshold: int
    covers: tuple[int, ...]  # every threshold this one reminder settles
    subject: str
    body: str


def flows_using(project: Project, profile: str) -> list[str]:
    def uses(steps: list[Step]) -> bool:
        for step in steps:
            if isinstance(step, HttpStep) and step.http.auth == profile:
                return True
            if any(uses(children) for _, children in step.children()):
                return True
        return False

    return sorted(name for name, loaded in project.flows.items() if uses(loaded.flow.steps))


def deadline_of(state: ProfileState, project: Project) -> Deadline | None:
    loaded = project.profiles.get(state.name)
    if loaded is None:
        return None
    profile = loaded.profile
    thresholds = tuple(
        sorted(
            {int(t.total_seconds()) for t in remind_before(profile, project.settings)} | {0},
            reverse=True,
        )
    )
    if isinstance(profile, BearerProfile) and state.fingerprint:
        moments = [
            (m, w)
            for m, w in (
                (state.expires_at, "expires"),
                (state.regenerate_by, "must be regenerated"),
            )
            if m
        ]
        if not moments:
            return None
        moment, what = min(moments)
        return Deadline(state.name, profile.kind, moment, what, state.fingerprint, thresholds)
    if (
        isinstance(profile, OAuth2Profile)
        and profile.grant == "refresh_token"
        and not profile.keep_alive
        and state.refresh_lapses_at is not None
    ):
        series = hashlib.sha256(state.refresh_lapses_at.isoformat().encode()).hexdigest()[:16]
        return Deadline(
            state.name,
            profile.kind,
            state.refresh_lapses_at,
            "refresh token lapses",
            series,
            thresholds,
        )
    return None


class Reminders:
    def __init__(
        self,
        project: Callable[[], Project],
        auth: ProfileAuth,
        store: NotificationStore,
        notifier: Notifier,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.project = project
        self.auth = auth
        self.store = store
        self.notifier = notifier
        self.clock = clock or (lambda: datetime.now(UTC))

    def deadlines(self) -> list[Deadline]:
        project = self.project()
        found = (deadline_of(s, project) for s in profile_states(self.auth, self.clock()))
        return [d for d in found if d is not None]

    def next_reminder_at(self, deadline: Deadline) -> datetime | None:
        """When the next reminder goes out: now if one is due and not sent yet."""
        now = self.clock()
        sent = self.store.reminders_sent(deadline.profile, deadline.series)
        upcoming = [
            max(deadline.moment - timedelta(seconds=t), now)
            for t in deadline.thresholds
            if t not in sent
        ]
        return min(upcoming) if upcoming else None

    def due(self) -> list[Reminder]:
        """What would go out now."""
        now = self.clock()
        reminders = []
        for deadline in self.deadlines():
            sent = self.store.reminders_sent(deadline.profile, deadline.series)
            reached = [
                t
                for t in deadline.thresholds
                if now >= deadline.moment - timedelta(seconds=t) and t not in sent
            ]
            if reached:
                most_urgent = min(reached)
                reminders.append(self._message(deadline, most_urgent, tuple(reached), now))
        return reminders

    def send_due(self) -> list[Reminder]:
        sent = []
        for reminder in self.due():
            deadline = reminder.deadline
            # Recording first makes two processes racing on one reminder send it once.
            if not self.store.mark_reminders(
                deadline.profile, deadline.series, list(reminder.covers), self.clock()
            ):
                continue
            loaded = self.project().profiles.get(deadline.profile)
            channels = loaded.profile.notify if loaded else []
            owner = loaded.profile.owner if loaded else None
            self.notifier.notify(
                f"profile:{deadline.profile}", reminder.subject, reminder.body, channels, owner
            )
            sent.append(reminder)
        return sent

    def _message(
        self, deadline: Deadline, threshold: int, covers: tuple[int, ...], now: datetime
    ) -> Reminder:
        project = self.project()
        loaded = project.profiles.get(deadline.profile)
        owner = loaded.profile.owner if loaded else None
        when = f"{deadline.moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        left = deadline.moment - now
        if left.total_seconds() <= 0:
            summary = f"{deadline.what.replace('expires', 'expired')} on {when}"
            subject = f"[flowrunner] {deadline.profile}: credential {deadline.what} — overdue"
        else:
            days = left.total_seconds() / 86400
            span = f"{days:.0f} days" if days >= 1.5 else f"{left.total_seconds() / 3600:.0f} hours"
            summary = f"{deadline.what} on {when} (in {span})"
            subject = f"[flowrunner] {deadline.profile}: credential {deadline.what} in {span}"
        flows = flows_using(project, deadline.profile)
        lines = [
            f"The auth profile {deadline.profile} ({deadline.kind}) {summary}.",
            f"Flows that use it: {', '.join(flows) or 'none'}.",
            f"Owner: {owner or 'not set (add owner: to the profile)'}.",
            "",
            "What to do:",
            *_instructions(deadline),
            "",
            f"Credential fingerprint: {deadline.series} (not the credential itself).",
        ]
        return Reminder(deadline, threshold, covers, subject, "\n".join(lines))

    # ------------------------------------------------------------ keep-alive

    async def keep_alive(self) -> list[str]:
        """Refresh oauth2 profiles with keep_alive before their refresh token lapses, even
        when no flow runs; a failure alerts the owner at once. Returns the refreshed ones."""
        refreshed = []
        now = self.clock()
        for name, loaded in self.project().profiles.items():
            profile = loaded.profile
            if not isinstance(profile, OAuth2Profile) or not profile.keep_alive:
                continue
            stored = self.auth.store.load(name)
            if stored is not None and stored.refresh_expires_at is not None:
                lifetime = profile.refresh_token_lifetime or (
                    stored.refresh_expires_at - (stored.issued_at or now)
                )
                if stored.refresh_expires_at - now > lifetime / 2:
                    continue
            elif stored is not None and stored.access_token:
                continue  # nothing lapses that we know of
            topic = f"keep-alive:{name}"
            masker = Masker()
            masking = current_masker.set(masker)  # the auth logs mask this profile's secrets
            try:
                current = stored.access_token if stored else None
                await self.auth.credential(name, masker, rejected=current)
                refreshed.append(name)
                self.store.set_alert_value(topic, "ok", now)
            except Exception as exc:
                # The token endpoint's answer may quote what it was sent.
                problem = masker.mask(str(exc))
                log.warning("keep-alive of %s failed: %s", name, problem)
                previous = self.store.alert_value(topic)
                if previous is not None and previous[0] == "failed":
                    continue  # the owner was told when it started failing
                self.store.set_alert_value(topic, "failed", now)
                self.notifier.notify(
                    f"profile:{name}:keep-alive",
                    f"[flowrunner] {name}: keep-alive refresh failed",
                    f"flowrunner could not refresh the auth profile {name} ahead of its refresh "
                    f"token's lapse: {problem}\nIf it lapses, every flow using it stops: "
                    f"{', '.join(flows_using(self.project(), name)) or 'none'}.",
                    profile.notify,
                    profile.owner,
                )
                # This alert says why; the status alert would only repeat it.
                after = self.auth.store.load(name)
                if after is not None:
                    self.store.set_alert_value(f"profile-status:{name}", after.status, now)
            finally:
                current_masker.reset(masking)
        return refreshed

    # ------------------------------------------------------------ alerts

    def alert_status_changes(self) -> list[str]:
        """One alert per profile per change into rejected, needs_login or forbidden."""
        alerted = []
        now = self.clock()
        project = self.project()
        for state in profile_states(self.auth, now):
            topic = f"profile-status:{state.name}"
            previous = self.store.alert_value(topic)
            if previous is not None and previous[0] == state.status:
                continue
            self.store.set_alert_value(topic, state.status, now)
            if state.status not in ALERT_STATUSES:
                continue
            loaded = project.profiles.get(state.name)
            if loaded is None:
                continue
            self.notifier.notify(
                f"profile:{state.name}",
                f"[flowrunner] {state.name}: credential {state.status.replace('_', ' ')}",
                f"The auth profile {state.name} ({state.kind}) is now {state.status}: "
                f"{state.last_error or ''}\nFlows that use it: "
                f"{', '.join(flows_using(project, state.name)) or 'none'}.",
                loaded.profile.notify,
                loaded.profile.owner,
            )
            alerted.append(state.name)
        return alerted

    def alert_run_failure(self, event: RunEvent, quiet: timedelta) -> bool:
        run = event.run
        if event.kind != "run_finished" or run.status != "failed":
            return False
        now = self.clock()
        topic = f"flow-failure:{run.flow}"
        previous = self.store.alert_value(topic)
        if previous is not None and now - previous[1] < quiet:
            return False
        self.store.set_alert_value(topic, run.id, now)
        self.notifier.notify(
            f"flow:{run.flow}",
            f"[flowrunner] {run.flow}: run failed",
            f"Run {run.id} of {run.flow} failed: {run.error}\n"
            f"See it with: flowrunner runs show {run.id[:8]}",
            [],
        )
        return True


def _instructions(deadline: Deadline) -> list[str]:
    if deadline.kind == "bearer":
        return [
            "  1. Log in to the application as the machine user (an administrator).",
            "  2. Generate a new token for it.",
            f"  3. Store it: flowrunner profiles set-token {deadline.profile}",
            "     (paste the token on standard input), or update its secret.",
        ]
    return [
        "  1. Authorize flowrunner again in the application to get a new refresh token.",
        "  2. Put it in the profile's refresh_token secret.",
        f"  3. Check it: flowrunner profiles check {deadline.profile}",
    ]


def calendar(deadlines: list[Deadline], now: datetime) -> str:
    """An iCalendar file with one event per deadline, and alarms at the thresholds."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//flowrunner//deadlines//EN",
        "CALSCALE:GREGORIAN",
    ]
    for deadline in deadlines:
        start = deadline.moment.astimezone(UTC)
        lines += [
            "BEGIN:VEVENT",
            f"UID:{deadline.profile}-{deadline.series}@flowrunner",
            f"DTSTAMP:{stamp}",
            f"DTSTART:{start:%Y%m%dT%H%M%SZ}",
            f"DTEND:{start + timedelta(minutes=30):%Y%m%dT%H%M%SZ}",
            _fold(f"SUMMARY:{deadline.profile}: credential {deadline.what}"),
            _fold("DESCRIPTION:" + " ".join(_instructions(deadline)).replace(",", "\\,")),
        ]
        for threshold in deadline.thresholds:
            if threshold:
                lines += [
                    "BEGIN:VALARM",
                    "ACTION:DISPLAY",
                    _fold(f"DESCRIPTION:{deadline.profile} {deadline.what}"),
                    f"TRIGGER:-PT{threshold // 60}M",
                    "END:VALARM",
                ]
        lines.append("END:VEVENT")
    lines.append("END:VCALENDAR")
    return "\r\n".join(lines) + "\r\n"


def _fold(line: str) -> str:
    """RFC 5545: lines longer than 75 octets continue on the next line after a space."""
    parts = [line[i : i + 73] for i in range(0, len(line), 73)]
    return "\r\n ".join(parts)
