"""Type stubs of the compiled extension ``qmig._qmig``. Units: bytes."""

from os import PathLike
from typing import Any, BinaryIO, Iterator, List, Optional, Sequence, Tuple, Union

class QmigError(Exception):
    """Base of every qmig error."""

    offset: Optional[int]
    """Byte offset in the QEMU stream where the rule was broken, or None."""
    rule: Optional[str]
    """Short name of the rule broken (``truncated``, ``bad_magic``...)."""

class StreamError(QmigError): ...
class StateError(QmigError): ...
class ContainerError(QmigError): ...
class PhysError(QmigError): ...
class InputError(QmigError): ...

class Block:
    """One RAM block."""

    name: str
    """QEMU's RAMBlock idstr (``pc.ram``, ``mach-virt.ram``, a backend id)."""
    length: int
    """Used length, bytes."""
    page_size: int
    """Page size, bytes (host page size of the block, else target page size)."""
    phys_ranges: List[Tuple[int, int, int]]
    """(guest-physical address, block offset, length) per range, bytes."""

class Record:
    """One item of the stream."""

    offset: int
    """Byte offset in the QEMU stream."""
    length: int
    """Item length, bytes."""
    kind: str
    """header, configuration, section_start/part/end/full, ram_zero, ram_page,
    ram_xbzrle, ram_compressed, ram_mem_size, ram_eos, ram_hook,
    ram_multifd_flush, device_data, footer, command, package_end, vmdesc,
    eof, mapped_ram."""
    block: Optional[str]
    """RAM block of a page record."""
    value: Optional[int]
    """Page records: offset in the block (bytes); sections/footers: section
    id; header: stream version; ram_mem_size: total RAM bytes."""
    detail: Optional[str]
    """Sections: idstr; commands: command name; configuration: machine type."""
    connection: Optional[str]
    """The connection of a capture set read from (``main-1``, ``main-2``,
    ``preempt-1``...; ``offset`` is in that file's stream), None for a single
    stream."""

class Capture:
    """A migration stream read into memory."""

    @property
    def blocks(self) -> List[Block]: ...
    @property
    def machine(self) -> Optional[str]: ...
    @property
    def version(self) -> Optional[int]: ...
    @property
    def page_size(self) -> int:
        """Target page size, bytes."""
    @property
    def containers(self) -> List[str]: ...
    @property
    def layout(self) -> Optional[str]: ...
    @property
    def phys_ranges(self) -> List[Tuple[int, int, str, int]]:
        """(gpa, length, block, block offset) per range, sorted, bytes."""
    @property
    def phys_error(self) -> Optional[str]: ...
    @property
    def vmdesc(self) -> Optional[bytes]: ...
    def read_block(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of block ``name`` from ``offset``.
        KeyError: unknown block; ValueError: past its end."""
    def read_phys(self, gpa: int, size: int, pad: bool = False) -> bytes:
        """``size`` bytes of guest-physical memory from ``gpa``.
        PhysError (rule ``unmapped``) where not RAM unless ``pad``."""
    def records(self) -> Iterator[Record]: ...
    def devices(self) -> Optional[List[Any]]:
        """The vmdesc's device list, or None without a vmdesc."""
    def __len__(self) -> int: ...

def open(
    source: Union[str, PathLike[str], Sequence[Union[str, PathLike[str]]], bytes, bytearray, BinaryIO],
    *,
    preempt: Optional[Sequence[Union[str, PathLike[str]]]] = None,
    multifd: Optional[Sequence[Union[str, PathLike[str]]]] = None,
    max_ram_below_4g: Optional[int] = None,
    machine_layout: Optional[str] = None,
    memory_limit: Optional[int] = None,
) -> Capture:
    """Read a stream, or a capture set: a list of the main connections of a
    postcopy migration paused and recovered (then ``preempt``: its preempt
    channel files, the k-th for the k-th main connection), or one main
    stream with ``multifd`` channel files. See ``qmig.open``."""
