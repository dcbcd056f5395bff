"""
The test kit: one way to run cim's daemons and the services they need as
real processes, to wait for things, and to speak the wire protocol.

  - L{tests.kit.cluster}: C{twistd} daemons on port 0, their ports read
    back from their logs; a cluster of a route and servers; a group of
    processes stopped together.
  - L{tests.kit.services}: private Redis and ZooKeeper servers.
  - L{tests.kit.wait}: waiting on an event or a condition, with a deadline.
  - L{tests.kit.wire}: a raw client of the TCP protocol.
  - L{tests.kit.http}: JSON over HTTP to the daemons.
  - L{tests.kit.net}: a TCP link to cut, a port that refuses connections.

The benchmark (C{bench/}) runs its clusters with it too, so nothing here
imports pytest.
"""
