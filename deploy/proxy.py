"""The coordinator's public port: an nginx reverse proxy that forwards Flower's Fleet API and nothing else.

Flower 1.41's SuperLink serves all its APIs over one HTTP(S) port: the Fleet
API that SuperNodes use (``POST /v1/fleet/<method>``), the Control API
(``/v1/control/...``: ``flwr run``, ``flwr ls``, ``flwr stop``, ``flwr log``,
``flwr supernode register``) and the Runtime API of the ServerApp
(``/v1/runtime/...``). Its ``--host``/``--port`` bind them all together, and
the open-source SuperLink has no account authentication: whoever reaches the
Control API may register node keys and start runs with their own app.

So ``fedshift server`` binds the SuperLink to ``127.0.0.1`` only (``[server]
local-port``) and puts nginx (Debian package ``nginx``) on the public address.
nginx terminates TLS with the coordinator's certificate and forwards a request
only when its *normalized* path (percent-decoding and ``.``/``..`` resolved by
nginx) is ``/v1/fleet/<lower-case-method>``; the upstream request is rebuilt
from that captured method name, so the SuperLink never sees a path the proxy
did not match. Every other path gets 403 from nginx. The proxy re-verifies the
SuperLink's certificate on loopback against the federation CA. Fleet requests
still carry Flower's node authentication (signed headers, passed through), and
with node authentication on, the Fleet API cannot register new nodes.

Files (in the coordinator's state directory)::

    proxy/nginx.conf        # written at every start
    proxy/nginx.pid, proxy/*-temp/
    logs/proxy-access.log   # one line per request: client address, path, status
    logs/proxy-error.log
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedshift.common.errors import ConfigError

FLEET_PATH = r"^/v1/fleet/([a-z-]+)$"  # the only requests forwarded (Flower's Fleet API methods)
MAX_BODY = "512m"  # largest request body forwarded (one pushed object of a model update)
TIMEOUT = "600s"  # idle time of a forwarded request before nginx gives up on it
UPSTREAM_TLS_NAME = "localhost"  # a SAN of server.crt (fedshift certs always adds it)
TEMP_DIRS = ("client-body", "proxy", "fastcgi", "uwsgi", "scgi")
ACCESS_LOG_FORMAT = '$remote_addr [$time_iso8601] "$request_method $uri" $status $body_bytes_sent'


def nginx_executable() -> str:
    """``nginx`` from ``PATH``, else ``/usr/sbin/nginx``; :class:`ConfigError` when it is not installed."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ConfigError(
            "Expected nginx to be installed at the coordinator (fedshift server puts it in front of the "
            "SuperLink so that hospitals reach only the Fleet API), but it is not on PATH or in /usr/sbin; "
            "install it: apt-get install nginx"
        )
    return found


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy listens on, where it forwards to, and its TLS files (``None``: plain HTTP)."""

    listen: str  # host:port of the public port (IPv6 in brackets)
    upstream_port: int  # the SuperLink's port on 127.0.0.1
    directory: Path  # nginx's prefix: nginx.conf, the pid file, temp folders
    logs: Path  # folder of proxy-access.log and proxy-error.log
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None

    @property
    def conf(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.logs / "proxy-error.log"

    def text(self) -> str:
        """The whole ``nginx.conf``."""
        tls = self.ca_cert is not None
        scheme = "https" if tls else "http"
        d = self.directory
        listen = f"listen {self.listen} ssl;" if tls else f"listen {self.listen};"
        server_tls = self._server_tls()
        upstream_tls = self._upstream_tls()
        lines = [
            "# written by fedshift server at every start (deploy/proxy.py): edits are lost",
            "daemon off;",
            "worker_processes 1;",
            f"pid {_quoted(d / 'nginx.pid')};",
            f"error_log {_quoted(self.error_log)} warn;",
            "events { worker_connections 1024; }",
            "http {",
            f"    log_format fedshift '{ACCESS_LOG_FORMAT}';",
            f"    access_log {_quoted(self.logs / 'proxy-access.log')} fedshift;",
            *(f"    {name.replace('-', '_')}_temp_path {_quoted(d / f'{name}-temp')};" for name in TEMP_DIRS),
            "    server_tokens off;",
            "    default_type text/plain;",
            f"    client_max_body_size {MAX_BODY};",
            "    proxy_http_version 1.1;",
            "    proxy_request_buffering off;",
            "    proxy_buffering off;",
            f"    proxy_read_timeout {TIMEOUT};",
            f"    proxy_send_timeout {TIMEOUT};",
            f"    upstream superlink {{ server 127.0.0.1:{self.upstream_port}; }}",
            "    server {",
            f"        {listen}",
            *(f"        {line}" for line in server_tls),
            "        # the Fleet API (SuperNodes) and nothing else: Control and Runtime stay on loopback",
            f"        location ~ {FLEET_PATH} {{",
            "            limit_except POST { deny all; }",
            f"            proxy_pass {scheme}://superlink/v1/fleet/$1;",
            *(f"            {line}" for line in upstream_tls),
            "        }",
            '        location / { return 403 "fedshift: only the Fleet API is served on this port\\n"; }',
            "    }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def _server_tls(self) -> list[str]:
        """The public server's TLS lines (none for plain HTTP)."""
        if self.ca_cert is None:
            return []
        return [
            f"ssl_certificate {_quoted(self.server_cert)};",
            f"ssl_certificate_key {_quoted(self.server_key)};",
            "ssl_protocols TLSv1.2 TLSv1.3;",
            "# plain HTTP on the HTTPS port: close the connection, no reply (nginx would send a 400)",
            "error_page 497 = @plaintext;",
            "location @plaintext { return 444; }",
        ]

    def _upstream_tls(self) -> list[str]:
        """The TLS lines towards the SuperLink, verified against the CA (none for plain HTTP)."""
        if self.ca_cert is None:
            return []
        return [
            "proxy_ssl_verify on;",
            f"proxy_ssl_trusted_certificate {_quoted(self.ca_cert)};",
            f"proxy_ssl_name {UPSTREAM_TLS_NAME};",
            "proxy_ssl_session_reuse on;",
        ]

    def write(self) -> Path:
        """Write ``nginx.conf`` (and the folders nginx needs); its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in TEMP_DIRS:
            (self.directory / f"{name}-temp").mkdir(exist_ok=True)
        self.conf.write_text(self.text())
        return self.conf

    def argv(self) -> list[str]:
        """The nginx command line (foreground; ``-e`` so nothing is written outside the state directory)."""
        nginx = nginx_executable()
        return [nginx, "-p", str(self.directory), "-c", str(self.conf), "-e", str(self.error_log)]


def _quoted(path: Path | None) -> str:
    text = str(path)
    if any(c in text for c in "\"'\\;{}$\n"):
        raise ConfigError(
            f"Expected a path without quotes, ';', '{{', '}}', '$' or backslashes for the proxy's "
            f"config, but got {text!r}; move the file to a plainer path"
        )
    return f'"{text}"'
