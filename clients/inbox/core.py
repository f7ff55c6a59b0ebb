"""What the sync and async inboxes share: reading the claim's answer, logging and counting outcomes.
No I/O here; aio.py and sync.py run the statements."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from clients.inbox import metrics
from clients.inbox.model import InboxMessage, InboxOutcome, InboxResult, InboxSettings

log = logging.getLogger("clients.inbox")

CLAIM_ROUNDS = 3  # claim, read what holds it; a row released or deleted meanwhile: claim again
NO_LIMIT = 2_147_483_647  # max attempts for a release after an interruption: never 'failed'
# Claims an inbox instance could not release (its connection broke in the handler) that it gives back
# itself on the message's next delivery, rather than waiting out the stale threshold. Bounded: beyond
# it, the oldest are forgotten and simply go stale.
LEFT_BEHIND_LIMIT = 10_000
LEFT_BEHIND_REASON = "the connection was lost during the handler; released by the same worker"


class LeftBehind:
    """Message id -> attempt of the claims this inbox instance took and could not give back. Only the
    instance that took a claim may release it early: it knows that no handler of its own still runs
    on it (the fenced release also checks that the claim is still this worker's, at that attempt)."""

    def __init__(self) -> None:
        self._claims: dict[str, int] = {}

    def remember(self, message_id: str, attempts: int) -> None:
        self._claims.pop(message_id, None)
        self._claims[message_id] = attempts
        while len(self._claims) > LEFT_BEHIND_LIMIT:
            del self._claims[next(iter(self._claims))]

    def take(self, message_id: str) -> int | None:
        return self._claims.pop(message_id, None)


class FenceLost(Exception):
    """Raised inside the handler's transaction to roll it back: the claim was taken over."""


@dataclass(frozen=True)
class Claim:
    """The answer of one claim: claimed (with its attempts, the fence), or the result to return, or
    neither (the row changed under the claim: claim again)."""

    claimed: bool
    attempts: int = 0
    previous_holder: str | None = None
    previous_age: float | None = None
    result: InboxResult | None = None


def read_claim(row: tuple[Any, ...]) -> Claim:
    status, attempts, error, p_status, p_holder, p_attempts, p_error, p_age = row
    if status == "processing":
        taken_over = p_status == "processing" and p_holder is not None
        return Claim(
            True, int(attempts), p_holder if taken_over else None, float(p_age) if taken_over else None
        )
    if status == "failed":  # a stale holder's attempt was the last one allowed
        result = InboxResult(InboxOutcome.GAVE_UP, int(attempts), error, previous_holder=p_holder)
        return Claim(False, result=result)
    if p_status is None:
        return Claim(False)  # inserted by a concurrent claim after this statement's snapshot
    return read_state((p_status, p_holder, p_attempts, p_error, p_age))


def read_state(row: tuple[Any, ...] | None) -> Claim:
    if row is None:
        return Claim(False)  # deleted meanwhile (retention): claim again
    status, holder, attempts, error, age = row
    if status == "processed":
        return Claim(False, result=InboxResult(InboxOutcome.DUPLICATE, int(attempts)))
    if status == "failed":
        return Claim(False, result=InboxResult(InboxOutcome.GAVE_UP, int(attempts), error))
    if holder is None:
        return Claim(False)  # released after a failure meanwhile: claim again
    result = InboxResult(InboxOutcome.LOCKED, int(attempts), holder=holder)
    return Claim(False, previous_age=None if age is None else float(age), result=result)


def unresolved(attempts: int) -> InboxResult:
    """After CLAIM_ROUNDS claims that kept meeting a row changing under them: skipped for now."""
    return InboxResult(InboxOutcome.LOCKED, attempts)


def claim_params(settings: InboxSettings, message: InboxMessage) -> tuple[Any, ...]:
    return (
        settings.consumer,
        message.message_id,
        settings.worker_id,
        message.topic,
        message.key,
        settings.lock_stale_threshold,
        settings.max_attempts,
    )


def fence(settings: InboxSettings, message: InboxMessage, attempts: int) -> tuple[Any, ...]:
    return (settings.consumer, message.message_id, settings.worker_id, attempts)


def _where(message: InboxMessage) -> str:
    return f"{message.message_id} ({message.source})" if message.source else message.message_id


def skipped(settings: InboxSettings, message: InboxMessage, claim: Claim) -> InboxResult:
    """Counts and logs a message that was not claimed; returns its result."""
    result = claim.result if claim.result is not None else unresolved(claim.attempts)
    consumer = settings.consumer
    if result.outcome is InboxOutcome.DUPLICATE:
        metrics.count("duplicates", consumer, settings.schema)
        log.debug("%s: message %s already processed; skipped", consumer, _where(message))
    elif result.outcome is InboxOutcome.LOCKED:
        metrics.count("lock_conflicts", consumer, settings.schema)
        age = f", for {claim.previous_age:.1f} s" if claim.previous_age is not None else ""
        log.info(
            "%s: message %s is locked by another worker (%s)%s; not processed now (a lock older than "
            "%.0f s would be taken over)",
            consumer, _where(message), result.holder or "unknown", age, settings.lock_stale_threshold,
        )
    elif result.outcome is InboxOutcome.GAVE_UP:
        if result.previous_holder is not None:
            metrics.count("gave_up", consumer, settings.schema)
            log.error(
                "%s: message %s given up after %d attempts: worker %s stopped during the last one",
                consumer, _where(message), result.attempts, result.previous_holder,
            )
        else:
            log.info(
                "%s: message %s was given up earlier (%d attempts, last error: %s); skipped",
                consumer, _where(message), result.attempts, result.error,
            )
    return result


def took_over(settings: InboxSettings, message: InboxMessage, claim: Claim) -> None:
    if claim.previous_holder is None:
        return
    metrics.count("stale_takeovers", settings.consumer, settings.schema)
    log.warning(
        "%s: took over message %s from worker %s, whose lock was stale (%.1f s old, threshold %.0f s); "
        "attempt %d",
        settings.consumer, _where(message), claim.previous_holder, claim.previous_age or 0.0,
        settings.lock_stale_threshold, claim.attempts,
    )


def processed(settings: InboxSettings, claim: Claim) -> InboxResult:
    metrics.count("processed", settings.consumer, settings.schema)
    return InboxResult(InboxOutcome.PROCESSED, claim.attempts, previous_holder=claim.previous_holder)


def fence_lost(settings: InboxSettings, message: InboxMessage, claim: Claim, state: Claim) -> InboxResult:
    metrics.count("fence_lost", settings.consumer, settings.schema)
    result = state.result if state.result is not None else unresolved(claim.attempts)
    log.warning(
        "%s: message %s: the claim of attempt %d was taken over by another worker (this worker's lock "
        "went stale, the handler took longer than %.0f s): the handler's transaction was rolled back; "
        "now %s",
        settings.consumer, _where(message), claim.attempts, settings.lock_stale_threshold, result.outcome.value,
    )
    if result.outcome is InboxOutcome.LOCKED:
        metrics.count("lock_conflicts", settings.consumer, settings.schema)
    elif result.outcome is InboxOutcome.DUPLICATE:
        metrics.count("duplicates", settings.consumer, settings.schema)
    return result


def failed(
    settings: InboxSettings,
    message: InboxMessage,
    claim: Claim,
    error: BaseException,
    text: str,
    released: list[tuple[Any, ...]],
) -> InboxResult:
    metrics.count("failures", settings.consumer, settings.schema)
    gave_up = bool(released) and released[0][0] == "failed"
    if gave_up:
        metrics.count("gave_up", settings.consumer, settings.schema)
        log.error(
            "%s: message %s: handler failed on attempt %d of %d; given up (status failed): %s",
            settings.consumer, _where(message), claim.attempts, settings.max_attempts, text,
            exc_info=error,
        )
        return InboxResult(InboxOutcome.GAVE_UP, claim.attempts, text, claim.previous_holder)
    log.warning(
        "%s: message %s: handler failed on attempt %d of %d; rolled back, to be retried: %s",
        settings.consumer, _where(message), claim.attempts, settings.max_attempts, text,
        exc_info=error,
    )
    return InboxResult(InboxOutcome.FAILED, claim.attempts, text, claim.previous_holder)
