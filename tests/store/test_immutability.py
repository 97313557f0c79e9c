import pytest
from sqlalchemy import text

from store.errors import ImmutableVersion
from store.models import Policy
from store.cycles import open_cycle
from tests import builders


def test_orm_update_of_a_version_is_refused(db):
    with db.session() as s:
        pid = builders.policy(s).id
    with pytest.raises(ImmutableVersion, match="Policy id=.* immutable"):
        with db.session() as s:
            s.get(Policy, pid).base_model = "changed"
    with db.session() as s:
        assert s.get(Policy, pid).base_model == "tiny"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE policies SET base_model = 'changed'",
        "UPDATE feedback_batches SET source = 'changed'",
        "UPDATE comparisons SET choice = 'b'",
        "UPDATE datasets SET row_count = 0",
        "UPDATE artifacts SET sha256 = 'x'",
    ],
)
def test_sql_update_of_a_version_is_refused_by_the_database(db, statement):
    with db.session() as s:
        b = builders.batch(s)
        builders.policy(s)
        from store.datasets import create_dataset

        create_dataset(s, name="d", kind="prompts", content_sha256="0" * 64, row_count=1, artifact=builders.fake_artifact())
    table = statement.split()[1]
    with pytest.raises(ImmutableVersion, match=f"immutable version row: {table}"):
        with db.session() as s:
            s.execute(text(statement))
    with db.session() as s:
        assert s.execute(text("SELECT source FROM feedback_batches WHERE id = :i"), {"i": b.id}).scalar() == "test"


def test_work_rows_stay_mutable(db):
    with db.session() as s:
        cycle, created = open_cycle(s, week="2026-W01")
        assert created
    with db.session() as s:
        s.execute(text("UPDATE cycles SET status = 'failed'"))
