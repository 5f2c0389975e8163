"""Two "hosts" on one Linux machine: two network namespaces joined by a veth pair.

Each namespace has its own network stack: its own loopback, one veth end with a private address
(10.213.X.1/30 and 10.213.X.2/30) and nothing else, so the only way from one host to the other is the
veth pair, as between two nodes of a cluster. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2.

    with two_hosts(tmp_dir) as hosts:
        proc = hosts.popen(0, ["deepspeed", "--hostfile", str(hosts.hostfile), ...], env=..., log=...)

Names carry this process's id, so parallel sessions do not collide; everything created is removed on
exit from the context, also on failure (deleting a namespace deletes its veth end, and with it the pair).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "upmn"  # namespace and interface names: upmn<pid>a / upmn<pid>b (at most 15 characters)
NAME_RE = re.compile(rf"^{PREFIX}(\d+)[ab]$")


class Unavailable(Exception):
    """Namespaces cannot be made here (not root, no iproute2, no permission); the reason is the message."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.returncode}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be created here, or None when they (probably) can."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`): apt-get install iproute2"
    return None


@dataclass
class Hosts:
    namespaces: tuple[str, str]
    interfaces: tuple[str, str]
    addresses: tuple[str, str]
    hostfile: Path

    @property
    def master_addr(self) -> str:
        return self.addresses[0]

    def command(self, host: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[host], *cmd]

    def popen(self, host: int, cmd: list[str], env: dict, log: Path, cwd: str | None = None):
        """Start `cmd` on `host` in a new session (its own process group), output appended to `log`."""
        with open(log, "a") as fh:
            return subprocess.Popen(
                self.command(host, cmd),
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    def pids(self, host: int) -> list[int]:
        """Processes running inside `host`'s namespace (all started by the tests)."""
        out = _ip("netns", "pids", self.namespaces[host], check=False).stdout
        return [int(p) for p in out.split()]

    def traffic(self, host: int) -> tuple[int, int]:
        """(bytes sent, bytes received) on `host`'s veth end since it was created."""
        stats = f"/sys/class/net/{self.interfaces[host]}/statistics"
        out = subprocess.run(
            self.command(host, ["cat", f"{stats}/tx_bytes", f"{stats}/rx_bytes"]),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        return int(out[0]), int(out[1])

    def set_link(self, host: int, up: bool) -> None:
        """Take `host`'s network interface down (a cut cable: no reset reaches the peer) or up again."""
        _ip("-n", self.namespaces[host], "link", "set", self.interfaces[host], "up" if up else "down")

    def kill_all(self, host: int) -> None:
        for pid in self.pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def network(self) -> str:
        """The link's subnet in CIDR notation (both addresses are in it)."""
        return str(ipaddress.ip_interface(f"{self.addresses[0]}/30").network)

    def with_hostname(self, host: int, cmd: list[str]) -> list[str]:
        """`cmd` with `host`'s own hostname (its namespace's name), in a UTS namespace of its own: the
        namespaces share the machine's hostname otherwise, and Open MPI needs one per host. Pass the result
        to `popen`/`command`."""
        return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.namespaces[host], *cmd]

    def ssh_agent(self, directory: Path) -> Path:
        """A stand-in for ssh, for Open MPI's plm_ssh_agent: `agent [-options] HOST COMMAND...` runs the
        shell command COMMAND on HOST (an address or hostname of either host) in that host's namespace,
        with its hostname (`with_hostname`), as `ssh HOST COMMAND...` runs it on a remote node."""
        cases = "".join(
            f"    {addr}|{ns}) ns={ns} ;;\n" for addr, ns in zip(self.addresses, self.namespaces, strict=True)
        )
        path = Path(directory) / "netns-ssh"
        path.write_text(
            "#!/bin/sh\n"
            "# ssh stand-in for the network-namespace hosts of tests/helpers/netns.py:\n"
            "# [-options] HOST COMMAND...\n"
            'while [ "${1#-}" != "$1" ]; do shift; done  # ssh options (-x, ...)\n'
            "host=$1; shift\n"
            'case "$host" in\n'
            f"{cases}"
            '    *) echo "netns-ssh: unknown host $host" >&2; exit 255 ;;\n'
            "esac\n"
            "# ssh hands its arguments, joined by spaces, to the remote shell\n"
            'exec ip netns exec "$ns" unshare --uts sh -c \'hostname "$0" && exec sh -c "$1"\' "$ns" "$*"\n'
        )
        path.chmod(0o755)
        return path


def _remove(namespaces) -> None:
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)


def _remove_stale() -> None:
    """Namespaces left by an earlier session of these tests whose process is gone (killed pytest)."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        match = NAME_RE.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _ip("netns", "del", name, check=False)


@contextlib.contextmanager
def two_hosts(directory: Path, slots: int = 1):
    """Create the two namespaces and a DeepSpeed hostfile naming them; remove everything afterwards."""
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    pid = os.getpid()
    names = (f"{PREFIX}{pid}a", f"{PREFIX}{pid}b")  # namespace i holds interface of the same name
    subnet = f"10.213.{pid % 256}"
    addresses = (f"{subnet}.1", f"{subnet}.2")
    _remove_stale()
    _remove(names)  # a leftover of this very pid (pid reuse)
    created: list[str] = []
    try:
        for ns in names:
            _ip("netns", "add", ns)
            created.append(ns)
        # Both ends are created directly inside their namespaces: nothing appears in the caller's.
        a, b = names
        _ip("link", "add", a, "netns", a, "type", "veth", "peer", "name", b, "netns", b)
        for ns, addr in zip(names, addresses, strict=True):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", ns)
            _ip("-n", ns, "link", "set", ns, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        hostfile = Path(directory) / "hostfile"
        hostfile.write_text(
            "# DeepSpeed hostfile: one line per node, '<host> slots=<processes on it>'\n"
            + "".join(f"{addr} slots={slots}\n" for addr in addresses)
        )
        hosts = Hosts(names, names, addresses, hostfile)
        _wait_reachable(hosts)
        yield hosts
    finally:
        for ns in created:
            out = _ip("netns", "pids", ns, check=False).stdout
            for p in out.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(p), signal.SIGKILL)
        time.sleep(0.2 if created else 0)
        _remove(created)


def _wait_reachable(hosts: Hosts, timeout: float = 10.0) -> None:
    """A TCP connection from host 1 to host 0 over the veth (addresses can take a moment to settle)."""
    script = (
        "import socket, sys\n"
        "srv = socket.create_server((sys.argv[1], 0))\n"
        "print(srv.getsockname()[1], flush=True)\n"
        "conn, _ = srv.accept(); conn.sendall(b'ok'); conn.close()\n"
    )
    client = (
        "import socket, sys, time\n"
        "deadline = time.time() + float(sys.argv[3])\n"
        "while True:\n"
        "    try:\n"
        "        conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)\n"
        "        print(conn.recv(2).decode()); break\n"
        "    except OSError:\n"
        "        if time.time() > deadline: raise\n"
        "        time.sleep(0.1)\n"
    )
    server = subprocess.Popen(
        hosts.command(0, [sys.executable, "-c", script, hosts.addresses[0]]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = server.stdout.readline().strip()
        result = subprocess.run(
            hosts.command(1, [sys.executable, "-c", client, hosts.addresses[0], port, str(timeout)]),
            capture_output=True,
            text=True,
            timeout=timeout + 10,
        )
        if result.stdout.strip() != "ok":
            raise RuntimeError(
                f"host 1 cannot reach host 0 over the veth pair: {result.stderr.strip()[-500:]}"
            )
    finally:
        server.kill()
        server.wait()
