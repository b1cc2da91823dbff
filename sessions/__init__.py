"""Session persistence: tokens, turns, metadata and the draft-cache blob, in Redis.

    store.py          the SessionStore contract and its records (SessionMeta, Turn, SessionRecord)
    redis_store.py    RedisStore: the one implementation (key layout in its docstring)
    redis_scripts.py  the Lua scripts that make each write atomic
    redis_codec.py    byte formats of tokens, turns and meta
    embedded.py       EmbeddedRedis (private redis-server under a data dir) and open_store()
    blob.py           draft-cache blob codec (imports torch, so it is not re-exported here)
"""

from lsrt.sessions.embedded import EmbeddedRedis, default_data_dir, open_store
from lsrt.sessions.redis_store import RedisStore
from lsrt.sessions.store import SessionMeta, SessionRecord, SessionStore, Turn

__all__ = [
    "EmbeddedRedis",
    "RedisStore",
    "SessionMeta",
    "SessionRecord",
    "SessionStore",
    "Turn",
    "default_data_dir",
    "open_store",
]
