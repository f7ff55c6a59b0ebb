"""Pure relay logic, no servers: batch planning, settlement, backoff, fair shares, pause patterns
and lease trust windows."""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime

import pytest

from relay.coordinator import fair_share
from relay.events import PUBLISHED, OutboxRow, Outcome, PublishResult
from relay.leases import Lease, trust_window
from relay.pauses import PauseState, glob_to_like
from relay.retry import Backoff, FailureBackoff, RetryPolicy
from relay.worker import plan_batch, settle_plan

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def row(
    id: int, key: str | None = "k", *, topic: str = "orders", attempts: int = 0, size: int = 10
) -> OutboxRow:
    return OutboxRow(
        id=id,
        message_id=uuid.uuid4(),
        topic=topic,
        key=key,
        payload=b"x" * size,
        headers={},
        created_at=NOW,
        attempts=attempts,
    )


def ids(rows: list[OutboxRow]) -> list[int]:
    return [r.id for r in rows]


RETRY = PublishResult(Outcome.RETRY, "publish_failed", "boom")
REJECT = PublishResult(Outcome.REJECT, "record_too_large", "too big")
DOWN = PublishResult(Outcome.UNAVAILABLE, "broker_unavailable", "refused")


# -- plan_batch ------------------------------------------------------------------------------------


def test_a_retried_event_holds_back_its_keys_later_events_only() -> None:
    rows = [
        row(1, "a", attempts=2),
        row(2, "b"),
        row(3, "a"),
        row(4, "a", topic="other"),  # same key, other topic: another ordering key
        row(5, "a"),
        row(6, "b"),
    ]
    plan = plan_batch(rows, max_payload_bytes=1000)
    assert ids(plan.send) == [1, 2, 4, 6]
    assert ids(plan.held) == [3, 5]
    assert plan.reject == []


def test_fresh_events_of_one_key_go_together_in_id_order() -> None:
    plan = plan_batch([row(1, "a"), row(2, "a"), row(3, "a")], max_payload_bytes=1000)
    assert ids(plan.send) == [1, 2, 3]
    assert plan.held == []


def test_an_oversize_payload_is_rejected_before_sending() -> None:
    plan = plan_batch([row(1, "a", size=101), row(2, "b", size=100)], max_payload_bytes=100)
    assert ids(plan.send) == [2]
    assert len(plan.reject) == 1
    rejected, result = plan.reject[0]
    assert rejected.id == 1
    assert result.outcome is Outcome.REJECT
    assert result.reason == "payload_too_large"
    assert "101 bytes" in result.error


def test_keyless_events_are_never_held() -> None:
    plan = plan_batch([row(1, None, attempts=3), row(2, None), row(3, None, attempts=1)], 1000)
    assert ids(plan.send) == [1, 2, 3]
    assert plan.held == []


# -- settle_plan -----------------------------------------------------------------------------------

POLICY = RetryPolicy(max_attempts=5, backoff=Backoff(1.0, 60.0))


def test_a_failure_leaves_the_same_keys_later_events_untouched() -> None:
    sent = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "a")]
    out = settle_plan(sent, [RETRY, PUBLISHED, RETRY, RETRY], POLICY)
    assert ids(out.published) == [2]
    assert [r.id for r, _, _ in out.retry] == [1]
    assert out.dead == []
    assert out.unavailable == 0
    _, delay, error = out.retry[0]
    assert 0.5 <= delay <= 1.0, "first retry waits between half and all of backoff_initial"
    assert error == "publish_failed: boom"


def test_a_reject_is_dead_lettered_at_once_with_its_reason() -> None:
    out = settle_plan([row(1, "a"), row(2, "b")], [REJECT, PUBLISHED], POLICY)
    assert [(r.id, reason, error) for r, reason, error in out.dead] == [(1, "record_too_large", "too big")]
    assert ids(out.published) == [2]
    assert out.retry == []


