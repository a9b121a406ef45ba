"""The job store on both databases, from an empty schema migrated by Alembic."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.db import create_db_engine
from app.errors import Conflict
from app.jobs import migrate
from app.jobs.models import Job, JobStatus
from app.jobs.store import JobStore, NewJob, utcnow

BACKENDS = ["sqlite", "postgresql"]


def _new(**overrides: object) -> NewJob:
    fields: dict[str, object] = {
        "owner": "",
        "endpoint": "/v1/embeddings",
        "model": "minilm",
        "task": "inferq.embeddings",
        "priority": 5,
        "request": {"model": "minilm", "input": ["a"]},
        "payload": {"inputs": ["a"]},
        "idempotency_key": None,
        "metadata": None,
        "webhook_url": None,
        "ttl_s": 3600.0,
    }
    fields.update(overrides)
    return NewJob(**fields)  # type: ignore[arg-type]


@pytest.fixture(params=BACKENDS)
def store(
    request: pytest.FixtureRequest, database_urls: Callable[[str, str], str]
) -> Iterator[JobStore]:
    label = re.sub(r"\W", "_", request.node.name)[-28:]
    url = database_urls(request.param, label)
    migrate.upgrade(url)
    engine = create_db_engine(url)
    yield JobStore(engine)
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_upgrade_and_downgrade_from_empty(
    backend: str, database_urls: Callable[[str, str], str]
) -> None:
    url = database_urls(backend, "roundtrip")
    engine = create_db_engine(url)
    try:
        assert migrate.current_revision(engine) is None
        migrate.upgrade(url)
        assert migrate.current_revision(engine) == migrate.head_revision(url)
        assert migrate.schema_problem(engine, url) is None
        assert "jobs" in sa.inspect(engine).get_table_names()
        migrate.downgrade(url, "base")
        assert "jobs" not in sa.inspect(engine).get_table_names()
        assert migrate.current_revision(engine) is None
        assert "inferq db upgrade" in (migrate.schema_problem(engine, url) or "")
    finally:
        engine.dispose()


def test_models_and_migrations_agree(store: JobStore) -> None:
    """Autogenerate finds nothing to do: the revision matches the models."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from app.jobs.models import Base

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_idempotency_key_returns_the_same_job_or_conflicts(store: JobStore) -> None:
    first, created = store.create(_new(idempotency_key="k1"))
    again, created_again = store.create(_new(idempotency_key="k1"))
    assert created and not created_again
    assert again.id == first.id
    with pytest.raises(Conflict):
        store.create(_new(idempotency_key="k1", request={"model": "minilm", "input": ["b"]}))
    other_owner, created_other = store.create(_new(idempotency_key="k1", owner="someone"))
    assert created_other and other_owner.id != first.id


def test_a_job_is_claimed_once_and_taken_over_only_from_a_dead_replica(store: JobStore) -> None:
    job, _ = store.create(_new())
    alive = {"r1"}

    def is_alive(replica: str) -> bool:
        return replica in alive

    first = store.claim(job.id, "r1", is_alive, max_attempts=3, lease_s=60)
    assert first.reason == "claimed" and first.job and first.job.attempts == 1
    assert store.claim(job.id, "r1", is_alive, 3, 60).reason == "duplicate"
    assert store.claim(job.id, "r2", is_alive, 3, 60).reason == "held"
    alive.clear()
    second = store.claim(job.id, "r2", is_alive, 3, 60)
    assert second.reason == "taken_over" and second.job and second.job.attempts == 2
    # The first replica's late result is not recorded; the holder's is, once.
    assert not store.finish(job.id, "r1", result={"x": 1})
    assert store.finish(job.id, "r2", result={"x": 2})
    assert not store.finish(job.id, "r2", result={"x": 3})
    done = store.get(job.id)
    assert done and done.status == JobStatus.succeeded and done.result == {"x": 2}
    assert store.claim(job.id, "r3", is_alive, 3, 60).reason == JobStatus.succeeded


