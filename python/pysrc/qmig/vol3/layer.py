"""A Volatility3 data layer holding guest-physical memory read by qmig.

Addresses are guest-physical (bytes). ``is_valid`` is true on RAM only (the
ranges of ``Capture.phys_ranges``); ``read`` returns zeros for what is not
RAM (holes, the gap below 4 GiB), as a raw physical dump does, because
Volatility3 scans data layers as hole-free.
"""

from __future__ import annotations

import logging
import sys
import urllib.parse
import urllib.request
from typing import Dict, List, Optional, Tuple

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.configuration import requirements

import qmig

vollog = logging.getLogger(__name__)

# Magic bytes of the inputs qmig reads (QEMU stream, libvirt save image,
# whole-file gzip, bzip2, xz, zstd).
_MAGICS = (
    b"QEVM",
    b"LibvirtQemudSave",
    b"LibvirtQemudPart",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ\x00",
    b"\x28\xb5\x2f\xfd",
)

# Captures opened by the stacker, by layer name, handed to the layer.
_OPENED: Dict[str, "qmig.Capture"] = {}


def _report(msg: str) -> None:
    """An error the user must see (Volatility3 hides stacker exceptions
    below -vvv): logged as an error and written to stderr."""
    vollog.error(msg)
    if not any(
        isinstance(h, logging.StreamHandler) and h.level <= logging.ERROR
        for h in logging.getLogger().handlers
    ):
        print(f"qmig: {msg}", file=sys.stderr)


def _location_path(layer: interfaces.layers.DataLayerInterface) -> Optional[str]:
    """The local path of a file layer's ``file://`` location, if any."""
    loc = getattr(layer, "location", None) or layer.config.get("location")
    if not isinstance(loc, str):
        return None
    u = urllib.parse.urlparse(loc)
    if u.scheme == "file":
        return urllib.request.url2pathname(u.path)
    if u.scheme == "":
        return loc
    return None


def _read_all(layer: interfaces.layers.DataLayerInterface) -> bytes:
    return layer.read(layer.minimum_address, layer.maximum_address - layer.minimum_address + 1, pad=True)


class QmigLayer(interfaces.layers.DataLayerInterface):
    """Guest-physical memory of a QEMU migration stream, read by qmig."""

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: Optional[Dict] = None,
    ) -> None:
        super().__init__(context, config_path, name, metadata)
        self._base_layer = self.config["base_layer"]
        cap = _OPENED.pop(name, None)
        if cap is None:
            base = context.layers[self._base_layer]
            path = _location_path(base)
            cap = qmig.open(path if path else _read_all(base))
        self._capture = cap
        ranges: List[Tuple[int, int]] = [(g, g + n) for (g, n, _b, _o) in cap.phys_ranges]
        if not ranges:
            raise exceptions.LayerException(
                name, f"qmig: no guest-physical layout: {cap.phys_error}"
            )
        self._ranges = ranges
        self._max = ranges[-1][1] - 1

    @property
    def capture(self) -> "qmig.Capture":
        """The qmig capture behind this layer."""
        return self._capture

    @property
    def maximum_address(self) -> int:
        return self._max

    @property
    def minimum_address(self) -> int:
        return 0

    def is_valid(self, offset: int, length: int = 1) -> bool:
        """Whether ``[offset, offset + length)`` is all RAM."""
        end = offset + length
        at = offset
        for s, e in self._ranges:
            if e <= at:
                continue
            if s > at:
                return False
            at = e
            if at >= end:
                return True
        return at >= end

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        """``length`` bytes from guest-physical ``offset``; what is not RAM
        reads as zero. Beyond the highest RAM address: InvalidAddressException
        unless ``pad``."""
        if offset < 0 or length < 0:
            raise exceptions.InvalidAddressException(self.name, offset, "negative address or length")
        if offset + length - 1 > self._max and not pad:
            raise exceptions.InvalidAddressException(
                self.name, max(offset, self._max + 1), "address beyond guest RAM"
            )
        return self._capture.read_phys(offset, length, pad=True)

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "qmig layers are read-only")

    @property
    def dependencies(self) -> List[str]:
        return [self._base_layer]

    @classmethod
    def get_requirements(cls) -> List[interfaces.configuration.RequirementInterface]:
        return [
            requirements.TranslationLayerRequirement(
                name="base_layer", optional=False, description="The file holding the stream"
            )
        ]


class QmigStacker(interfaces.automagic.StackerLayerInterface):
    """Stacks a :class:`QmigLayer` on a file holding a QEMU migration stream,
    before the built-in QEMU layer (stack_order 10)."""

    stack_order = 5

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> Optional[interfaces.layers.DataLayerInterface]:
        base = context.layers[layer_name]
        try:
            head = base.read(base.minimum_address, 16, pad=True)
        except exceptions.InvalidAddressException:
            return None
        if not head.startswith(_MAGICS):
            return None
        ours = head.startswith((b"QEVM", b"LibvirtQemud"))
        path = _location_path(base)
        try:
            cap = qmig.open(path if path else _read_all(base))
        except qmig.QmigError as e:
            if not ours and e.offset in (0, None) and e.rule in ("bad_magic", None):
                # A compressed file that is not a QEMU stream.
                return None
            _report(f"cannot read {path or layer_name} as a QEMU migration stream: {e} (rule {e.rule}, offset {e.offset})")
            return None
        if not cap.phys_ranges:
            _report(
                f"{path or layer_name}: QEMU stream read, but no guest-physical layout: {cap.phys_error}"
            )
            return None
        new_name = context.layers.free_layer_name("QmigLayer")
        context.config[interfaces.configuration.path_join(new_name, "base_layer")] = layer_name
        _OPENED[new_name] = cap
        return QmigLayer(context, new_name, new_name)
