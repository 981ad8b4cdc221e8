"""A local relay that speaks bore's protocol (github.com/ekzhang/bore, src/server.rs and
src/auth.rs), so the pure-Python bore client is tested without the internet.

Control connections carry null-delimited JSON. A client says {"Hello": port} and is
told {"Hello": public_port}; each visitor of the public port is announced with
{"Connection": uuid}; the client answers on a new control connection with
{"Accept": uuid} and the relay splices the two. With a secret, each control
connection starts with {"Challenge": uuid} and must answer {"Authenticate": hmac}.
As bore's server does, it grants a requested public port when it is free, and closes a
client's public port when that client's control connection closes (its process killed: the
port is free for another client, a standby host, to ask for). `drop_controls()`
closes every control connection (a relay restart, a network drop); ports in `taken`
are refused (someone else got the port meanwhile).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import uuid

from distllm import _pump  # a plain byte copy; the protocol around it is what this relay implements
from netem import close_pairs


class BoreRelay:
    def __init__(self, secret: str | None = None):
        self.secret = secret
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.control_port = self.listener.getsockname()[1]
        self.pending: dict[str, socket.socket] = {}
        self.visitors = 0
        self.refused = 0
        self.taken: set[int] = set()
        self.hellos: list[int] = []  # the public port granted to each Hello, in order
        self._controls: list[tuple[socket.socket, socket.socket]] = []  # (control connection, its public port)
        self._splices: list[tuple[socket.socket, socket.socket]] = []  # (visitor, client) connections joined
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def drop_controls(self) -> None:
        """Close every client's control connection, its public port and the connections it carried, as a
        relay restart would."""
        with self._lock:
            controls, self._controls = self._controls + self._splices, []
            self._splices = []
        close_pairs(controls)

    @staticmethod
    def _free_when_closed(conn: socket.socket, public: socket.socket) -> None:
        """A client says nothing on its control connection after Hello: it closed (its process died, or it
        moved) when a read ends. bore's server learns it when its next heartbeat fails, and frees the port."""
        try:
            while conn.recv(256):
                pass
        except OSError:
            pass
        close_pairs([(public, conn)])  # (shut first: a bare close leaves a blocked accept() listening)

    @staticmethod
    def _send(sock, message) -> None:
        sock.sendall(json.dumps(message).encode() + b"\0")

    @staticmethod
    def _recv(sock, buffer: bytearray):
        while b"\0" not in buffer:
            chunk = sock.recv(256)
            if not chunk:
                return None
            buffer += chunk
        frame, _, rest = bytes(buffer).partition(b"\0")
        buffer[:] = rest
        return json.loads(frame)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._control, args=(conn,), daemon=True).start()

    def _control(self, conn: socket.socket) -> None:
        buffer = bytearray()
        if self.secret is not None:
            challenge = uuid.uuid4()
            self._send(conn, {"Challenge": str(challenge)})
            reply = self._recv(conn, buffer)
            key = hashlib.sha256(self.secret.encode()).digest()
            want = hmac.new(key, challenge.bytes, hashlib.sha256).hexdigest()
            if not (isinstance(reply, dict) and hmac.compare_digest(str(reply.get("Authenticate")), want)):
                self.refused += 1
                self._send(conn, {"Error": "invalid secret"})
                conn.close()
                return
        message = self._recv(conn, buffer)
        if isinstance(message, dict) and "Hello" in message:
            asked = message["Hello"] if isinstance(message["Hello"], int) else 0
            try:
                if asked in self.taken:
                    raise OSError("taken")
                public = socket.create_server(("127.0.0.1", asked))
            except OSError:
                self._send(conn, {"Error": f"port {asked} already in use"})
                conn.close()
                return
            with self._lock:
                self._controls.append((conn, public))
                self.hellos.append(public.getsockname()[1])
            self._send(conn, {"Hello": public.getsockname()[1]})
            threading.Thread(target=self._free_when_closed, args=(conn, public), daemon=True).start()
            while True:
                try:
                    visitor, _ = public.accept()
                except OSError:
                    return
                self.visitors += 1
                connection_id = str(uuid.uuid4())
                with self._lock:
                    self.pending[connection_id] = visitor
                self._send(conn, {"Connection": connection_id})
        elif isinstance(message, dict) and "Accept" in message:
            with self._lock:
                visitor = self.pending.pop(message["Accept"], None)
            if visitor is None:
                conn.close()
                return
            with self._lock:
                self._splices.append((visitor, conn))
            if buffer:
                visitor.sendall(bytes(buffer))
            threading.Thread(target=_pump, args=(visitor, conn), daemon=True).start()
            _pump(conn, visitor)
