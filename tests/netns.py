"""Two hosts on one machine: Linux network namespaces joined by veth pairs.

`Hosts` makes namespace A (Redis and the API) and namespace B (a node and its
workers), a link between them that a test can cut and restore, and a second
link from the test's own namespace to A, so the test keeps reaching the API
while the A-B link is down. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass


def ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def can_make_namespaces() -> str | None:
    """None if this process may create namespaces; else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


@dataclass
class Hosts:
    tag: str
    subnet: int

    @property
    def a(self) -> str:
        return f"iq-{self.tag}-a"

    @property
    def b(self) -> str:
        return f"iq-{self.tag}-b"

    # Cluster network A <-> B, and the test's own link to A.
    @property
    def a_address(self) -> str:
        return f"10.231.{self.subnet}.1"

    @property
    def b_address(self) -> str:
        return f"10.231.{self.subnet}.2"

    @property
    def api_address(self) -> str:
        return f"10.232.{self.subnet}.2"

    @property
    def link_a(self) -> str:
        return f"iq{self.tag}ab"

    @property
    def link_b(self) -> str:
        return f"iq{self.tag}ba"

    def run_in(self, netns: str) -> list[str]:
        """The argv prefix that runs a command inside `netns`."""
        return ["ip", "netns", "exec", netns]

    def create(self) -> None:
        ip("netns", "add", self.a)
        ip("netns", "add", self.b)
        for ns in (self.a, self.b):
            ip("link", "set", "lo", "up", netns=ns)
        ip(
            "link",
            "add",
            self.link_a,
            "netns",
            self.a,
            "type",
            "veth",
            "peer",
            "name",
            self.link_b,
            "netns",
            self.b,
        )
        ip("addr", "add", f"{self.a_address}/30", "dev", self.link_a, netns=self.a)
        ip("addr", "add", f"{self.b_address}/30", "dev", self.link_b, netns=self.b)
        ip("link", "set", self.link_a, "up", netns=self.a)
        ip("link", "set", self.link_b, "up", netns=self.b)
        client, peer = f"iq{self.tag}c0", f"iq{self.tag}c1"
        ip("link", "add", client, "type", "veth", "peer", "name", peer, "netns", self.a)
        ip("addr", "add", f"10.232.{self.subnet}.1/30", "dev", client)
        ip("addr", "add", f"{self.api_address}/30", "dev", peer, netns=self.a)
        ip("link", "set", client, "up")
        ip("link", "set", peer, "up", netns=self.a)

    def cut(self) -> None:
        ip("link", "set", self.link_a, "down", netns=self.a)

    def restore(self) -> None:
        ip("link", "set", self.link_a, "up", netns=self.a)

    def destroy(self) -> None:
        for ns in (self.a, self.b):  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def new_hosts() -> Hosts:
    return Hosts(tag=f"{random.randrange(16**4):04x}", subnet=random.randrange(1, 250))
