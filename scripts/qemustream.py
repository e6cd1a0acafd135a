"""Independent reference reader for QEMU migration streams (RAM part only).

Written from the format description in docs (wire-format.md) and checked against real
QEMU captures; used by capture.py/check_capture.py to cross-check QEMU's own counters
and the oracle digests without depending on the qmig crates. Python stdlib only.

It walks header, configuration, commands (descending into PACKAGED), and the "ram"
live sections, decoding ZERO / PAGE / XBZRLE / COMPRESS_PAGE records onto per-block
images. It stops at the first top-level device (FULL) section or at EOF, because device
state cannot be skipped without the vmdesc; the vmdesc JSON (if any) is located from the
end of the stream.
"""

import gzip
import json
import struct
import zlib

PAGE = 4096          # default target page size; host page size for MEM_SIZE page sizes
MIN_PAGE, MAX_PAGE = 1024, 65536
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
F_XBZRLE, F_HOOK, F_COMPRESS, F_MULTIFD_FLUSH = 0x40, 0x80, 0x100, 0x200
SEC_EOF, SEC_START, SEC_PART, SEC_END, SEC_FULL = 0, 1, 2, 3, 4
SEC_SUB, SEC_VMDESC, SEC_CONFIG, SEC_CMD, SEC_FOOTER = 5, 6, 7, 8, 0x7E
CMD_NAMES = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN",
             5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "PACKAGED", 8: "ENABLE_COLO",
             9: "POSTCOPY_RESUME", 10: "RECV_BITMAP", 11: "SWITCHOVER_START"}
RP_NAMES = {1: "SHUT", 2: "PONG", 3: "REQ_PAGES_ID", 4: "REQ_PAGES", 5: "RECV_BITMAP",
            6: "RESUME_ACK", 7: "SWITCHOVER_ACK"}


class StreamError(Exception):
    pass


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


class Reader:
    def __init__(self, data, pos=0, end=None):
        self.d = data
        self.p = pos
        self.end = len(data) if end is None else end

    def take(self, n):
        if self.p + n > self.end:
            raise StreamError(f"truncated at {self.p} (need {n})")
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def cstr(self):
        return self.take(self.u8()).decode("latin-1")

    def at_end(self):
        return self.p >= self.end


