"""qmig: read QEMU live-migration streams from Python.

``qmig.open(source)`` reads a whole stream -- a plain capture, a whole-file
gzip/bzip2/xz/zstd compressed one, a libvirt save image (``virsh save``) --
through the same destination state machine as ``qmig extract``, and returns a
:class:`Capture` holding the final content of every RAM block. Capture sets
read as the CLI reads them: ``qmig.open([main1, main2], preempt=[p1, p2])``
(a postcopy migration paused and recovered, with its preempt channels) and
``qmig.open(main, multifd=[conn1, conn2])`` (a multifd migration's channels).

Units: every offset, length, size and address is in bytes.

Errors are :class:`QmigError` subclasses with ``.offset`` (byte offset in the
QEMU stream, or None) and ``.rule`` (the rule broken, e.g. ``truncated``,
``bad_magic``, ``unknown_block``):

- :class:`StreamError`: the stream does not parse;
- :class:`StateError`: RAM records break the destination's rules;
- :class:`ContainerError`: the compression or libvirt container is corrupt;
- :class:`PhysError`: no guest-physical layout, or an address that is not RAM;
- :class:`InputError`: the input could not be read.
"""

from __future__ import annotations

import json as _json
import os as _os
from typing import Any, BinaryIO, Optional, Sequence, Union

from . import _qmig
from ._qmig import (  # noqa: F401
    Block,
    Capture,
    ContainerError,
    InputError,
    PhysError,
    QmigError,
    Record,
    StateError,
    StreamError,
)

__all__ = [
    "open",
    "devices",
    "Block",
    "Capture",
    "Record",
    "QmigError",
    "StreamError",
    "StateError",
    "ContainerError",
    "PhysError",
    "InputError",
]

for _cls in (QmigError, StreamError, StateError, ContainerError, PhysError, InputError):
    # Defaults for instances raised without them.
    _cls.offset = None
    _cls.rule = None


_Path = Union[str, "_os.PathLike[str]"]


def open(
    source: Union[_Path, Sequence[_Path], bytes, bytearray, BinaryIO],
    *,
    preempt: Optional[Sequence[_Path]] = None,
    multifd: Optional[Sequence[_Path]] = None,
    max_ram_below_4g: Optional[int] = None,
    machine_layout: Optional[str] = None,
    memory_limit: Optional[int] = None,
) -> Capture:
    """Read a QEMU migration stream into memory.

    :param source: a path (str or path-like), the stream's bytes, or a
        binary file object (anything with ``read(n)``: pipes, sockets'
        makefile, ``io.BytesIO``). Containers (gzip, bzip2, xz, zstd,
        libvirt save images) are recognised by magic. A list (or tuple) of
        paths is the connections of one postcopy migration that was paused
        and recovered, in order: the first main connection (QEVM header),
        then each recovery connection (``migrate-recover``), each read as
        the continuation of the one before, which must have been cut after
        POSTCOPY_RUN (as ``qmig extract MAIN1 MAIN2...``). The recovery
        handshake (RECV_BITMAP, POSTCOPY_RESUME) is checked and listed in
        ``records()``, not applied. A list of one path is that stream.
    :param preempt: postcopy-preempt channel files (``postcopy-preempt``
        capability): the k-th belongs to the k-th main connection (as
        ``--preempt-channel``). At most one per main connection.
    :param multifd: multifd channel files recorded with a single main
        stream (as ``--multifd-channel``), in any order (channels are told
        apart by their header); their packets are applied at the main
        stream's sync points. Not with a list of several connections or
        ``preempt`` (ValueError).
    :param max_ram_below_4g: the guest's ``max-ram-below-4g`` machine option
        in bytes (x86 pc/q35; the stream does not carry it).
    :param machine_layout: ``pc``, ``pc-legacy``, ``q35``, ``microvm``,
        ``virt`` or ``flat``, optionally with the machine's RAM blocks in
        address order (``"q35:m0,m1"``), instead of the stream's machine type.
    :param memory_limit: the most RAM-block bytes to hold (default: this
        machine's total memory); a stream declaring more raises StateError.
    :raises QmigError: see the module docstring; in a capture set the
        message names the file and ``.offset`` is in that file's stream
        (for a multifd channel: in that channel, 0 = its header's first byte).
    """
    return _qmig.open(
        list(source) if isinstance(source, (list, tuple)) else source,
        preempt=None if preempt is None else list(preempt),
        multifd=None if multifd is None else list(multifd),
        max_ram_below_4g=max_ram_below_4g,
        machine_layout=machine_layout,
        memory_limit=memory_limit,
    )


def devices(capture: Capture) -> Optional[list]:
    """Same as ``capture.devices()``."""
    return capture.devices()