def test_the_last_allowed_attempt_failing_is_dead_lettered_as_max_attempts() -> None:
    out = settle_plan([row(1, "a", attempts=4), row(2, "b", attempts=3)], [RETRY, RETRY], POLICY)
    assert [(r.id, reason) for r, reason, _ in out.dead] == [(1, "max_attempts")]
    assert out.dead[0][2] == "publish_failed: boom"
    assert [r.id for r, _, _ in out.retry] == [2]


def test_an_unreachable_sink_counts_no_attempt() -> None:
    out = settle_plan([row(1, "a", attempts=4), row(2, "b"), row(3, None)], [DOWN, DOWN, DOWN], POLICY)
    assert out.unavailable == 3
    assert out.retry == [] and out.dead == [] and out.published == []


def test_results_must_match_rows() -> None:
    with pytest.raises(ValueError):
        settle_plan([row(1), row(2)], [PUBLISHED], POLICY)


# -- Backoff ---------------------------------------------------------------------------------------


class _Edge(random.Random):
    """uniform() always returns one end of its range."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_backoff_grows_exponentially_then_is_capped() -> None:
    backoff = Backoff(0.5, 10.0)
    tops = [backoff.delay(n, _Edge(high=True)) for n in range(1, 9)]
    assert tops == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    bottoms = [backoff.delay(n, _Edge(high=False)) for n in range(1, 9)]
    assert bottoms == [t / 2 for t in tops]


def test_backoff_jitter_stays_within_half_and_all_of_the_exponential_value() -> None:
    backoff = Backoff(0.2, 30.0, multiplier=3.0)
    rng = random.Random(42)
    for attempt in range(1, 12):
        exponential = min(30.0, 0.2 * 3.0 ** (attempt - 1))
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(exponential / 2 <= d <= exponential for d in delays), attempt
        assert max(delays) - min(delays) > exponential / 4, "jitter should spread the delays"


def test_backoff_survives_very_many_failures() -> None:
    # A sink down for half an hour fails far more than 1024 times; 2.0 ** 1024 overflows a float.
    backoff = Backoff(0.1, 30.0)
    assert 15.0 <= backoff.delay(5000) <= 30.0
    sink = FailureBackoff(0.1, 2.0)
    delays = [sink.failed() for _ in range(3000)]
    assert 1.0 <= delays[-1] <= 2.0
    assert sink.failing
    sink.succeeded()
    assert not sink.failing
    assert sink.failed() <= 0.1


def test_retry_policy_exhaustion_counts_the_attempt_that_just_failed() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=Backoff(1, 2))
    assert not policy.exhausted(0)
    assert not policy.exhausted(1)
    assert policy.exhausted(2)
    assert RetryPolicy(1, Backoff(1, 2)).exhausted(0)


# -- fair_share ------------------------------------------------------------------------------------


def test_sixteen_over_three_is_six_five_five_by_sorted_id() -> None:
    live = ["relay-a", "relay-b", "relay-c"]
    assert [fair_share(16, live, me) for me in live] == [6, 5, 5]


def test_an_instance_missing_from_the_live_list_counts_itself_in() -> None:
    # relay-0 sorts first once added: 16 over 3 gives it the extra partition.
    assert fair_share(16, ["relay-1", "relay-2"], "relay-0") == 6
    assert fair_share(16, ["relay-1", "relay-2"], "relay-3") == 5
    assert fair_share(16, [], "solo") == 16


@pytest.mark.parametrize("instances", range(1, 21))
def test_fair_shares_add_up_to_the_partition_count(instances: int) -> None:
    live = sorted(f"relay-{n:02d}" for n in range(instances))
    shares = [fair_share(16, live, me) for me in live]
    assert sum(shares) == 16
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True), "the extra partitions go to the first ids"


def test_an_unhealthy_instance_of_three_gets_nothing_and_the_healthy_split_everything() -> None:
    live = ["relay-a", "relay-b", "relay-c"]
    shares = [fair_share(16, live, me, unhealthy={"relay-b"}) for me in live]
    assert shares == [8, 0, 8]


def test_when_every_instance_is_unhealthy_the_split_is_the_usual_one() -> None:
    # Everyone lost the broker (a real outage): handing over would orphan partitions.
    live = ["relay-a", "relay-b", "relay-c"]
    assert [fair_share(16, live, me, unhealthy=set(live)) for me in live] == [6, 5, 5]


def test_an_instance_alone_unhealthy_keeps_its_partitions_when_it_has_no_peer() -> None:
    assert fair_share(16, ["solo"], "solo", unhealthy={"solo"}) == 16
    assert fair_share(16, [], "solo", unhealthy={"solo"}) == 16


def test_me_unhealthy_alone_hands_everything_to_the_healthy_peers() -> None:
    live = ["relay-a", "relay-b", "relay-c"]
    assert fair_share(16, live, "relay-a", unhealthy={"relay-a"}) == 0
    # ...and what the peers compute from the same heartbeat adds up to every partition.
    assert [fair_share(16, live, me, unhealthy={"relay-a"}) for me in live[1:]] == [8, 8]


def test_unhealthy_peers_do_not_count_for_a_healthy_instance_missing_from_the_list() -> None:
    assert fair_share(16, ["relay-1", "relay-2"], "relay-0", unhealthy={"relay-1"}) == 8
    assert fair_share(16, ["relay-1", "relay-2"], "relay-0", unhealthy={"relay-1", "relay-2"}) == 16


@pytest.mark.parametrize("instances", range(1, 9))
@pytest.mark.parametrize("sick", [0, 1, 2, 3])
def test_shares_over_healthy_instances_add_up_to_the_partition_count(instances: int, sick: int) -> None:
    live = sorted(f"relay-{n:02d}" for n in range(instances))
    unhealthy = set(live[::2][:sick])
    shares = {me: fair_share(16, live, me, unhealthy) for me in live}
    assert sum(shares.values()) == 16, "no partition orphaned, none counted twice"
    if len(unhealthy) < len(live):
        assert all(shares[me] == 0 for me in unhealthy)


# -- glob_to_like ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "like"),
    [
        ("*", "%"),
        ("orders.*", "orders.%"),
        ("orders.?", "orders._"),
        ("a_b", "a\\_b"),
        ("100%", "100\\%"),
        ("back\\slash", "back\\\\slash"),
        ("exact.topic", "exact.topic"),
    ],
)
def test_glob_to_like(glob: str, like: str) -> None:
    assert glob_to_like(glob) == like


@pytest.mark.parametrize(
    ("topic", "pattern", "paused"),
    [
        ("orders.eu", "orders.*", True),
        ("orders", "orders.*", False),
        ("orders.1", "orders.?", True),
        ("a_b", "a_b", True),
        ("axb", "a_b", False),
        ("100%", "100%", True),
        # '[' and ']' are themselves, as in the claim's LIKE: not a character class as in fnmatch.
        ("orders.a", "orders.[ab]", False),
        ("orders.[ab]", "orders.[ab]", True),
    ],
)
def test_pauses_match_topics_as_the_claims_like_does(topic: str, pattern: str, paused: bool) -> None:
    from relay.pauses import glob_matches

    assert glob_matches(topic, pattern) is paused
    assert PauseState.is_paused(_paused_by(pattern), topic) is paused


def _paused_by(pattern: str) -> PauseState:
    state = PauseState(store=None)  # type: ignore[arg-type]
    state._patterns = (pattern,)
    return state


# -- leases ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ttl", "window"), [(10.0, 8.0), (3.0, 2.4), (2.0, 1.5), (1.0, 0.5), (30.0, 24.0)])
def test_trust_window_keeps_a_margin_of_20_percent_and_at_least_half_a_second(
    ttl: float, window: float
) -> None:
    assert trust_window(ttl) == pytest.approx(window)


def test_the_trust_window_counts_from_when_the_lease_was_asked_for() -> None:
    asked = time.monotonic() - 2.0  # a slow round trip (or a frozen process) eats into the window
    lease = Lease.granted("partition:3", "me", 7, asked, ttl=3.0)
    assert lease.remaining() == pytest.approx(0.4, abs=0.05)
    assert lease.fence.args == ("partition:3", "me", 7)
    lease.renewed(time.monotonic() - 3.0, ttl=3.0)
    assert lease.remaining() < 0
