"""cim: a distributed instant-messaging system on Twisted."""
