#!/usr/bin/env python3
"""Recording loopback TCP relay for live migrations.

Listens on 127.0.0.1:LISTEN, accepts one connection (the migration source), connects to
127.0.0.1:TARGET (the destination's -incoming port) and copies bytes both ways,
recording source->destination (main stream) into PREFIX.stream and
destination->source (return path) into PREFIX.rp.

Usable as a module (Relay(...).start(); .wait()) or a command:
    relay.py LISTEN_PORT TARGET_PORT PREFIX
"""

import socket
import sys
import threading


class Relay:
    def __init__(self, listen_port, target_port, stream_path, rp_path, timeout=300.0):
        self.target_port = target_port
        self.stream_path = stream_path
        self.rp_path = rp_path
        self.timeout = timeout
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", listen_port))
        self.lsock.listen(1)
        self.port = self.lsock.getsockname()[1]
        self.bytes = {"stream": 0, "rp": 0}
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _pump(self, src, dst, path, key):
        try:
            with open(path, "wb") as rec:
                while True:
                    try:
                        data = src.recv(1 << 16)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    rec.write(data)
                    self.bytes[key] += len(data)
                    try:
                        dst.sendall(data)
                    except OSError as e:
                        # Peer gone: keep draining and recording the other side.
                        self.error = self.error or f"{key}: {e}"
                        break
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _run(self):
        try:
            self.lsock.settimeout(self.timeout)
            a, _ = self.lsock.accept()
            b = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            a.settimeout(None)
            b.settimeout(None)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t1 = threading.Thread(target=self._pump, args=(a, b, self.stream_path, "stream"))
            t2 = threading.Thread(target=self._pump, args=(b, a, self.rp_path, "rp"))
            t1.start()
            t2.start()
            t1.join()
            t2.join()
            a.close()
            b.close()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            self.error = f"relay: {e}"
        finally:
            self.lsock.close()

    def wait(self, timeout=None):
        self.thread.join(timeout)
        return not self.thread.is_alive()



class MultiRelay:
    """A recording relay for migrations made of several connections (postcopy
    recovery, the postcopy-preempt channel), which the caller can cut.

    Every connection accepted on 127.0.0.1:LISTEN is connected to
    127.0.0.1:`target` as it is when the connection arrives (set `target` to the
    destination's `migrate-recover` port before resuming). Connection i (from 1, in
    accept order) is recorded as PREFIX-i.src (source -> destination, only the bytes
    actually handed to the destination) and PREFIX-i.dst (destination -> source).

    `cut()` ends every open connection the way a network failure that is noticed
    would: both directions are shut down (FIN, no RST), so each side reads what it was
    sent, then end of file.
    """

    def __init__(self, target_port, prefix, timeout=300.0):
        self.target = target_port
        self.prefix = prefix
        self.timeout = timeout
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.conns = []  # dicts: n, src, dst, a, b, threads, bytes
        self.error = None
        self.lock = threading.Lock()
        self.arms = []  # (pattern, n) cuts queued by cut_after_pattern
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _pump(self, src, dst, path, c, key):
        with open(path, "wb") as rec:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    break
                if key == "src" and self.arms and c.get("limit") is None:
                    self._watch(c, data)
                lim = c.get("limit") if key == "src" else None
                last = lim is not None and c["bytes"][key] + len(data) >= lim
                if last:
                    data = data[:max(0, lim - c["bytes"][key])]
                try:
                    dst.sendall(data)
                except OSError as e:
                    self.error = self.error or f"conn {c['n']} {key}: {e}"
                    break
                rec.write(data)
                rec.flush()
                c["bytes"][key] += len(data)
                if last:
                    self.cut()
                    break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _accept(self):
        self.lsock.settimeout(0.2)
        while not self.closed:
            try:
                a, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            try:
                b = socket.create_connection(("127.0.0.1", self.target), timeout=30)
            except OSError as e:
                self.error = self.error or f"connect to {self.target}: {e}"
                a.close()
                continue
            for s in (a, b):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                n = len(self.conns) + 1
                c = {"n": n, "a": a, "b": b, "target": self.target,
                     "src": f"{self.prefix}-{n}.src", "dst": f"{self.prefix}-{n}.dst",
                     "bytes": {"src": 0, "dst": 0}}
                c["threads"] = [
                    threading.Thread(target=self._pump, args=(a, b, c["src"], c, "src"),
                                     daemon=True),
                    threading.Thread(target=self._pump, args=(b, a, c["dst"], c, "dst"),
                                     daemon=True)]
                self.conns.append(c)
            for t in c["threads"]:
                t.start()

    def _watch(self, c, data):
        with self.lock:
            if not self.arms:
                return
            pat, n = self.arms[0]
            tail = c.get("tail", b"")
            window = tail + data
            i = window.find(pat)
            if i >= 0:
                self.arms.pop(0)
                c["limit"] = c["bytes"]["src"] - len(tail) + i + len(pat) + n
                c.pop("tail", None)
            else:
                c["tail"] = window[-(len(pat) - 1):] if len(pat) > 1 else b""

    def cut_after_pattern(self, pattern, n):
        """Queue a cut: once `pattern` passes (source -> destination) on any
        connection, every connection is cut `n` bytes after its end. Queued cuts
        are armed one at a time, in order."""
        with self.lock:
            self.arms.append((bytes(pattern), n))

    def cut_after(self, n):
        """Cut every connection once `n` more bytes of the newest connection's
        source -> destination direction have been forwarded (mid-record, say)."""
        with self.lock:
            c = self.conns[-1]
            c["limit"] = c["bytes"]["src"] + n

    def cut(self):
        """Shut down both directions of every open connection."""
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            for s in (c["a"], c["b"]):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def wait(self, timeout=60.0):
        """Wait for every connection's pumps to end; returns whether they did."""
        import time
        deadline = time.monotonic() + timeout
        for c in list(self.conns):
            for t in c["threads"]:
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    return False
        return True

    def close(self):
        self.closed = True
        self.thread.join(5)
        self.lsock.close()
        for c in self.conns:
            for s in (c["a"], c["b"]):
                try:
                    s.close()
                except OSError:
                    pass

if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    r = Relay(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] + ".stream", sys.argv[3] + ".rp")
    print(f"listening on {r.port}", flush=True)
    r.start()
    r.wait()
    print(f"done: {r.bytes} {r.error or ''}")
