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


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    r = Relay(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] + ".stream", sys.argv[3] + ".rp")
    print(f"listening on {r.port}", flush=True)
    r.start()
    r.wait()
    print(f"done: {r.bytes} {r.error or ''}")
