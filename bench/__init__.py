"""
The cim benchmark: a harness (L{bench.harness}) that starts a real cluster
and load generator processes (L{bench.loadgen}), and a minimal forwarding
server (L{bench.raw_server}) that gives the stack's own limit.
"""
