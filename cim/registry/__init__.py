"""
Registry backends (L{cim.interfaces.IRegistry}): in process, and ZooKeeper.
"""
