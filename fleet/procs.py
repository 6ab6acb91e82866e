"""Start and stop the fleet's parts as child processes in a folder of their own, on free loopback ports.

- `RedisServer`: Debian's redis-server with deploy/k8s/redis.conf (AOF, fsync per write), optional ACL user.
- `Nginx`: nginx with deploy/nginx/searchrec.conf.template rendered for a list of replica ports.
- `Replica`: `python -m server` with the shared store, waited on until it answers health checks SERVING.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REDIS_CONF = ROOT / "deploy" / "k8s" / "redis.conf"
NGINX_TEMPLATE = ROOT / "deploy" / "nginx" / "searchrec.conf.template"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(binary: str) -> str:
    """The path of a program the harness runs, or a clear error saying how to install it."""
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}") if os.path.exists(p)), None)
    if path is None:
        raise FileNotFoundError(f"{binary} is not installed: run `apt-get install -y redis-server nginx` "
                                "(scripts/setup.sh does)")
    return path


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout_s: float = 10) -> int | None:
    """Send sig, wait up to timeout_s, then SIGKILL; the exit status (None when it never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(5)


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(5)


class RedisServer:
    """A redis-server on a free loopback port with its data (AOF) in `folder`."""

    def __init__(self, folder: Path, port: int | None = None, user: str = "", password: str = "",
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user, self.password = user, password
        self.tls = tls  # (certificate, key, CA): TLS only, on self.port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        ports = ["--port", str(self.port)]
        if self.tls:
            cert, key, ca = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert), "--tls-key-file",
                     str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        args = [need("redis-server"), str(REDIS_CONF), *ports, "--bind", "127.0.0.1",
                "--dir", str(self.folder), "--daemonize", "no", "--logfile", str(self.folder / "redis.log")]
        if self.user:  # an ACL user with the password; the default user is switched off
            args += ["--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all", "--user", "default", "off"]
        elif self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(lambda: _port_open(self.port), 20, f"redis-server on port {self.port}", self.proc)
        return self

    def stop(self) -> None:
        _stop(self.proc)

    def kill(self) -> None:
        _kill(self.proc)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def render_nginx(port: int, upstreams: list[int], folder: Path, max_conns: int = 0, access_log: bool = False) -> str:
    """The nginx config for replicas on `upstreams` ports, proxied on `port`."""
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=1s"
                        f"{f' max_conns={max_conns}' if max_conns else ''};" for p in upstreams)
    log = f"{folder}/logs/access.log timing" if access_log else "off"
    return (NGINX_TEMPLATE.read_text().replace("@LISTEN@", f"127.0.0.1:{port}").replace("@UPSTREAMS@", servers)
            .replace("@PREFIX@", str(folder)).replace("@ACCESS_LOG@", log))


class Nginx:
    """nginx as the gRPC proxy (grpc_pass over HTTP/2) in front of replicas, on a free loopback port."""

    def __init__(self, folder: Path, upstreams: list[int], port: int | None = None, max_conns: int = 0,
                 access_log: bool = False) -> None:
        self.folder = Path(folder)
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.upstreams = upstreams
        self.max_conns = max_conns
        self.access_log = access_log
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Nginx":
        conf = self.folder / "nginx.conf"
        conf.write_text(render_nginx(self.port, self.upstreams, self.folder, self.max_conns, self.access_log))
        nginx = need("nginx")
        check = subprocess.run([nginx, "-t", "-q", "-p", str(self.folder), "-c", str(conf)], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected {conf}: {check.stderr.strip()}")
        self.proc = subprocess.Popen([nginx, "-p", str(self.folder), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.folder / "logs" / "stderr.log", "w"))
        _wait(lambda: _port_open(self.port), 20, f"nginx on port {self.port}", self.proc)
        return self

    def set_upstreams(self, upstreams: list[int]) -> None:
        """Re-point the proxy at these replicas without dropping a call: nginx re-reads its config on SIGHUP,
        new workers take new calls and the old ones finish theirs (how a replica is drained before a restart)."""
        self.upstreams = list(upstreams)
        (self.folder / "nginx.conf").write_text(render_nginx(self.port, self.upstreams, self.folder, self.max_conns,
                                                             self.access_log))
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the new worker is up well within this on loopback

    def calls(self) -> list[tuple[int, float, str, str]]:
        """(HTTP status, seconds at the proxy, upstreams tried, path) of every call so far (with access_log)."""
        out = []
        path = self.folder / "logs" / "access.log"
        for line in (path.read_text().splitlines() if path.exists() else []):
            status, secs, upstream, uri = line.split(" ", 3)
            out.append((int(status), float(secs), upstream.strip('"'), uri))
        return out

    def stop(self) -> None:
        _stop(self.proc, signal.SIGQUIT)  # graceful: finish what is in flight

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Replica:
    """One `python -m server` replica process on the shared store."""

    def __init__(self, bundle: Path, state: str, folder: Path, port: int | None = None, name: str = "",
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.bundle, self.state = Path(bundle), state
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.name = name or f"replica-{self.port}"
        self.extra = list(extra or [])
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = self.folder / f"{self.name}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True, timeout_s: float = 300) -> "Replica":
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        args = [sys.executable, "-m", "server", "--bundle", str(self.bundle), "--port", str(self.port),
                "--device", "cpu", "--state", self.state, "--replica-id", self.name, "--grace-s", "2", *self.extra]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT)
        if wait:
            self.wait_serving(timeout_s)
        return self

    def wait_serving(self, timeout_s: float = 300) -> None:
        _wait(self.serving, timeout_s, f"{self.name} to report SERVING (log: {self.log_path})", self.proc)

    def serving(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(self.target) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
            return status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (graceful drain) and wait."""
        return _stop(self.proc, signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        _kill(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