def xbzrle_decode(enc, page):
    """Apply an XBZRLE delta `enc` onto bytearray `page` in place."""
    i = d = 0
    n = len(enc)

    def uleb():
        nonlocal i
        v = shift = 0
        for _ in range(3):
            if i >= n:
                raise StreamError("xbzrle: truncated length")
            b = enc[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return v
        raise StreamError("xbzrle: length too long")

    while i < n:
        zrun = uleb()
        d += zrun
        if i >= n:
            raise StreamError("xbzrle: trailing zrun")
        nz = uleb()
        if nz == 0 or d + nz > len(page) or i + nz > n:
            raise StreamError("xbzrle: bad nzrun")
        page[d:d + nz] = enc[i:i + nz]
        i += nz
        d += nz


class Stream:
    """Parsed view of a migration stream."""

    def __init__(self, data, decode=True, page_size=None):
        """page_size: target page size override (bytes). Without it the page size comes
        from the configuration's target-page-bits, else the vmdesc "page_size", else
        4096 (self.page_size_source says which)."""
        self.data = data
        self.decode = decode
        self.page_size_override = page_size
        self.page_size = None
        self.page_size_source = None
        self.footers = None         # True/False once a live section was read
        self.live = {}              # idstr -> per-section summary of non-RAM live sections
        self.machine = None
        self.config_subsections = []
        self.commands = []          # (name, payload-summary) in order, nested included
        self.sections = []          # (type, id, idstr) in order
        self.blocks = {}            # name -> dict(length, zero, page, xbzrle, compressed)
        self.block_order = []
        self.images = {}            # name -> bytearray
        self.totals = dict(zero=0, page=0, xbzrle=0, compressed=0, eos=0, multifd_flush=0)
        self.discards = []          # (block, start, len)
        self.section_ids = {}       # id -> idstr
        self.stopped_at = None      # reason we stopped walking
        self.vmdesc = None
        self.last_block = None
        self.mem_size_total = None
        self.advise = None          # (page_size_summary, target_page_size) from ADVISE
        self.ram_section_count = 0
        self.parse()

    # -- container ------------------------------------------------------------------
    def parse(self):
        r = Reader(self.data)
        if r.u32() != 0x5145564D:
            raise StreamError("bad magic")
        v = r.u32()
        if v != 3:
            raise StreamError(f"unsupported version {v}")
        # The vmdesc (precopy) ends the stream: find it first, for its page_size.
        self.find_vmdesc(0)
        self.walk(r, top=True)

    def resolve_page_size(self):
        """Target page size, in QEMU's order of authority (see __init__)."""
        if self.page_size is not None:
            return self.page_size
        bits = [p for n, _, p in self.config_subsections
                if n == "configuration/target-page-bits"]
        if self.page_size_override:
            ps, src = self.page_size_override, "override"
        elif bits:
            ps, src = 1 << bits[0], "configuration/target-page-bits"
        elif self.vmdesc is not None and "page_size" in self.vmdesc:
            ps, src = self.vmdesc["page_size"], "vmdesc page_size"
        else:
            ps, src = PAGE, "default 4096"
        if ps < MIN_PAGE or ps > MAX_PAGE or ps & (ps - 1):
            raise StreamError(f"target page size {ps} ({src}) not a power of two in "
                              f"[{MIN_PAGE}, {MAX_PAGE}]")
        self.page_size, self.page_size_source = ps, src
        return ps

    def footer(self, r, sid):
        """Optional section footer (0x7E + be32 id): absent on machine types with
        send-section-footer off. After a live section's payload the next byte is either
        the footer or the next section type (< 0x7E), so this is unambiguous."""
        if r.p < r.end and r.d[r.p] == SEC_FOOTER:
            r.u8()
            got = r.u32()
            if got != sid:
                raise StreamError(f"section footer for {got} after section {sid} at {r.p - 5}")
            has = True
        else:
            has = False
        if self.footers is not None and self.footers != has:
            raise StreamError(f"footers on some sections but not others (at {r.p})")
        self.footers = has

    def walk(self, r, top):
        while not r.at_end():
            start = r.p
            t = r.u8()
            if t == SEC_CONFIG:
                n = r.u32()
                self.machine = r.take(n).decode()
                while r.p < r.end and r.d[r.p] == SEC_SUB:
                    r.u8()
                    name = r.cstr()
                    ver = r.u32()
                    if name == "configuration/target-page-bits":
                        payload = r.u32()
                    elif name == "configuration/capabilities":
                        payload = [r.cstr() for _ in range(r.u32())]
                    elif name == "configuration/uuid":
                        payload = r.take(16).hex()
                    else:
                        raise StreamError(f"unknown config subsection {name}")
                    self.config_subsections.append((name, ver, payload))
            elif t == SEC_CMD:
                self.command(r)
            elif t in (SEC_START, SEC_PART, SEC_END):
                sid = r.u32()
                if t == SEC_START:
                    idstr = r.cstr()
                    inst = r.u32()
                    ver = r.u32()
                    self.section_ids[sid] = (idstr, inst, ver)
                idstr = self.section_ids.get(sid, ("?",))[0]
                self.sections.append((t, sid, idstr))
                if idstr == "ram":
                    self.ram_section(r, t == SEC_START)
                elif idstr in LIVE_DECODERS:
                    LIVE_DECODERS[idstr](self, r, t)
                else:
                    raise StreamError(f"live section {idstr!r} not supported at {start}")
                self.footer(r, sid)
            elif t == SEC_FULL:
                sid = r.u32()
                idstr = r.cstr()
                self.sections.append((t, sid, idstr))
                # Device state cannot be skipped without vmdesc: stop here.
                self.stopped_at = ("full", start, idstr)
                if top:
                    return
                r.p = r.end
                return
            elif t == SEC_EOF:
                self.stopped_at = ("eof", start)
                self.eof_pos = start
                return
            else:
                raise StreamError(f"unexpected section type {t:#x} at {start}")

    def command(self, r):
        cmd = r.u16()
        ln = r.u16()
        name = CMD_NAMES.get(cmd, f"CMD{cmd}")
        if cmd == 7:
            n = struct.unpack(">I", r.take(ln))[0]
            self.commands.append((name, n))
            sub = Reader(r.d, r.p, r.p + n)
            r.p += n
            self.walk(sub, top=False)
            return
        payload = r.take(ln)
        if cmd == 2:
            self.commands.append((name, struct.unpack(">I", payload)[0]))
        elif cmd == 3:
            if ln == 16:
                self.advise = struct.unpack(">QQ", payload)
            self.commands.append((name, list(self.advise) if ln == 16 else []))
        elif cmd == 6:
            pr = Reader(payload)
            if pr.u8() != 0:
                raise StreamError("discard version")
            blk = pr.cstr()
            if pr.u8() != 0:
                raise StreamError("discard trailer")
            ranges = []
            while not pr.at_end():
                s, l = pr.u64(), pr.u64()
                ranges.append((s, l))
                self.discards.append((blk, s, l))
                if self.decode and blk in self.images:
                    self.images[blk][s:s + l] = bytes(l)
            self.commands.append((name, [blk, len(ranges)]))
        else:
            self.commands.append((name, payload.hex() if payload else None))

    # -- RAM ------------------------------------------------------------------------
    def capabilities(self):
        """Capabilities listed in the configuration section (QEMU sends the subsection
        only when one of them, e.g. x-ignore-shared, is on)."""
        for name, _, payload in self.config_subsections:
            if name == "configuration/capabilities":
                return payload
        return []

    def ignore_shared(self):
        return "x-ignore-shared" in self.capabilities()

    def block_page_size(self, r):
        """Optional be64 page size after a MEM_SIZE block's length.

        The source writes it when postcopy-ram is on (so POSTCOPY_ADVISE came first) and
        the block's page size differs from the host page size (4096 here). The stream
        does not say which blocks those are (ADVISE only carries the OR of all page
        sizes), so peek: a power of two above 4096 cannot be the next thing otherwise
        (a block name starts with a non-zero length byte; a record header never has
        all flag bits clear). It must also be one of the sizes in the ADVISE summary.
        Caveat: with x-ignore-shared too, a guest address follows (or replaces) it and a
        power-of-two address would be mistaken for a page size; no capture combines them.
        """
        if self.advise is None or r.p + 8 > r.end:
            return None
        v = struct.unpack(">Q", r.d[r.p:r.p + 8])[0]
        if v <= PAGE or v & (v - 1) or v >= 1 << 40:
            return None
        if not self.advise[0] & v:
            raise StreamError(f"MEM_SIZE page size {v:#x} not in ADVISE summary "
                              f"{self.advise[0]:#x}")
        r.p += 8
        return v

    def ram_section(self, r, is_start):
        self.ram_section_count += 1
        PAGE = self.resolve_page_size()  # noqa: N806 - the target page size here
        while True:
            hdr = r.u64()
            flags = hdr & (PAGE - 1)
            addr = hdr & ~(PAGE - 1)
            if flags & F_MEM_SIZE:
                self.mem_size_total = addr
                got = 0
                while got < addr:
                    name = r.cstr()
                    length = r.u64()
                    self.blocks[name] = dict(name=name, length=length, zero=0, page=0,
                                             xbzrle=0, compressed=0)
                    ps = self.block_page_size(r)
                    if ps is not None:
                        self.blocks[name]["page_size"] = ps
                    if self.ignore_shared():
                        # x-ignore-shared: be64 guest address (the block's mr->addr),
                        # after the optional page size (QEMU ram_save_setup order).
                        self.blocks[name]["addr"] = r.u64()
                    self.block_order.append(name)
                    if self.decode:
                        self.images[name] = bytearray(length)
                    got += length
                if got != addr:
                    raise StreamError("MEM_SIZE lengths do not add up")
                flags &= ~F_MEM_SIZE
                if flags:
                    raise StreamError(f"MEM_SIZE with flags {flags:#x}")
                continue
            if flags & F_EOS:
                self.totals["eos"] += 1
                if flags & ~F_EOS:
                    raise StreamError(f"EOS with flags {flags:#x}")
                return
            if flags == F_MULTIFD_FLUSH:
                self.totals["multifd_flush"] += 1
                continue
            kind = flags & ~F_CONTINUE
            if kind not in (F_ZERO, F_PAGE, F_XBZRLE, F_COMPRESS):
                raise StreamError(f"unsupported RAM flags {flags:#x} at {r.p - 8}")
            if flags & F_CONTINUE:
                if self.last_block is None:
                    raise StreamError("CONTINUE without block")
                blk = self.last_block
            else:
                blk = r.cstr()
                if blk not in self.blocks:
                    raise StreamError(f"unknown block {blk}")
                self.last_block = blk
            b = self.blocks[blk]
            if addr + PAGE > b["length"]:
                raise StreamError(f"page {addr:#x} beyond {blk}")
            img = self.images.get(blk)
            if kind == F_ZERO:
                fill = r.u8()
                if fill != 0:
                    raise StreamError("non-zero fill")
                b["zero"] += 1
                self.totals["zero"] += 1
                if self.decode:
                    img[addr:addr + PAGE] = bytes(PAGE)
            elif kind == F_PAGE:
                data = r.take(PAGE)
                b["page"] += 1
                self.totals["page"] += 1
                if self.decode:
                    img[addr:addr + PAGE] = data
            elif kind == F_XBZRLE:
                if r.u8() != 1:
                    raise StreamError("bad xbzrle marker")
                n = r.u16()
                if n > PAGE:
                    raise StreamError("xbzrle too long")
                enc = r.take(n)
                b["xbzrle"] += 1
                self.totals["xbzrle"] += 1
                if self.decode:
                    page = bytearray(img[addr:addr + PAGE])
                    xbzrle_decode(enc, page)
                    img[addr:addr + PAGE] = page
            else:
                n = r.u32()
                comp = r.take(n)
                b["compressed"] += 1
                self.totals["compressed"] += 1
                if self.decode:
                    page = zlib.decompress(comp)
                    if len(page) != PAGE:
                        raise StreamError("compressed page size")
                    img[addr:addr + PAGE] = page

    def find_vmdesc(self, lo):
        """Locate `0x06 be32 len JSON` ending exactly at the end of the stream."""
        d = self.data
        i = d.rfind(b"\x06", lo, len(d) - 5)
        while i >= lo:
            n = struct.unpack(">I", d[i + 1:i + 5])[0]
            if i + 5 + n == len(d) and d[i + 5:i + 6] == b"{" and d[i - 1] == SEC_EOF:
                try:
                    self.vmdesc = json.loads(d[i + 5:])
                    self.vmdesc_pos = i
                    return
                except ValueError:
                    pass
            i = d.rfind(b"\x06", lo, i)

    def summary(self):
        return {
            "machine": self.machine,
            "config_subsections": self.config_subsections,
            "mem_size_total": self.mem_size_total,
            "page_size": self.page_size,
            "page_size_source": self.page_size_source,
            "footers": self.footers,
            "live_sections": {v[0]: {"section_id": k, "instance_id": v[1], "version": v[2]}
                              for k, v in self.section_ids.items()},
            "other_live": self.live,
            "ignore_shared": self.ignore_shared(),
            "mem_size_addrs": ({n: self.blocks[n]["addr"] for n in self.block_order}
                               if self.ignore_shared() else None),
            "postcopy_advise": None if self.advise is None else list(self.advise),
            "blocks": [self.blocks[n] for n in self.block_order],
            "totals": self.totals,
            "ram_sections": self.ram_section_count,
            "commands": self.commands,
            "discard_ranges": len(self.discards),
            "stopped_at": self.stopped_at,
            "vmdesc": None if self.vmdesc is None else {
                "keys": list(self.vmdesc),
                "page_size": self.vmdesc.get("page_size"),
                "devices": len(self.vmdesc.get("devices", []))},
            "size": len(self.data),
        }


def _live_summary(st, idstr, t, start, end):
    d = st.live.setdefault(idstr, {"sections": 0, "payload_bytes": 0, "first_payloads": []})
    d["sections"] += 1
    d["payload_bytes"] += end - start
    if len(d["first_payloads"]) < 4:
        d["first_payloads"].append({"type": {1: "START", 2: "PART", 3: "END"}[t],
                                    "hex": st.data[start:min(end, start + 48)].hex()})
    return d


def decode_spapr_htab(st, r, t):
    """ppc64 pseries hash page table (QEMU hw/ppc/spapr.c htab_save_*): be32 header;
    START: the header is htab_shift (log2 of the HPT size in bytes), or 0xFFFFFFFF when
    there is no HPT, and nothing follows. PART/END: header 0, then chunks of be32 index,
    be16 n_valid, be16 n_invalid, n_valid 16-byte HPTEs, ended by an all-zero chunk
    header; or header 0xFFFFFFFF alone (no HPT)."""
    start = r.p
    hdr = r.u32()
    chunks = valid = invalid = 0
    if t != SEC_START and hdr != 0xFFFFFFFF:
        if hdr != 0:
            raise StreamError(f"spapr/htab: iteration header {hdr:#x} at {start}")
        while True:
            index, nv, ni = r.u32(), r.u16(), r.u16()
            if index == 0 and nv == 0 and ni == 0:
                break
            r.take(16 * nv)
            chunks += 1
            valid += nv
            invalid += ni
    d = _live_summary(st, "spapr/htab", t, start, r.p)
    if t == SEC_START:
        d["htab_shift"] = hdr
    for k, v in (("chunks", chunks), ("valid_hptes", valid), ("invalid_hptes", invalid)):
        d[k] = d.get(k, 0) + v


def decode_s390_stattrib(st, r, t):
    """s390x storage attributes (CMMA; QEMU hw/s390x/s390-stattrib.c): be64 words whose
    bits below the target page size are flags, above it a guest address: MORE (0x2) is
    followed by be64 count and count attribute bytes (one per page from the address);
    ERROR (0x4) is a failed source; DONE (0x8) marks the final state; EOS (0x1) ends the
    section's payload."""
    start = r.p
    ps = st.resolve_page_size()
    words = attrs = 0
    while True:
        v = r.u64()
        words += 1
        flags = v & (ps - 1)
        if flags & 0x4:
            raise StreamError(f"s390-storage_attributes: ERROR flag at {r.p - 8}")
        if flags & ~0xF:
            raise StreamError(f"s390-storage_attributes: flags {flags:#x} at {r.p - 8}")
        if flags & 0x2:
            n = r.u64()
            r.take(n)
            attrs += n
        if flags & 0x1:
            break
    d = _live_summary(st, "s390-storage_attributes", t, start, r.p)
    d["words"] = d.get("words", 0) + words
    d["attribute_bytes"] = d.get("attribute_bytes", 0) + attrs


# Decoders of non-RAM iterative sections, by idstr: fn(stream, reader, section_type)
# consumes exactly the section's payload (up to, not including, the optional footer).
LIVE_DECODERS = {"spapr/htab": decode_spapr_htab,
                 "s390-storage_attributes": decode_s390_stattrib}


def parse_return_path(data):
    """Decode a recorded return path into a list of (name, value) messages."""
    r = Reader(data)
    out = []
    cur = None
    while not r.at_end():
        t = r.u16()
        ln = r.u16()
        p = Reader(r.take(ln))
        name = RP_NAMES.get(t, f"RP{t}")
        if t in (1, 2, 6):
            out.append((name, p.u32()))
        elif t == 3:
            start, l = p.u64(), p.u32()
            cur = p.cstr()
            out.append((name, [cur, start, l]))
        elif t == 4:
            out.append((name, [cur, p.u64(), p.u32()]))
        elif t == 5:
            blk = p.cstr()
            size = r.u64()
            r.take(size)
            if r.u64() != 0x0123456789ABCDEF:
                raise StreamError("bad bitmap end mark")
            out.append((name, [blk, size]))
        else:
            out.append((name, p.take(ln).hex() if ln else None))
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="summarise a QEMU migration stream")
    ap.add_argument("stream")
    ap.add_argument("--rp", help="recorded return path")
    ap.add_argument("--extract", help="write block images into this directory")
    ap.add_argument("--page-size", type=int, help="target page size override (bytes)")
    a = ap.parse_args()
    s = Stream(load(a.stream), decode=bool(a.extract), page_size=a.page_size)
    out = s.summary()
    if a.rp:
        msgs = parse_return_path(load(a.rp))
        counts = {}
        for m, _ in msgs:
            counts[m] = counts.get(m, 0) + 1
        out["return_path"] = {"counts": counts, "first": msgs[:8], "last": msgs[-4:]}
    if a.extract:
        import os
        os.makedirs(a.extract, exist_ok=True)
        man = []
        for n in s.block_order:
            fn = n.replace("/", "_").lstrip("_") + ".img"
            with open(os.path.join(a.extract, fn), "wb") as f:
                f.write(s.images[n])
            man.append({"name": n, "file": fn, "length": s.blocks[n]["length"]})
        with open(os.path.join(a.extract, "manifest.json"), "w") as f:
            json.dump({"blocks": man}, f, indent=1)
    print(json.dumps(out, indent=1))
