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


# Capture sets: arbitrary bytes as a recovery connection, a preempt channel
# or a multifd channel next to a real main connection: only typed errors.
_REC = DATA / "recovery" / "q10-preempt-recover"
_MFD = DATA / "multifd" / "q10-none"


def _open_set(tmp_path_factory, data: bytes, where: str) -> None:
    f = tmp_path_factory.mktemp("set") / "conn.bin"
    f.write_bytes(data)
    main1, main2 = str(_REC / "main-1.bin.gz"), str(_REC / "main-2.bin.gz")
    try:
        if where == "recovery":
            c = qmig.open([main1, str(f)], memory_limit=64 << 20)
        elif where == "preempt":
            c = qmig.open([main1, main2], preempt=[str(f)], memory_limit=64 << 20)
        else:
            c = qmig.open(str(_MFD / "conn-0.bin.gz"), multifd=[str(f)], memory_limit=256 << 20)
    except qmig.QmigError as e:
        assert e.rule is not None
        assert e.offset is None or isinstance(e.offset, int)
        return
    list(c.records())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=256), st.sampled_from(["recovery", "preempt", "multifd"]))
def test_arbitrary_connection_in_a_capture_set(tmp_path_factory, data, where):
    _open_set(tmp_path_factory, data, where)


def _seed(path, n):
    import gzip

    return gzip.decompress(path.read_bytes())[:n]


_SEEDS = {
    "recovery": _seed(_REC / "main-2.bin.gz", 8192),
    "preempt": _seed(_REC / "preempt-1.bin.gz", 8192),
    "multifd": _seed(_MFD / "conn-1.bin.gz", 16384),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(["recovery", "preempt", "multifd"]),
    st.integers(0, 8191),
    st.binary(min_size=1, max_size=8),
    st.integers(0, 16384),
)
def test_mutated_connection_in_a_capture_set(tmp_path_factory, where, at, patch, cut):
    data = bytearray(_SEEDS[where])
    data[at:at + len(patch)] = patch
    _open_set(tmp_path_factory, bytes(data[:cut]), where)
