from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from threading import Barrier

import pytest
from sqlalchemy import select

from store.cycles import finish_stage, get_stage, iso_week, open_cycle, start_stage
from store.deployments import active_deployment, deploy, rollback
from store.errors import Conflict, InvalidInput, NotFound, StoreError
from store.keys import authenticate, create_api_key, revoke_api_key
from store.models import TaskLease
from store.tasks import create_tasks, lease_tasks
from tests import builders


def test_deploy_and_roll_back_like_an_undo_stack(db):
    with db.session() as s:
        p1, p2, p3 = (builders.policy(s).id for _ in range(3))
        with pytest.raises(NotFound, match="never been deployed"):
            rollback(s)
        d1 = deploy(s, policy_id=p1, reason="initial")
        with pytest.raises(Conflict, match="no earlier deployment"):
            rollback(s)
        deploy(s, policy_id=p2)
        d3 = deploy(s, policy_id=p3)
        r1 = rollback(s, reason="regression", actor="ops")
        assert (r1.policy_id, r1.action, r1.rolled_back_id, r1.version) == (p2, "rollback", d3.id, 4)
        r2 = rollback(s)
        assert r2.policy_id == p1 and r2.previous_id is None
        assert active_deployment(s).id == r2.id
        assert d1.previous_id is None


def _all_at_once(threads: int, work):
    """``work(i)`` for i in 0..threads-1, started together in threads; a store error is returned, not raised."""
    barrier = Barrier(threads)

    def run(i):
        barrier.wait()
        try:
            return work(i)
        except StoreError as exc:
            return exc

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, range(threads)))


def test_concurrent_rollbacks_each_walk_back_one_step(db):
    with db.session() as s:
        policies = [builders.policy(s).id for _ in range(10)]
        deployed = [deploy(s, policy_id=p).id for p in policies]

    def roll_back(i):
        with db.session() as s:
            row = rollback(s, actor=f"ops-{i}")
            return row.policy_id, row.rolled_back_id

    results = _all_at_once(8, roll_back)
    # Ten deploys, eight rollbacks: they restore p9, p8, ..., p2 in turn, each undoing the one before.
    assert sorted(policy for policy, _ in results) == policies[1:9]
    assert len({undone for _, undone in results}) == 8 and deployed[-1] in {undone for _, undone in results}
    with db.session() as s:
        assert active_deployment(s).policy_id == policies[1]


def test_concurrent_rollbacks_past_the_first_deployment_are_conflicts(db):
    with db.session() as s:
        policies = [builders.policy(s).id for _ in range(3)]
        for p in policies:
            deploy(s, policy_id=p, name="canary")

    def roll_back(_):
        with db.session() as s:
            return rollback(s, name="canary").policy_id

    results = _all_at_once(8, roll_back)
    assert sorted(r for r in results if isinstance(r, int)) == policies[:2]
    refused = [r for r in results if not isinstance(r, int)]
    assert len(refused) == 6 and all(isinstance(r, Conflict) and "no earlier deployment" in str(r) for r in refused)
    with db.session() as s:
        assert active_deployment(s, name="canary").policy_id == policies[0]


def test_concurrent_deploys_to_a_new_target_form_one_chain(db):
    with db.session() as s:
        policies = [builders.policy(s).id for _ in range(8)]

    def deploy_one(i):
        with db.session() as s:
            return deploy(s, policy_id=policies[i], name="fresh")

    rows = sorted(_all_at_once(8, deploy_one), key=lambda row: row.version)
    assert [row.version for row in rows] == list(range(1, 9))
    assert [row.previous_id for row in rows] == [None] + [row.id for row in rows[:-1]]
    with db.session() as s:
        assert active_deployment(s, name="fresh").id == rows[-1].id


def test_a_cycle_is_one_per_week_even_under_concurrent_triggers(db):
    week = iso_week(datetime(2026, 11, 23, tzinfo=UTC))
    assert week == "2026-W48"

    def trigger(_):
        with db.session() as s:
            cycle, created = open_cycle(s, week=week, trigger="schedule")
            return cycle.id, created

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(trigger, range(4)))
    assert len({cid for cid, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_a_cycle_is_refused_for_a_week_that_does_not_exist(db):
    with db.session() as s:
        for week, why in [("2026-W54", "2026 has 53 weeks"), ("2027-W53", "2027 has 52 weeks"),
                          ("2026-W00", "2026 has 53 weeks")]:
            with pytest.raises(InvalidInput, match=why) as refused:
                open_cycle(s, week=week)
            assert refused.value.errors[0]["field"] == "week"
        cycle, created = open_cycle(s, week="2026-W53")
        assert created and cycle.week == "2026-W53"


def test_stage_runs_restart_after_failure_and_refuse_a_second_success(db):
    with db.session() as s:
        cycle, _ = open_cycle(s, week="2026-W01")
        start_stage(s, cycle_id=cycle.id, stage="sample")
        finish_stage(s, cycle_id=cycle.id, stage="sample", status="failed", error="OOM")
        run = start_stage(s, cycle_id=cycle.id, stage="sample")
        assert run.attempts == 2 and run.error is None
        finish_stage(s, cycle_id=cycle.id, stage="sample", outputs={"dataset_id": 3}, compute_s=1.5)
        assert get_stage(s, cycle_id=cycle.id, stage="sample").outputs == {"dataset_id": 3}
        with pytest.raises(Conflict, match="already succeeded"):
            start_stage(s, cycle_id=cycle.id, stage="sample")


def test_api_keys_store_only_a_hash_and_can_be_revoked(db):
    with db.session() as s:
        key, token = create_api_key(s, name="vendor", role="labeler")
        assert token not in (key.token_sha256, key.prefix) and token.startswith(key.prefix)
        assert authenticate(s, token).id == key.id
        assert authenticate(s, token + "x") is None
        with pytest.raises(Conflict):
            create_api_key(s, name="vendor", role="admin")
        with pytest.raises(InvalidInput, match="role 'root'"):
            create_api_key(s, name="other", role="root")
        revoke_api_key(s, name="vendor")
        assert authenticate(s, token) is None


def test_leases_hand_out_disjoint_tasks_until_they_expire(db):
    with db.session() as s:
        create_tasks(s, tasks=[{"prompt": f"p{i}", "response_a": "x", "response_b": "y"} for i in range(5)])
    with db.session() as s:
        first = [t.task.id for t in lease_tasks(s, rater_id="a", limit=3, lease=timedelta(minutes=5))]
    with db.session() as s:
        second = [t.task.id for t in lease_tasks(s, rater_id="b", limit=3, lease=timedelta(minutes=5))]
    assert len(first) == 3 and len(second) == 2 and not set(first) & set(second)
    with db.session() as s:
        assert lease_tasks(s, rater_id="c", limit=3, lease=timedelta(minutes=5)) == []
    with db.session() as s:
        (late,) = create_tasks(s, tasks=[{"prompt": "late", "response_a": "x", "response_b": "y"}])
        # A lease that has already run out, as if rater d walked away.
        assert [t.task.id for t in lease_tasks(s, rater_id="d", limit=1, lease=timedelta(seconds=-1))] == [late.id]
    with db.session() as s:
        (again,) = lease_tasks(s, rater_id="e", limit=5, lease=timedelta(minutes=5))
        assert again.task.id == late.id
        holders = s.scalars(select(TaskLease.rater_id).where(TaskLease.task_id == late.id).order_by(TaskLease.id))
        assert list(holders) == ["d", "e"]
