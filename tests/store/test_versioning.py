from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

from store.models import Dataset, Policy
from store.versioning import create_version
from tests import builders


def test_versions_are_numbered_per_name(db):
    with db.session() as s:
        a1 = builders.policy(s, name="a")
        a2 = builders.policy(s, name="a")
        b1 = builders.policy(s, name="b")
    assert (a1.version, a2.version, b1.version) == (1, 2, 1)


def test_sixteen_concurrent_writers_get_one_to_sixteen(db):
    threads = 16
    barrier = Barrier(threads)

    def write(i: int) -> int:
        barrier.wait()
        with db.session() as s:
            row = create_version(
                s, Dataset, name="concurrent", kind="prompts", content_sha256=f"{i:064x}", row_count=i
            )
            return row.version

    with ThreadPoolExecutor(threads) as pool:
        versions = list(pool.map(write, range(threads)))
    assert sorted(versions) == list(range(1, threads + 1))
    with db.session() as s:
        stored = sorted(v for (v,) in s.query(Dataset.version).filter(Dataset.name == "concurrent"))
    assert stored == list(range(1, threads + 1))


def test_a_failed_transaction_leaves_no_gap(db):
    with db.session() as s:
        builders.policy(s, name="p")
    try:
        with db.session() as s:
            builders.policy(s, name="p")
            raise RuntimeError("crash before commit")
    except RuntimeError:
        pass
    with db.session() as s:
        assert builders.policy(s, name="p").version == 2
        assert s.query(Policy).filter(Policy.name == "p").count() == 2
