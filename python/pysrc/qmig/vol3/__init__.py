"""Volatility3 support: a physical-memory layer over qmig and its stacker.

Pass :func:`plugin_dir` to ``vol -p``; the stacker then opens every stream
qmig reads (QEMU 7.2 to 10 precopy, postcopy, XBZRLE, compressed, multi-pass,
x-ignore-shared, aarch64, libvirt save images, whole-file compression) and
puts a :class:`qmig.vol3.layer.QmigLayer` (guest-physical memory) below the
OS automagic, ahead of Volatility3's built-in QEMU layer::

    vol -f guest.sav -p "$(python -c 'import qmig.vol3; print(qmig.vol3.plugin_dir())')" layerwriter
"""

import os


def plugin_dir() -> str:
    """The directory to pass to ``vol -p`` (str, absolute path)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")
