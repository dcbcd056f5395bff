"""
The L{cim.interfaces.IStore} kept in Redis:

  - L{cim.store.redis.store}: L{RedisStore}, L{connect_redis}, and the key
    layout;
  - L{cim.store.redis.records}: what the values hold (stored messages,
    session records);
  - L{cim.store.redis.scripts}: the Lua scripts, one C{.lua} file each;
  - L{cim.store.redis.connection}: the only importer of txredisapi.

Redis URLs are parsed by L{cim.store.parse_redis_url}, outside this package,
so that checking one imports no txredisapi.
"""

from cim.store.redis.scripts import Script
from cim.store.redis.store import RedisStore, connect_redis

#: The name of L{Script} before the store became a package.
_Script = Script

__all__ = ["RedisStore", "Script", "connect_redis"]
