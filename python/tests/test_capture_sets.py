"""qmig.open over the committed capture sets, read as the CLI reads them:
a postcopy migration paused and recovered (a list of main connections plus
preempt channels, tests/data/recovery) and multifd migrations (main stream
plus channel files, tests/data/multifd/q10-*). Block contents equal the
oracle's pmemsave digests; errors are typed."""

import hashlib
import json

import pytest

import qmig
from conftest import DATA

RECOVERY = sorted(d for d in (DATA / "recovery").iterdir() if (d / "oracle.json").exists())
MULTIFD = sorted(
    d
    for d in (DATA / "multifd").iterdir()
    if (d / "oracle.json").exists() and (d / "conn-0.bin.gz").exists()
)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def oracle(d):
    return json.loads((d / "oracle.json").read_text())


def recovery_set(d):
    """Main connections and preempt channels, in connection order."""
    mains, preempt = [], []
    for c in sorted(oracle(d)["connections"], key=lambda c: c["connection"]):
        files = c["files"]
        if "main" in files:
            mains.append(d / files["main"]["file"])
        if "preempt" in files:
            preempt.append(d / files["preempt"]["file"])
    return mains, preempt


def multifd_set(d):
    """The main stream and the channel files, from the oracle's list."""
    conns = oracle(d)["connections"]
    main = [d / (c["file"] + ".gz") for c in conns if c["kind"] == "main"]
    chans = [d / (c["file"] + ".gz") for c in conns if c["kind"] == "multifd"]
    assert len(main) == 1 and chans
    return main[0], chans


def test_every_capture_set_is_found():
    assert len(RECOVERY) >= 3 and len(MULTIFD) >= 3
    assert any(recovery_set(d)[1] for d in RECOVERY), "no capture with preempt channels"


@pytest.mark.parametrize("d", RECOVERY, ids=[d.name for d in RECOVERY])
def test_recovered_postcopy_digests_equal_the_oracle(d):
    mains, preempt = recovery_set(d)
    assert len(mains) >= 2
    c = qmig.open([str(p) for p in mains], preempt=[str(p) for p in preempt])
    o = oracle(d)
    assert o["pmemsave"]["source_sha256"] == o["pmemsave"]["destination_sha256"]
    assert len(o["digests"]) >= 2
    for x in o["digests"]:
        assert sha(c.read_block(x["block"], x["offset"], x["length"])) == x["sha256"], x
        # The guest-physical view agrees (the digests skip the legacy hole).
        assert sha(c.read_phys(x["gpa"], x["length"])) == x["sha256"], x
    # Records say which connection they come from; the recovery handshake
    # of each later main connection is listed.
    conns = {r.connection for r in c.records()}
    want = {f"main-{i + 1}" for i in range(len(mains))} | {
        f"preempt-{i + 1}" for i in range(len(preempt))
    }
    assert conns == want
    resumes = [r for r in c.records() if r.kind == "command" and r.detail == "POSTCOPY_RESUME"]
    assert [r.connection for r in resumes] == [f"main-{i + 1}" for i in range(1, len(mains))]


@pytest.mark.parametrize("d", RECOVERY, ids=[d.name for d in RECOVERY])
def test_recovered_postcopy_accepts_path_likes_and_tuples(d):
    mains, preempt = recovery_set(d)
    a = qmig.open(tuple(mains), preempt=preempt)
    x = oracle(d)["digests"][-1]
    assert sha(a.read_block(x["block"], x["offset"], x["length"])) == x["sha256"]


def test_one_connection_of_a_recovered_migration_is_not_enough():
    d = DATA / "recovery" / "q10-preempt-recover"
    mains, preempt = recovery_set(d)
    # The first main connection alone was cut: it does not end.
    with pytest.raises(qmig.StreamError) as e:
        qmig.open([str(mains[0])])
    assert e.value.rule == "truncated" and e.value.offset > 0
    assert str(mains[0]) in str(e.value)
    # A recovery connection is not a whole stream.
    with pytest.raises(qmig.StreamError) as e:
        qmig.open([str(mains[1]), str(mains[0])])
    assert e.value.rule == "bad_magic" and e.value.offset == 0
    # Preempt channels belong to main connections, one each.
    with pytest.raises(ValueError):
        qmig.open([str(p) for p in mains], preempt=[str(preempt[0])] * 3)
    # Without its preempt channels the pages they carried are missing.
    c = qmig.open([str(p) for p in mains])
    o = oracle(d)
    assert any(
        sha(c.read_block(x["block"], x["offset"], x["length"])) != x["sha256"]
        for x in o["digests"]
    )


@pytest.mark.parametrize("d", MULTIFD, ids=[d.name for d in MULTIFD])
def test_multifd_digests_equal_the_oracle(d):
    main, chans = multifd_set(d)
    # Channels are told apart by their header, not by the order given.
    c = qmig.open(str(main), multifd=[str(p) for p in reversed(chans)])
    o = oracle(d)
    assert o["ranges"]
    for x in o["ranges"]:
        assert sha(c.read_block(x["block"], x["offset"], x["length"])) == x["sha256"], x
    # The source was started with -S: the firmware blocks' pages travel
    # only in the channels (the main stream alone leaves them zero).
    alone = qmig.open(str(main))
    bios = [b for b in c.blocks if b.name == "pc.bios"][0]
    assert any(c.read_block("pc.bios", 0, bios.length))
    assert not any(alone.read_block("pc.bios", 0, bios.length))


def test_multifd_errors_are_typed():
    main, chans = multifd_set(DATA / "multifd" / "q10-zlib")
    with pytest.raises(qmig.StateError) as e:
        qmig.open(str(main), multifd=[str(chans[0]), str(chans[0])])
    assert e.value.rule == "multifd_recv_new_channel"
    with pytest.raises(qmig.InputError) as e:
        qmig.open(str(main), multifd=[str(DATA / "no-such-channel")])
    assert e.value.rule == "io"
    # A stream without multifd sync points takes no channel files.
    plain = DATA / "q10-zpd-none" / "stream.gz"
    with pytest.raises(qmig.StateError) as e:
        qmig.open(str(plain), multifd=[str(chans[0])])
    assert e.value.rule == "multifd_recv_sync_main"
    # Multifd channels belong to one main connection.
    mains, _ = recovery_set(DATA / "recovery" / "q10-postcopy-recover")
    with pytest.raises(ValueError):
        qmig.open([str(p) for p in mains], multifd=[str(chans[0])])


MAPPED = sorted(
    d
    for d in (DATA / "multifd").iterdir()
    if (d / "oracle.json").exists() and (d / "stream.gz").exists()
)


@pytest.mark.parametrize("d", MAPPED, ids=[d.name for d in MAPPED])
def test_mapped_ram_multifd_file_digests_equal_the_oracle(d):
    # A `file:` migration with mapped-ram and multifd is one file: its
    # channels' pages sit at fixed offsets of the file, no channel files.
    c = qmig.open(str(d / "stream.gz"))
    o = oracle(d)
    assert o["ranges"]
    for x in o["ranges"]:
        assert sha(c.read_block(x["block"], x["offset"], x["length"])) == x["sha256"], x
    for name, length in o["lengths"].items():
        assert [b.length for b in c.blocks if b.name == name] == [length]
    assert any(c.read_block("pc.bios", 0, 262144))
