"""What `sinkhole serve` runs for RPZ: a primary, a secondary, or both, and their listener."""

from __future__ import annotations

import asyncio
import socket

from sinkhole.fleet.endpoint import Endpoint
from sinkhole.fleet.primary import Primary
from sinkhole.fleet.secondary import Secondary
from sinkhole.store.db import Store


class Node:
    """A primary, a secondary, or both, and their listener (service.build.fleet makes it from the settings)."""

    def __init__(self, primary: Primary | None, secondary: Secondary | None, endpoint: Endpoint | None) -> None:
        self.primary = primary
        self.secondary = secondary
        self.endpoint = endpoint

    def policy_changed(self, store: Store) -> None:
        if self.primary is not None:
            self.primary.policy_changed(store)

    async def start(self, sockets: tuple[socket.socket, socket.socket] | None) -> None:
        """`sockets`: rpz_listen's, bound before root was dropped; None only when there is no endpoint."""
        if self.endpoint is not None:
            assert sockets is not None, "rpz_listen is bound before the server starts"
            await self.endpoint.start(sockets)
        if self.secondary is not None:
            self.secondary.start()

    async def stop(self) -> None:
        if self.secondary is not None:
            self.secondary.stop()
        if self.endpoint is not None:
            await self.endpoint.stop()
        if self.secondary is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.secondary.join, 5)
