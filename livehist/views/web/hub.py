"""From the followers' threads to every browser, without anyone waiting for anyone.

The hub keeps the latest frame of every key ((device, histogram), (device, ":status"), ...)
for browsers that connect later. Each browser has its own `Client`: at most one frame per
key waits for it (a newer frame replaces the waiting one, and the replacement is counted
as dropped), and its own task sends them. A browser that reads slowly or not at all only
makes its own frames wait and be replaced; the followers, the devices and the other
browsers never wait for it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from livehist.views.web.frames import decode

Key = tuple[str, str]
MAX_KEYS = 1024  # a bound on what waits for one client even if devices grow many histograms


class Client:
    def __init__(self) -> None:
        self.waiting: OrderedDict[Key, bytes] = OrderedDict()
        self.ready = asyncio.Event()
        self.sent = 0
        self.dropped = 0
        self.closed = False

    def offer(self, key: Key, frame: bytes) -> None:
        if key in self.waiting:
            self.dropped += 1  # the browser has not taken the previous one: it gets the newest only
        elif len(self.waiting) >= MAX_KEYS:
            self.waiting.popitem(last=False)
            self.dropped += 1
        self.waiting[key] = frame
        self.ready.set()

    async def next_frame(self) -> bytes:
        while not self.waiting:
            self.ready.clear()
            await self.ready.wait()
        return self.waiting.popitem(last=False)[1]


# keys of a device's frames that are not histograms: no histogram name starts with ':' (a
# histogram named 'config' took the configuration's key, and new browsers never got it)
KEY_CONFIG, KEY_STATUS, KEY_METADATA = ":config", ":status", ":metadata"
OWN_KEYS = (KEY_CONFIG, KEY_STATUS, KEY_METADATA)


class Hub:
    """Lives on the event loop; `publish_threadsafe` is what follower threads call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.latest: dict[Key, bytes] = {}
        self.clients: set[Client] = set()

    def publish_threadsafe(self, key: Key, frame: bytes) -> None:
        try:
            self.loop.call_soon_threadsafe(self.publish, key, frame)
        except RuntimeError:  # the loop closed while a follower was finishing
            pass

    def publish(self, key: Key, frame: bytes) -> None:
        if key[1] == KEY_CONFIG:  # histograms gone from the device: their last frames go too
            keep = {h["name"] for h in decode(frame)[0].get("histograms", [])} | set(OWN_KEYS)
            for old in [k for k in self.latest if k[0] == key[0] and k[1] not in keep]:
                del self.latest[old]
        self.latest[key] = frame
        for client in self.clients:
            client.offer(key, frame)

    def join(self) -> Client:
        client = Client()
        # configuration first, so that the page knows what the data frames are
        for key in sorted(self.latest, key=lambda k: k[1] != KEY_CONFIG):
            client.offer(key, self.latest[key])
        self.clients.add(client)
        return client

    def leave(self, client: Client) -> None:
        client.closed = True
        self.clients.discard(client)

    def stats(self) -> list[dict]:
        return [{"sent": c.sent, "dropped": c.dropped, "waiting": len(c.waiting)} for c in self.clients]
