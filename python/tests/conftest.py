import json
import pathlib

import pytest

DATA = pathlib.Path(__file__).resolve().parents[2] / "tests" / "data"


def captures():
    """(name, stream path, oracle) of every committed capture with an oracle."""
    out = []
    for d in sorted(DATA.iterdir()):
        o = d / "oracle.json"
        s = d / "stream" if (d / "stream").exists() else d / "stream.gz"
        if o.exists() and s.exists():
            out.append((d.name, s, json.loads(o.read_text())))
    return out


@pytest.fixture(scope="session")
def data_dir():
    return DATA
