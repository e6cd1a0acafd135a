"""Loaded by Volatility3 from ``vol -p <qmig.vol3.plugin_dir()>``: registers
the qmig layer and its stacker (code in :mod:`qmig.vol3.layer`)."""

from qmig.vol3.layer import QmigLayer, QmigStacker  # noqa: F401
