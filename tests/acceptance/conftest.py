"""Fixtures for the end-to-end acceptance suite (see harness.py for the machinery).

Every test runs the real `keybrake serve` binary (KEYBRAKE_BIN, default
target/debug/keybrake) against a real fake Stripe (localstripe, wrapped by
fakes/localstripe_server.py so it binds 127.0.0.1 and records what it received).
"""

import secrets

import pytest

from harness import FakeStripe, Keybrake, Tenant


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
def keybrake_factory(tmp_path):
    started: list[Keybrake] = []
    counter = [0]

    def make(upstreams: dict[str, str], start: bool = True, **kwargs) -> Keybrake:
        counter[0] += 1
        kb = Keybrake(tmp_path / f"kb{counter[0]}", upstreams, **kwargs)
        started.append(kb)
        if start:
            kb.start()
        return kb

    yield make
    for kb in started:
        if kb.proc and kb.proc.poll() is None:
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