def test_a_running_job_whose_lease_ran_out_is_taken_over_even_by_its_own_replica(
    store: JobStore,
) -> None:
    """A live replica whose attempt could not record its outcome stops renewing the lease;
    the next delivery, on any replica, takes the job over instead of dropping it."""
    job, _ = store.create(_new())
    alive = lambda _: True  # noqa: E731
    assert store.claim(job.id, "r1", alive, 3, lease_s=60).reason == "claimed"
    assert store.renew([job.id], "r1", 60) == 1
    assert store.renew([job.id], "r2", 60) == 0  # only the holder renews
    assert store.claim(job.id, "r1", alive, 3, 60).reason == "duplicate"
    assert [j.id for j in store.running_unheld(grace_s=3600)] == []
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(Job)
            .where(Job.id == job.id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    assert [j.id for j in store.running_unheld(grace_s=3600)] == [job.id]
    again = store.claim(job.id, "r1", alive, 3, 60)
    assert again.reason == "taken_over" and again.job and again.job.attempts == 2
    assert store.finish(job.id, "r1", result={"x": 1})


def test_attempts_run_out_after_repeated_worker_deaths(store: JobStore) -> None:
    job, _ = store.create(_new())
    dead = lambda _: False  # noqa: E731
    assert store.claim(job.id, "r1", dead, 2, 60).reason == "claimed"
    assert store.claim(job.id, "r2", dead, 2, 60).reason == "taken_over"
    assert store.claim(job.id, "r3", dead, 2, 60).reason == "attempts_exhausted"
    failed = store.get(job.id)
    assert failed and failed.status == JobStatus.failed and failed.attempts == 2
    assert failed.error and failed.error["code"] == "worker_lost"


def test_cancel_stops_claims_and_discards_late_results(store: JobStore) -> None:
    queued, _ = store.create(_new())
    cancelled, before = store.cancel(queued.id, "")
    assert before == JobStatus.queued and cancelled and cancelled.status == JobStatus.cancelled
    assert store.claim(queued.id, "r1", lambda _: True, 3, 60).job is None

    running, _ = store.create(_new())
    store.claim(running.id, "r1", lambda _: True, 3, 60)
    _, before = store.cancel(running.id, "")
    assert before == JobStatus.running
    assert not store.finish(running.id, "r1", result={"x": 1})
    assert store.cancel(running.id, "other-owner") == (None, None)


def test_list_is_newest_first_with_a_cursor_and_filters(store: JobStore) -> None:
    ids = [store.create(_new(owner="lister", model=f"m{i % 2}"))[0].id for i in range(5)]
    page, more = store.list("lister", limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and more
    page2, _ = store.list("lister", limit=2, after=page[-1].id)
    assert [j.id for j in page2] == ids[::-1][2:4]
    only_m0, _ = store.list("lister", model="m0", limit=10)
    assert {j.model for j in only_m0} == {"m0"} and len(only_m0) == 3
    assert store.list("nobody")[0] == []


def test_expiry_of_unstarted_jobs_and_of_old_results(store: JobStore) -> None:
    stale, _ = store.create(_new(ttl_s=0.0))
    done, _ = store.create(_new())
    store.claim(done.id, "r1", lambda _: True, 3, 60)
    store.finish(done.id, "r1", result={"x": 1})
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(Job)
            .where(Job.id == done.id)
            .values(finished_at=utcnow() - timedelta(hours=2))
        )
    store.expire(retention_s=3600)
    expired = store.get(stale.id)
    assert expired and expired.status == JobStatus.expired
    assert expired.error and expired.error["code"] == "expired"
    old = store.get(done.id)
    assert old and old.status == JobStatus.expired and old.result is None


def _child(parent_id: str, seq: int, status: str = JobStatus.held) -> Job:
    from app.jobs.store import new_job_id, request_fingerprint

    now = utcnow()
    return Job(
        id=new_job_id(),
        owner="o",
        endpoint="corpus",
        model="minilm",
        task="inferq.corpus_shard",
        status=status,
        priority=2,
        request={"shard": seq},
        request_hash=request_fingerprint({"shard": seq}),
        payload={"index": seq},
        attempts=0,
        created_at=now,
        expires_at=now + timedelta(hours=1),
        webhook_attempts=0,
        parent_id=parent_id,
        seq=seq,
    )


def test_children_are_not_sendable_until_their_parent_releases_them(store: JobStore) -> None:
    """The sweeper sends whatever `queued_never_sent` returns: children written while the
    parent's file is still being read must not be among them."""
    from app.jobs.bulk_store import BulkStore
    from app.jobs.models import CorpusJob, CorpusStatus

    bulk = BulkStore(store._sessions.kw["bind"])
    now = utcnow()
    parent = CorpusJob(
        id="corpus-held",
        owner="o",
        file_id="file-x",
        model="minilm",
        status=CorpusStatus.validating,
        input_format="jsonl",
        output_format="jsonl",
        shard_size=1,
        created_at=now,
    )
    bulk.add(parent)
    assert bulk.add_children([_child(parent.id, i) for i in range(600)]) == []
    assert [j for j in store.queued_never_sent(limit=1000) if j.parent_id == parent.id] == []
    assert bulk.release_children(
        CorpusJob, parent.id, [CorpusStatus.validating], CorpusStatus.in_progress, shards_total=600
    )
    sendable = [j for j in store.queued_never_sent(limit=1000) if j.parent_id == parent.id]
    assert len(sendable) == 600


def test_a_child_place_holds_one_job(store: JobStore) -> None:
    """A split or validation run twice (two coordinators) cannot add a shard twice."""
    from app.jobs.bulk_store import BulkStore

    bulk = BulkStore(store._sessions.kw["bind"])
    assert bulk.add_children([_child("corpus-twice", 0), _child("corpus-twice", 1)]) == []
    refused = bulk.add_children([_child("corpus-twice", 1)])
    assert [j.seq for j in refused] == [1]
    assert bulk.child_counts("corpus-twice") == {JobStatus.held: 2}


def test_a_backlogged_model_never_hides_another_models_lost_jobs(store: JobStore) -> None:
    """600 jobs of one model sent long ago and waiting their turn, then one of another
    model never sent (the broker was away): the sweeper's reads find the lone job, and
    each model's long-sent jobs on their own."""
    from app.jobs.store import new_job_id, request_fingerprint

    long_ago = utcnow() - timedelta(hours=1)
    backlog = []
    for i in range(600):
        job = _child("none", i, JobStatus.queued)
        job.parent_id, job.seq, job.model, job.sent_at = None, None, "busy", long_ago
        job.request_hash = request_fingerprint({"i": i})
        job.id = new_job_id()
        backlog.append(job)
    with store._sessions() as session:
        session.add_all(backlog)
        session.commit()
    lone, _ = store.create(_new(model="quiet"))
    assert [j.id for j in store.queued_never_sent()] == [lone.id]
    assert store.models_sent_long_ago(60) == ["busy"]
    store.mark_sent(lone.id)
    with store.engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == lone.id).values(sent_at=long_ago))
    assert sorted(store.models_sent_long_ago(60)) == ["busy", "quiet"]
    assert [j.id for j in store.queued_sent_long_ago("quiet", 60)] == [lone.id]
    assert len(store.queued_sent_long_ago("busy", 60)) == 500
