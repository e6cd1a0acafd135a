"""The Volatility3 stacker: a broken QEMU stream is reported in vol's
default output (not only at -vvv); a good one stacks a QmigLayer."""

import os
import shutil
import subprocess
import sys

import pytest

import qmig.vol3
from conftest import DATA

pytest.importorskip("volatility3")


def vol(args, cwd):
    exe = shutil.which("vol") or os.path.join(os.path.dirname(sys.executable), "vol")
    return subprocess.run(
        [exe, "-q", *args, "-p", qmig.vol3.plugin_dir(), "layerwriter", "--list"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stacks_a_qmig_layer(tmp_path):
    r = vol(["-f", str(DATA / "q72-xbzrle" / "stream")], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "QmigLayer" in r.stdout


def test_a_broken_stream_is_reported(tmp_path):
    bad = tmp_path / "bad.stream"
    bad.write_bytes(b"QEVM\0\0\0\3\x01\0\0\0\x01garbage")
    r = vol(["-f", str(bad)], tmp_path)
    out = r.stdout + r.stderr
    assert "cannot read" in out and "rule truncated" in out, out
    assert "QmigLayer" not in r.stdout
