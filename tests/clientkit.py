"""
Helpers for the client tests: a route and IM servers running in the test's
reactor on port 0, client factories, and waiting (with L{tests.kit.wait})
for what a L{QueueListener} gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cim.client.library import Client, ClientState, QueueListener
from cim.message import ChatMessage
from cim.registry.local import LocalBoard, LocalRegistry
from cim.route.service import RouteConfig, RouteService
from cim.server.service import IMServerService, ServerConfig
from cim.store.memory import MemoryStore
from tests.kit.wait import DEADLINE, take, take_until, within

SECRET = "client-test-secret"


async def wait_state(
    reactor: Any,
    listener: QueueListener,
    state: ClientState,
    deadline: float = DEADLINE,
) -> str:
    """
    Take state changes from C{listener} until C{state}; return its reason.
    """
    _, reason = await take_until(
        reactor, listener.states, lambda got: got[0] == state, str(state), deadline
    )
    return reason


async def take_messages(
    reactor: Any, listener: QueueListener, count: int, deadline: float = DEADLINE
) -> list[ChatMessage]:
    """
    The next C{count} messages C{listener} receives.
    """
    return await take(reactor, listener.messages, count, deadline)


class Harness:
    """
    A route and IM servers in this process, on one store, and the clients a
    test makes; L{stop} closes and stops everything.

    @ivar registry: the registry the route uses (servers get their own on the
        same board, or this one when there is one server).
    """

    def __init__(self, reactor: Any, state_root: Path) -> None:
        self.reactor = reactor
        self.state_root = state_root
        self.store = MemoryStore(reactor)
        self.board = LocalBoard()
        self.registry = LocalRegistry(self.board)
        self.route: RouteService | None = None
        self.servers: list[IMServerService] = []
        self.clients: list[Client] = []

    async def _store(self) -> MemoryStore:
        return self.store

    async def start_server(self, shared_registry: bool = True) -> IMServerService:
        """
        Start one more IM server.
        """
        registry = self.registry if shared_registry else LocalRegistry(self.board)
        service = IMServerService(
            self.reactor,
            ServerConfig(port=0, http_port=0, secret=SECRET),
            self._store,
            registry,
        )
        self.servers.append(service)
        service.startService()
        await within(self.reactor, service.ready)
        return service

    async def start(self, servers: int = 1, balancer: str = "round-robin") -> Harness:
        """
        Start C{servers} IM servers and the route (which spreads logins
        over them with C{balancer}).
        """
        for i in range(servers):
            await self.start_server(shared_registry=i == 0)
        self.route = RouteService(
            self.reactor,
            RouteConfig(port=0, bind="127.0.0.1", secret=SECRET, balancer=balancer),
            self._store,
            self.registry,
        )
        self.route.startService()
        await within(self.reactor, self.route.ready)
        return self

    @property
    def route_url(self) -> str:
        assert self.route is not None and self.route.port is not None
        return f"http://127.0.0.1:{self.route.port}"

    def client(self, name: str = "", **kwargs: Any) -> tuple[Client, QueueListener]:
        """
        A new client with a L{QueueListener}; its cursor file (and device
        id, unless C{device} is given) lives under C{state_root/name}
        unless C{state_dir} is given.
        """
        listener = QueueListener()
        kwargs.setdefault("state_dir", self.state_root / (name or "default"))
        kwargs.setdefault("backoff_base", 0.05)
        client = Client(self.reactor, self.route_url, listener=listener, **kwargs)
        self.clients.append(client)
        return client, listener

    async def logged_in(self, name: str, **kwargs: Any) -> tuple[Client, QueueListener]:
        """
        A new client logged in as C{name}.
        """
        client, listener = self.client(name, **kwargs)
        await within(self.reactor, client.login(name))
        return client, listener

    def server_of(self, client: Client) -> IMServerService:
        """
        The IM server C{client} is connected to.
        """
        for service in self.servers:
            if service.address is not None and client.server == (
                service.address.host,
                service.address.port,
            ):
                return service
        raise AssertionError(f"no server at {client.server}")

    def connection_of(self, client: Client) -> Any:
        """
        The server's connection of C{client} (its user's connection of its
        device, when the server keeps one per device).
        """
        assert client.user_id is not None
        server = self.server_of(client).server
        assert server is not None
        return server.connection(client.user_id, client.device)

    def drop(self, client: Client) -> None:
        """
        Drop C{client}'s TCP connection from the server side.
        """
        conn = self.connection_of(client)
        conn.link.transport.abortConnection()

    async def stop(self) -> None:
        """
        Close every client, then stop the route and the servers.
        """
        for client in self.clients:
            await within(self.reactor, client.close())
        if self.route is not None and self.route.running:
            await self.route.stopService()
        for service in self.servers:
            if service.running:
                await service.stopService()
