"""Fixtures for the end-to-end acceptance suite (see harness.py for the machinery).

Every test runs the real `keybrake` binary (KEYBRAKE_BIN, default target/debug/keybrake)
against a real fake Stripe (localstripe, wrapped by fakes/localstripe_server.py so it
binds 127.0.0.1 and records what it received).

Two storage backends: a module marked `pytestmark = pytest.mark.both_backends` runs each
of its tests twice, `[sqlite]` on `keybrake serve` (as a single host runs it) and
`[postgres]` on `keybrake control --database-url` with an edge proxy synced from it
(fleet.PgDeployment), in a fresh database of one throwaway cluster per session (pg.py).
A test that checks something only the embedded store has (the data dir's files,
generated secrets, the kill -9 of a single process) is marked `sqlite_only(reason)`.
"""

import secrets

import pytest

from fleet import PgDeployment
from harness import FakeStripe, Keybrake, Tenant
from pg import Cluster, PostgresMissing

BACKENDS = ("sqlite", "postgres")


def pytest_configure(config):
    config.addinivalue_line("markers", "both_backends: run each test on SQLite and on PostgreSQL")
    config.addinivalue_line("markers", "sqlite_only(reason): in a both_backends module, SQLite only")


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("both_backends") and not metafunc.definition.get_closest_marker(
        "sqlite_only"
    ):
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def backend(request) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL cluster for the session, removed at the end even when
    tests fail. Missing PostgreSQL fails the tests that need it (no skip)."""
    try:
        cluster = Cluster()
    except PostgresMissing as e:
        pytest.fail(str(e))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_database(pg_cluster, request) -> str:
    """A fresh, empty database on the session cluster: its postgres:// URL."""
    return pg_cluster.create_database(request.node.name[:30])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def fake_stripe_factory(tmp_path):
    started: list[FakeStripe] = []
    counter = [0]

    def make() -> FakeStripe:
        counter[0] += 1
        fake = FakeStripe(tmp_path / f"fake{counter[0]}").start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def keybrake_factory(tmp_path, backend, request):
    """Makes `keybrake serve` processes, or on the postgres backend a control replica on a
    fresh database with its edge proxy (same methods, same addresses' meaning)."""
    started: list[Keybrake] = []
    counter = [0]

    def make(upstreams: dict[str, str], start: bool = True, **kwargs) -> Keybrake:
        counter[0] += 1
        workdir = tmp_path / f"kb{counter[0]}"
        if backend == "postgres":
            cluster = request.getfixturevalue("pg_cluster")
            kb = PgDeployment(workdir, upstreams, cluster.create_database(f"kb{counter[0]}"), cluster, **kwargs)
        else:
            kb = Keybrake(workdir, upstreams, **kwargs)
        started.append(kb)
        if start:
            kb.start()
        return kb

    yield make
    for kb in started:
        if isinstance(kb, PgDeployment):
            kb.kill_all()
        elif kb.proc and kb.proc.poll() is None:
            kb.proc.kill()
            kb.proc.wait(timeout=10)


@pytest.fixture
def fake_stripe(fake_stripe_factory) -> FakeStripe:
    return fake_stripe_factory()


@pytest.fixture
def keybrake(keybrake_factory, fake_stripe) -> Keybrake:
    return keybrake_factory({"stripe": fake_stripe.url})


@pytest.fixture
def stripe_secret() -> str:
    """A distinctive real-looking Stripe secret, so it can be searched for at rest."""
    return "sk_test_" + secrets.token_hex(20)


@pytest.fixture
def tenant(keybrake, stripe_secret) -> Tenant:
    """A tenant with its Stripe credential registered."""
    t = keybrake.create_tenant("acme")
    t.put_credential("stripe", stripe_secret)
    return t
