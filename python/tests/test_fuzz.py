"""Arbitrary bytes to qmig.open: only typed exceptions (or a capture)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmig
from conftest import DATA

SEED = (DATA / "q10-stopped" / "stream").read_bytes()[:4096]


def _open(data: bytes) -> None:
    try:
        c = qmig.open(data, memory_limit=64 << 20)
    except qmig.QmigError as e:
        assert e.rule is not None
        assert e.offset is None or isinstance(e.offset, int)
        return
    for b in c.blocks:
        c.read_block(b.name, 0, min(b.length, 4096))
    list(c.records())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    _open(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SEED) - 1), st.binary(min_size=1, max_size=16), st.integers(0, len(SEED)))
def test_mutated_stream(at, patch, cut):
    data = bytearray(SEED)
    data[at:at + len(patch)] = patch
    _open(bytes(data[:max(cut, 8)]))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_qevm_prefixed(data):
    _open(b"QEVM\x00\x00\x00\x03" + data)
