"""
The simulated machines and network: one L{task.Clock} for the whole
cluster, a L{Node} per process (its own view of that clock, which a crash
silences), and in-memory TCP connections between nodes whose bytes take
a seeded latency, and which the fault schedule stalls or cuts.

Everything runs on the calling thread, in the order of the clock's delayed
calls; nothing here reads the real time or the global reactor.  What is
random (latencies) comes from the L{Network}'s C{random.Random}.
"""

from __future__ import annotations

import heapq
import random
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    TimeoutError,
    UserError,
)
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: Bytes waiting in one direction of a stalled connection before the
#: sender's producer is paused (a TCP send buffer).
SEND_BUFFER = 64 * 1024


@implementer(IDelayedCall)
class _DeadCall:
    """
    What a crashed node's C{callLater} returns: a call that never runs.
    """

    def __init__(self, time: float) -> None:
        self.time = time

    def getTime(self) -> float:
        return self.time

    def cancel(self) -> None:
        pass

    def delay(self, secondsLater: float) -> None:
        pass

    def reset(self, secondsFromNow: float) -> None:
        pass

    def active(self) -> bool:
        return False


@implementer(IReactorTime, IReactorTCP)
class Node:
    """
    One process of the cluster: the reactor its code is given.  Its timers
    run on the world's clock; L{kill} cancels them all (the process is
    gone, and so is everything it was waiting for).  Its wall clock may
    run ahead of the world's by C{offset} seconds (a clock jump).
    """

    def __init__(self, net: Network, name: str) -> None:
        self.net = net
        self.name = name
        self.clock: HeapClock = net.clock
        self.alive = True
        self.offset = 0.0
        self._calls: weakref.WeakSet[IDelayedCall] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"<Node {self.name}>"

    # IReactorTime

    def seconds(self) -> float:
        return self.clock.seconds() + self.offset

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> IDelayedCall:
        if not self.alive:
            return _DeadCall(self.seconds() + delay)
        call = self.clock.callLater(max(0.0, delay), callable, *args, **kw)
        self._calls.add(call)
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [c for c in self._calls if c.active()]

    # IReactorTCP

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> IConnector:
        return self.net.connect(self, host, port, factory, timeout)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        raise NotImplementedError("use Network.listen")

    def kill(self) -> None:
        """
        The process dies: its timers never run, its connections are gone
        (their peers see a reset, or nothing: L{Network.crash}).
        """
        self.alive = False
        for call in list(self._calls):
            if call.active():
                call.cancel()
        self._calls = weakref.WeakSet()


