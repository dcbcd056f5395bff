"""
Store backends (L{cim.interfaces.IStore}): in memory, and Redis.
"""
