"""Real local upstreams for the tests: an aiohttp server over HTTP and HTTPS (a certificate
made here, for localhost and 127.0.0.1), in its own thread with its own event loop, so the
tests' loop and midcall's threads meet it over real sockets."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import threading
from pathlib import Path
from typing import Dict, List

import pytest

try:
    from aiohttp import web
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("the Python tests need aiohttp: pip install './python[test]'") from e
try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
except ImportError as e:  # pragma: no cover
    raise ImportError("the Python tests need cryptography: pip install './python[test]'") from e


def make_cert(dir: Path):
    """A self-signed certificate for localhost / 127.0.0.1; returns (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = dir / "cert.pem"
    key_pem = dir / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_pem, key_pem


class Upstream:
    """The CRM the agent calls. Every request is counted by path; a few routes misbehave on
    purpose (hang, slow, echo the credentials in an error)."""

    def __init__(self) -> None:
        self.hits: Dict[str, int] = {}
        self.bodies: List[dict] = []
        self.lock = threading.Lock()
        self.posted = threading.Event()  # a POST /book arrived
        self.hang_started = threading.Event()
        self.hang_closed = threading.Event()  # the client closed a hung request
        self.book_delay = 0.0
        self.http_port = 0
        self.https_port = 0
        self.cert_pem: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits.get(path, 0)

    def _hit(self, path: str) -> None:
        with self.lock:
            self.hits[path] = self.hits.get(path, 0) + 1

    def app(self) -> web.Application:
        async def customer(req: web.Request) -> web.Response:
            self._hit("/customer")
            phone = req.query.get("phone", "")
            return web.json_response(
                {"data": {"customer": {"id": "cus_1", "name": "Dana Reyes", "phone": phone}}}
            )

        async def item(req: web.Request) -> web.Response:
            self._hit("/item")
            return web.json_response({"n": int(req.query.get("n", "0"))})

        async def slow(req: web.Request) -> web.Response:
            self._hit("/slow")
            await asyncio.sleep(int(req.query.get("ms", "300")) / 1000)
            return web.json_response({"done": True})

        async def hang(req: web.Request) -> web.Response:
            self._hit("/hang")
            self.hang_started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the client closes the connection.
                self.hang_closed.set()
                raise
            return web.json_response({})

        async def book(req: web.Request) -> web.Response:
            self._hit("/book")
            body = await req.json()
            with self.lock:
                self.bodies.append(body)
                n = len(self.bodies)
            self.posted.set()
            if self.book_delay:
                await asyncio.sleep(self.book_delay)
            return web.json_response({"id": f"apt_{n}", "status": "booked"})

        async def leak(req: web.Request) -> web.Response:
            self._hit("/leak")
            auth = req.headers.get("Authorization", "")
            return web.json_response({"error": f"bad token {auth}"}, status=500)

        app = web.Application()
        app.router.add_get("/customer", customer)
        app.router.add_get("/item", item)
        app.router.add_get("/slow", slow)
        app.router.add_get("/hang", hang)
        app.router.add_post("/book", book)
        app.router.add_get("/leak", leak)
        return app

    def start(self, tmp: Path) -> None:
        self.cert_pem, key_pem = make_cert(tmp)
        ready = threading.Event()
        errors: List[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
                await runner.setup()
                plain = web.TCPSite(runner, "127.0.0.1", 0)
                await plain.start()
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ctx.load_cert_chain(str(self.cert_pem), str(key_pem))
                tls = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
                await tls.start()
                self.http_port = plain._server.sockets[0].getsockname()[1]
                self.https_port = tls._server.sockets[0].getsockname()[1]
                self._runner = runner

            try:
                loop.run_until_complete(boot())
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the test upstream did not start within 10 s")
        if errors:
            raise errors[0]

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    u = Upstream()
    u.start(tmp_path_factory.mktemp("upstream"))
    yield u
    u.stop()


AGENT = """
[agent]
id = "py-test"
tenant = "acme"

[egress]
allow_http = true

[[actions]]
name = "lookup_customer"
description = "Look up the caller"
url = "https://localhost:{https}/customer?phone={{{{call.from_number}}}}"
headers = {{ Authorization = "Bearer {{{{secrets.CRM_TOKEN}}}}" }}
timeout_ms = 2000
cache = {{ ttl_s = 300, scope = "tenant" }}
extract = {{ "customer.name" = "$.data.customer.name", "customer.id" = "$.data.customer.id" }}
on_failure = {{ say = "I can't reach your account right now." }}

[[actions]]
name = "get_item"
description = "An item by number"
url = "http://127.0.0.1:{http}/item?n={{{{args.n}}}}"
parameters = {{ type = "object", required = ["n"], properties = {{ n = {{ type = "integer" }} }} }}
timeout_ms = 5000
extract = {{ "item.n" = "$.n" }}

[[actions]]
name = "slow_report"
description = "A slow report"
url = "https://localhost:{https}/slow?ms={{{{args.ms}}}}"
parameters = {{ type = "object", required = ["ms"], properties = {{ ms = {{ type = "integer" }} }} }}
timeout_ms = 3000
filler = {{ after_ms = 100, say = "One moment please." }}
extract = {{ "report.done" = "$.done" }}

[[actions]]
name = "hang"
description = "Never answers"
url = "https://localhost:{https}/hang"
timeout_ms = 5000
on_failure = {{ say = "The system is slow today; let me take a note instead." }}

[[actions]]
name = "book"
description = "Book a slot"
method = "POST"
url = "https://localhost:{https}/book"
parameters = {{ type = "object", required = ["slot"], properties = {{ slot = {{ type = "string" }} }} }}
body = {{ slot = "{{{{args.slot}}}}", call_id = "{{{{call.id}}}}" }}
timeout_ms = 5000
extract = {{ "appointment.id" = "$.id" }}
on_failure = {{ say = "I couldn't book that." }}

[[actions]]
name = "book_held"
description = "Book a slot once the agent has finished speaking"
method = "POST"
url = "https://localhost:{https}/book"
parameters = {{ type = "object", required = ["slot"], properties = {{ slot = {{ type = "string" }} }} }}
body = {{ slot = "{{{{args.slot}}}}", held = true }}
hold = "end_of_turn"
timeout_ms = 5000
extract = {{ "held.id" = "$.id" }}

[[actions]]
name = "leaky"
description = "An endpoint that echoes the credentials in its errors"
url = "https://localhost:{https}/leak"
headers = {{ Authorization = "Bearer {{{{secrets.CRM_TOKEN}}}}" }}
timeout_ms = 2000
on_failure = {{ say = "Sorry." }}
"""

SECRET = "sk_live_very_secret_token_123"


@pytest.fixture(scope="session")
def agent_file(upstream, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("agent") / "agent.toml"
    p.write_text(AGENT.format(http=upstream.http_port, https=upstream.https_port))
    return p


@pytest.fixture()
def runtime(agent_file, upstream):
    import midcall

    return midcall.Runtime(
        agent_file,
        secrets={"CRM_TOKEN": SECRET},
        allow_networks=["127.0.0.0/8", "::1/128"],
        ca_certs=[upstream.cert_pem],
    )


def dumps(v) -> str:
    return json.dumps(v, sort_keys=True)