class Link:
    """
    The state of the network between two nodes, both ways: C{"ok"},
    C{"stall"} (bytes wait, connections cannot be opened) or C{"cut"}
    (connections are reset and refused).
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = "ok"


@implementer(ITCPTransport)
class Transport:
    """
    One end of an in-memory TCP connection.
    """

    def __init__(self, conn: Connection, side: int) -> None:
        self.conn = conn
        self.side = side
        self.protocol: Protocol | None = None
        self.producer: Any = None
        self.paused = False
        self.disconnecting = False
        self.disconnected = False

    @property
    def node(self) -> Node:
        return self.conn.nodes[self.side]

    def write(self, data: bytes) -> None:
        if data and not self.disconnecting and not self.disconnected:
            self.conn.send(self.side, data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        self.conn.close(self.side)

    def abortConnection(self) -> None:
        if self.disconnected:
            return
        self.disconnecting = True
        self.conn.reset(self.side)

    def getPeer(self) -> IPv4Address:
        return self.conn.addresses[1 - self.side]

    def getHost(self) -> IPv4Address:
        return self.conn.addresses[self.side]

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.loseConnection()

    # Called by the connection

    def _buffered(self, size: int) -> None:
        """
        C{size} bytes of ours wait to be delivered: pause our producer when
        past a send buffer, resume it when below.
        """
        if self.producer is None:
            return
        if size > SEND_BUFFER and not self.paused:
            self.paused = True
            self.producer.pauseProducing()
        elif size <= SEND_BUFFER and self.paused:
            self.paused = False
            self.producer.resumeProducing()

    def _lost(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnecting = True
        protocol, self.protocol = self.protocol, None
        if protocol is not None and self.node.alive:
            protocol.connectionLost(reason)


class Connection:
    """
    An in-memory TCP connection between two nodes: each direction delivers
    its chunks in order, each after a latency from the network; when the
    link stalls (or the receiving end stops reading) they wait.
    """

    def __init__(
        self,
        net: Network,
        client: Node,
        server: Node,
        client_address: IPv4Address,
        server_address: IPv4Address,
    ) -> None:
        self.net = net
        self.nodes = (client, server)
        self.addresses = (client_address, server_address)
        self.ends = (Transport(self, 0), Transport(self, 1))
        #: Per direction (by sending side): chunks not yet delivered.
        self.queues: tuple[deque[bytes], deque[bytes]] = (deque(), deque())
        #: Per direction: whether a delivery is scheduled.
        self.scheduled = [False, False]
        #: Per direction: when the last chunk is due (deliveries keep order).
        self.due = [0.0, 0.0]
        #: Per receiving side: it does not read (a client that stopped).
        self.not_reading = [False, False]
        #: Per sending side: it closed; the close follows its last bytes.
        self.closing = [False, False]
        self.closed = False
        #: One end died without a trace: bytes to it vanish, and the
        #: other end finds out only by its own timers.
        self.blackhole = False
        self.id = net.next_id()

    def __repr__(self) -> str:
        return f"conn#{self.id} {self.nodes[0].name}->{self.nodes[1].name}"

    @property
    def link(self) -> Link:
        return self.net.link(self.nodes[0].name, self.nodes[1].name)

    def blocked(self, side: int) -> bool:
        """
        Whether bytes sent by C{side} wait.
        """
        return self.link.state == "stall" or self.not_reading[1 - side]

    def send(self, side: int, data: bytes) -> None:
        if self.blackhole:
            # A host that came back at the dead end's address answers a
            # connection it does not know with a reset.
            dead = self.nodes[1 - side]
            if self.net.restarted(dead) and not self.closed:
                self.closed = True
                self.net.clock.callLater(
                    self.net.latency(),
                    self.ends[side]._lost,
                    Failure(ConnectionLost("connection reset")),
                )
            return
        if self.closed:
            return
        self.queues[side].append(data)
        self._pump(side)

    def close(self, side: int) -> None:
        if self.blackhole:
            self.ends[side]._lost(Failure(ConnectionDone("closed")))
            return
        self.closing[side] = True
        self._pump(side)

    def _pump(self, side: int) -> None:
        """
        Schedule the next delivery from C{side}, unless one is scheduled or
        the direction is blocked.
        """
        queue = self.queues[side]
        sender = self.ends[side]
        sender._buffered(sum(len(c) for c in queue))
        if self.closed or self.scheduled[side] or self.blocked(side):
            return
        if not queue and not self.closing[side]:
            return
        self.scheduled[side] = True
        now = self.net.clock.seconds()
        due = max(now + self.net.latency(), self.due[side])
        self.due[side] = due
        self.net.clock.callLater(due - now, self._deliver, side)

    def _deliver(self, side: int) -> None:
        self.scheduled[side] = False
        if self.closed:
            return
        if self.blocked(side):
            return
        queue = self.queues[side]
        if queue:
            # Whatever is queued goes as one read (bursts coalesce).
            data = b"".join(queue)
            queue.clear()
            receiver = self.ends[1 - side]
            self.ends[side]._buffered(0)
            if receiver.protocol is not None and not receiver.disconnected:
                if receiver.node.alive:
                    receiver.protocol.dataReceived(data)
            self._pump(side)
            return
        if self.closing[side]:
            self.shut(Failure(ConnectionDone("closed")))

    def resume(self) -> None:
        """
        The link or a reader came back: deliver what waited.
        """
        self._pump(0)
        self._pump(1)

    def shut(self, reason: Failure, delays: tuple[float, float] = (0.0, 0.0)) -> None:
        """
        The connection is gone for both ends (each told after its delay).
        """
        if self.closed:
            return
        self.closed = True
        self.net.connections.discard(self)
        for q in self.queues:
            q.clear()
        for end, delay in zip(self.ends, delays, strict=True):
            if delay:
                self.net.clock.callLater(delay, end._lost, reason)
            else:
                end._lost(reason)

    def reset(self, side: int) -> None:
        """
        C{side} aborted: it knows now, its peer after a latency.
        """
        if self.blackhole:
            self.ends[side]._lost(Failure(ConnectionLost("connection aborted")))
            return
        later = self.net.latency()
        delays = (0.0, later) if side == 0 else (later, 0.0)
        self.shut(Failure(ConnectionLost("connection reset")), delays)


@implementer(IConnector)
class Connector:
    """
    An outgoing connection attempt (L{IConnector}).
    """

    def __init__(
        self, net: Network, node: Node, host: str, port: int, factory: Any
    ) -> None:
        self.net = net
        self.node = node
        self.host = host
        self.port = port
        self.factory = factory
        self.done = False
        self.timer: IDelayedCall | None = None
        self.attempt: IDelayedCall | None = None

    def stopConnecting(self) -> None:
        self._fail(UserError(string="stopConnecting was called"))

    def disconnect(self) -> None:
        self.stopConnecting()

    def connect(self) -> None:
        pass

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)

    def _fail(self, error: Exception) -> None:
        if self.done:
            return
        self.done = True
        for call in (self.timer, self.attempt):
            if call is not None and call.active():
                call.cancel()
        if self.node.alive:
            self.factory.clientConnectionFailed(self, Failure(error))

    def _arrive(self) -> None:
        """
        The SYN arrives: connect, refuse, or (stalled link) let it time out.
        """
        self.attempt = None
        if self.done:
            return
        net = self.net
        listener = net.listeners.get((self.host, self.port))
        if listener is None or not listener[0].alive:
            self._fail(ConnectionRefusedError(string=f"{self.host}:{self.port}"))
            return
        server_node, factory = listener
        link = net.link(self.node.name, server_node.name)
        if link.state == "cut":
            self._fail(ConnectionRefusedError(string="the network is cut"))
            return
        if link.state == "stall":
            return  # the timer fails it
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.node.alive:
            return
        client_address = IPv4Address("TCP", net.address_of(self.node), net.next_id())
        server_address = IPv4Address("TCP", self.host, self.port)
        server_protocol = factory.buildProtocol(client_address)
        if server_protocol is None:
            self.factory.clientConnectionFailed(
                self, Failure(ConnectionRefusedError(string="refused"))
            )
            return
        client_protocol = self.factory.buildProtocol(server_address)
        if client_protocol is None:
            return
        conn = Connection(net, self.node, server_node, client_address, server_address)
        net.connections.add(conn)
        client_end, server_end = conn.ends
        client_end.protocol = client_protocol
        server_end.protocol = server_protocol
        server_protocol.makeConnection(server_end)
        client_protocol.makeConnection(client_end)


class Network:
    """
    The nodes, their listening ports, their connections and the links
    between them.

    @ivar latency_range: (low, high) seconds one chunk takes, drawn
        uniformly; L{slow} raises it for a while (bursts of latency).
    """

    def __init__(self, clock: HeapClock, rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng
        self.latency_range = (0.0005, 0.005)
        self.listeners: dict[tuple[str, int], tuple[Node, Any]] = {}
        self.connections: set[Connection] = set()
        self._links: dict[tuple[str, str], Link] = {}
        self._addresses: dict[str, str] = {}
        self._nodes: dict[str, Node] = {}
        self._ids = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def latency(self) -> float:
        low, high = self.latency_range
        return self.rng.uniform(low, high)

    def node(self, name: str, address: str) -> Node:
        self._addresses[name] = address
        node = self._nodes[name] = Node(self, name)
        return node

    def restarted(self, node: Node) -> bool:
        """
        Whether C{node} is dead and another process runs under its name.
        """
        current = self._nodes.get(node.name)
        return not node.alive and current is not None and current.alive

    def address_of(self, node: Node) -> str:
        return self._addresses.get(node.name, "10.9.9.9")

    def link(self, a: str, b: str) -> Link:
        key = (a, b) if a <= b else (b, a)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = Link()
        return link

    def sorted_connections(self) -> list[Connection]:
        return sorted(self.connections, key=lambda c: c.id)

    def between(self, a: str, b: str) -> list[Connection]:
        names = {a, b}
        return [
            c
            for c in self.sorted_connections()
            if {c.nodes[0].name, c.nodes[1].name} == names
        ]

    def set_link(self, a: str, b: str, state: str) -> None:
        """
        Make the link between C{a} and C{b} C{state}: a cut resets its
        connections, a return to C{"ok"} delivers what waited.
        """
        self.link(a, b).state = state
        for conn in self.between(a, b):
            if state == "cut":
                delays = (self.latency(), self.latency())
                conn.shut(Failure(ConnectionLost("the network is cut")), delays)
            else:
                conn.resume()

    def listen(self, node: Node, host: str, port: int, factory: Any) -> None:
        if isinstance(factory, Factory):
            factory.doStart()
        self.listeners[(host, port)] = (node, factory)

    def connect(
        self, node: Node, host: str, port: int, factory: Any, timeout: float
    ) -> Connector:
        connector = Connector(self, node, host, port, factory)
        factory.startedConnecting(connector)
        connector.timer = node.callLater(
            timeout, connector._fail, TimeoutError(string=f"{host}:{port}")
        )
        connector.attempt = self.clock.callLater(self.latency(), connector._arrive)
        return connector

    def crash(self, node: Node, reset: bool) -> None:
        """
        C{node} dies: its listeners go, and its connections: their other
        ends see a reset (C{reset}: the process died, its kernel answers)
        or nothing at all (the machine is gone: heartbeats find out).
        """
        node.kill()
        for key, (owner, _) in list(self.listeners.items()):
            if owner is node:
                del self.listeners[key]
        for conn in self.sorted_connections():
            if node not in conn.nodes:
                continue
            if reset:
                delays = tuple(0.0 if n is node else self.latency() for n in conn.nodes)
                conn.shut(Failure(ConnectionLost("connection reset")), delays)  # type: ignore[arg-type]
            else:
                # Nothing comes back from the dead end: bytes to it vanish.
                conn.blackhole = True
                for q in conn.queues:
                    q.clear()
                self.connections.discard(conn)


class HeapClock:
    """
    A L{task.Clock} for many timers: its delayed calls are kept in a heap
    (C{Clock} sorts a list at every call), cancelled ones dropped lazily.
    Calls due at the same time run in the order they were made.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.rightNow = start
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._count = 0

    def seconds(self) -> float:
        return self.rightNow

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> DelayedCall:
        call = DelayedCall(
            self.rightNow + delay,
            callable,
            args,
            kw,
            self._cancelled,
            self._push,
            seconds=self.seconds,
        )
        self._push(call)
        return call

    def _push(self, call: DelayedCall) -> None:
        self._count += 1
        heapq.heappush(self._heap, (call.getTime(), self._count, call))

    def _cancelled(self, call: DelayedCall) -> None:
        pass

    def _ready(self, entry: tuple[float, int, DelayedCall]) -> bool:
        """
        Whether the heap's C{entry} is a call to run at its time; a call
        postponed since (L{DelayedCall.reset} later only delays it) goes
        back in at its new time, a cancelled, done or moved one is dropped.
        """
        due, _, call = entry
        if call.cancelled or call.called:
            return False
        time = call.getTime()
        if time == due:
            return True
        if time > due and call.delayed_time:
            call.activate_delay()
            self._push(call)
        return False

    def next_due(self) -> float | None:
        """
        When the next call is due, or C{None}.
        """
        heap = self._heap
        while heap:
            due, _, call = heap[0]
            if not (call.cancelled or call.called) and call.getTime() == due:
                return due
            self._ready(heapq.heappop(heap))
        return None

    def getDelayedCalls(self) -> list[DelayedCall]:
        return sorted(
            {
                id(c): c for _, _, c in self._heap if not (c.cancelled or c.called)
            }.values(),
            key=lambda c: c.getTime(),
        )

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        heap = self._heap
        while heap and heap[0][0] <= self.rightNow:
            entry = heapq.heappop(heap)
            if not self._ready(entry):
                continue
            call = entry[2]
            call.called = 1
            call.func(*call.args, **call.kw)
