"""Notice that the JACK server went away while `antiphon jam` runs on it.

RtMidi registers no shutdown callback with JACK, so a dead server leaves the daemon deaf and
mute without a word. jackd (jack2) listens on a Unix socket `/dev/shm/jack_<server>_<uid>_<n>`;
the kernel's table of listening Unix sockets (/proc/net/unix) says whether it still does, for
the price of reading one small file, without talking to the server. Linux only: elsewhere, or
when the socket was not found at start, the watch stays silent rather than guess.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC_NET_UNIX = Path("/proc/net/unix")
LISTENING = "01"  # st column of /proc/net/unix: SS_UNCONNECTED (a listening socket)


def server_name() -> str:
    return os.environ.get("JACK_DEFAULT_SERVER") or "default"


def listening_sockets(table: str, prefix: str) -> set[str]:
    paths = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[5] == LISTENING and os.path.basename(fields[7]).startswith(prefix):
            paths.add(fields[7])
    return paths


class JackWatch:
    def __init__(self, server: str | None = None) -> None:
        self.server = server or server_name()
        self.prefix = f"jack_{self.server}_{os.getuid() if hasattr(os, 'getuid') else 0}_"
        self.sockets = self._listening()  # empty: nothing to watch

    def _listening(self) -> set[str]:
        try:
            return listening_sockets(PROC_NET_UNIX.read_text(), self.prefix)
        except OSError:
            return set()

    @property
    def active(self) -> bool:
        return bool(self.sockets)

    def alive(self) -> bool:
        """False only once a server seen listening at start has stopped listening."""
        return not self.sockets or bool(self._listening())
