"""The Lua scripts genx-ray runs in Redis, in one catalogue (the run queue's and concurrency
keys' stand beside it in :mod:`genx_ray.store._queue_scripts`).

Each script touches the keys of one run (or of one LLM budget, the run queue, one concurrency
key: each under a hash tag of its own) only, so it stays valid on Redis Cluster. The fencing
check, "is this attempt still the run's live attempt", is written once (:data:`_HOLDS`) and
included by every script that writes on behalf of an attempt: a host that was frozen,
partitioned or superseded can write nothing once the run moved on.

A run's event goes into its stream as ``t <type> e <json>`` (see :mod:`genx_ray.store.keys`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from genx_ray.store._connections import is_cluster

log = logging.getLogger("genx_ray.lua")


class Script:
    """A Lua script run by its SHA (``EVALSHA``), loaded on first use or after a Redis restart
    (``NOSCRIPT``): with a single Redis, a Redis Cluster (``SCRIPT LOAD`` goes to every primary;
    a replica promoted by a failover has an empty cache, and loads it again the same way), async
    and sync clients, alone or many per pipeline (:func:`execute_scripts`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def sync(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


Call = tuple[Script, Sequence[str], Sequence[Any]]

# How long, on a Redis Cluster, the calls of a node that cannot be reached (a master killed, its
# replica not yet promoted) are retried before each gets the error as its result. As long as a
# single Redis's outage is retried by the writer (genx_ray.store._writer.REDIS_OUTAGE_BUDGET).
CLUSTER_RETRY_SECONDS = 30.0
# Errors of a cluster node that is down or moving slots: the call did not run (or, for a timeout,
# may have: as with a single Redis, such a call can run twice); it may later.
_NOT_NOW = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError,
            SlotNotCoveredError, ReadOnlyError, OSError)  # fmt: skip
_FOR_GOOD = (AuthenticationError, AuthorizationError)  # ConnectionErrors that retrying won't fix
# What finding the nodes, or a node's pipeline, raises when no node answers at all.
_NO_NODE = (*_NOT_NOW, RedisClusterException)


async def execute_scripts(
    client: Any, calls: Sequence[Call], *, retry_for: float = CLUSTER_RETRY_SECONDS
) -> list[Any]:
    """Run many script calls in one pipeline (one round trip per node); each call's result, or
    the error it raised, in order.

    A single Redis: a connection error raises (nothing is known of the batch; the caller retries
    it whole). A Redis Cluster: one pipeline per node, concurrently, so a node that cannot be
    reached holds back only its own calls: those are retried (alone, every node's others being
    done and never sent twice) for up to ``retry_for`` seconds, then each gets the error.
    """
    if not calls:
        return []
    if is_cluster(client):
        results = await _execute_on_cluster(client, calls, retry_for)
    else:
        results = await _pipeline(client, calls)
    for i, result in enumerate(results):
        if isinstance(result, NoScriptError):  # Redis restarted since: load, then run it alone
            script, keys, args = calls[i]
            try:
                results[i] = await script(client, keys, args)
            except Exception as exc:
                results[i] = exc
    return results


async def _pipeline(client: Any, calls: Sequence[Call]) -> list[Any]:
    async with client.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
    return results


async def _execute_on_cluster(client: Any, calls: Sequence[Call], retry_for: float) -> list[Any]:
    # redis-py's cluster pipeline sends each node's part concurrently, but when one node fails
    # it raises for the whole batch (and may resend what other nodes were still running):
    # nothing says which calls ran. One pipeline per node keeps every outcome known.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    delay = 0.05
    while True:
        failed: list[int] = []
        error: BaseException | None = None
        try:
            await client.initialize()  # a no-op unless a failure asked for a new slot map
            groups: dict[str, list[int]] = {}
            for i in todo:
                node = client.get_node_from_key(calls[i][1][0])
                groups.setdefault(node.name, []).append(i)
        except _NO_NODE as exc:
            failed, error = todo, exc
            groups = {}
        outcomes = await asyncio.gather(
            *(_pipeline(client, [calls[i] for i in group]) for group in groups.values()),
            return_exceptions=True,
        )
        for group, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # cancelled: the others' results do not matter any more
                if isinstance(outcome, _NO_NODE) and not isinstance(outcome, _FOR_GOOD):
                    failed += group
                    error = outcome
                else:  # that node's calls failed for good; the others' stand
                    for i in group:
                        results[i] = outcome
                continue
            for i, result in zip(group, outcome, strict=True):
                if isinstance(result, _NOT_NOW) and not isinstance(result, _FOR_GOOD):
                    failed.append(i)
                    error = result
                else:
                    results[i] = result
        if not failed:
            return results
        if loop.time() + delay > deadline:
            for i in failed:
                results[i] = error
            return results
        log.warning("Redis Cluster: %d script call(s) not run (%s); retrying in %.2fs",
                    len(failed), error, delay)  # fmt: skip
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
        todo = sorted(failed)


# Defines holds(run_key, attempt): the run's status when ``attempt`` ('' = any) is its live
# attempt, else nil and the reason ('MISSING', or 'FENCED <status> <attempt>').
_HOLDS = """
local function holds(run_key, attempt)
  local st = redis.call('HMGET', run_key, 'status', 'attempt')
  if not st[1] then return nil, 'MISSING' end
  if attempt ~= '' and st[2] ~= attempt then
    return nil, 'FENCED ' .. st[1] .. ' ' .. tostring(st[2])
  end
  return st[1]
end
"""

# KEYS: run hash, events stream, journal hash, children set.
# ARGV: allowed current statuses (space separated), target status, attempt to fence on ('' = any),
#       event type ('' = no event), event JSON, stream maxlen, seconds to expire the run's keys in
#       ('' = keep), then field/value pairs to set.
# Returns the event's id ('' without one); errors MISSING, FENCED <status>, INVALID <status>.
TRANSITION = Script(
    _HOLDS
    + """
local cur, why = holds(KEYS[1], ARGV[3])
if not cur then return redis.error_reply(why) end
if not string.find(' ' .. ARGV[1] .. ' ', ' ' .. cur .. ' ', 1, true) then
  return redis.error_reply('INVALID ' .. cur)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = ''
if ARGV[4] ~= '' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', ARGV[4], 'e', ARGV[5])
end
if ARGV[7] ~= '' then
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
end
return id
"""
)

# KEYS: run hash, events stream, journal hash. ARGV: first event type (run.queued or
# run.scheduled), its JSON, maxlen, n journal entries, then n journal field/value pairs (a
# rerun's entries reused from the run it reruns), then the run's field/value pairs.
# Creates the run (and its journal) only if it does not exist yet (a retried create must never
# reset a run).
CREATE = Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[4])
for i = 5, 4 + 2 * n, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
for i = 5 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 't', ARGV[1], 'e', ARGV[2])
return 1
""")

# KEYS: run hash. ARGV: a rerun's id, how many to keep.
# Adds a rerun to the run it reruns (the ``reruns`` field: ids, oldest first, the newest kept),
# if that run still exists. Nothing else of the run changes.
LINK_RERUN = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ids = {}
for id in string.gmatch(redis.call('HGET', KEYS[1], 'reruns') or '', '%S+') do
  if id ~= ARGV[1] then ids[#ids + 1] = id end
end
ids[#ids + 1] = ARGV[1]
local keep = tonumber(ARGV[2])
while #ids > keep do table.remove(ids, 1) end
redis.call('HSET', KEYS[1], 'reruns', table.concat(ids, ' '))
return 1
""")

# KEYS: run hash, events stream, journal, children set. ARGV: run.cancelled event JSON, maxlen,
# now, retention.
# Queued, scheduled or waiting (no host holds it): cancelled at once. Running: flagged; its host
# stops it (told through the signals stream, or at its next lease renewal). Returns the status
# after the call.
CANCEL = Script("""
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return redis.error_reply('MISSING') end
if cur == 'queued' or cur == 'scheduled' or cur == 'waiting' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[3],
             'cancel_requested', '1')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 't', 'run.cancelled', 'e', ARGV[1])
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
  return 'cancelled'
end
if cur == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return cur
""")

# KEYS: run hash, events stream, journal hash.
# ARGV: attempt, maxlen, n_events, then n (type, JSON) pairs, then journal field/value pairs.
# Appends only while ``attempt`` runs the run; returns the entry ids.
APPEND = Script(
    _HOLDS
    + """
local cur, why = holds(KEYS[1], ARGV[1])
if cur ~= 'running' then return redis.error_reply(why or ('FENCED ' .. cur)) end
local n = tonumber(ARGV[3])
for i = 4 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
local ids = {}
for i = 4, 3 + 2 * n, 2 do
  ids[#ids + 1] = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
                             't', ARGV[i], 'e', ARGV[i + 1])
end
return ids
"""
)

# KEYS: run hash, lease. ARGV: attempt, ttl ms.
# 1 = renewed; 2 = renewed, and a cancel was requested; 0 = this attempt is superseded.
RENEW = Script(
    _HOLDS
    + """
local cur = holds(KEYS[1], ARGV[1])
if cur ~= 'running' then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 2 end
return 1
"""
)

# KEYS: run hash, events stream, journal hash, lease, children set (expires with the run).
# ARGV: attempt, terminal status, event type, event JSON, maxlen, retention seconds, then
# field/value pairs to set.
# Ends a running attempt: its terminal status and event, the run's keys set to expire, and its
# lease released (if it still holds it), in one call. Returns the event's id; errors MISSING,
# FENCED <status>, INVALID <status>.
FINISH = Script(
    _HOLDS
    + """
local cur, why = holds(KEYS[1], ARGV[1])
if not cur then return redis.error_reply(why) end
if cur ~= 'running' then return redis.error_reply('INVALID ' .. cur) end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 't', ARGV[3], 'e', ARGV[4])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
if KEYS[5] then redis.call('EXPIRE', KEYS[5], ARGV[6]) end
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
return id
"""
)

# KEYS: lease. ARGV: attempt. Deletes the lease only if this attempt still holds it.
RELEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

# KEYS: run hash, events stream, journal, lease, children set (expires with the run).
# ARGV: attempt seen, max attempts, run.restarted JSON, run.failed JSON, error JSON, now, maxlen,
#       retention seconds, '1' when the host is known dead (then a live lease does not protect).
# An attempt whose host is gone: requeued as the next attempt, or failed once ``max attempts``
# have been lost (or at once for a run started from a script, ``origin`` = local).
# Returns 'requeued', 'failed', 'alive' (its lease still holds), 'raced' (another attempt now)
# or 'gone' (the run is not running).
REAP = Script(
    _HOLDS
    + """
local cur, why = holds(KEYS[1], ARGV[1])
if not cur then
  if why == 'MISSING' then return 'gone' end
  return 'raced'
end
if cur ~= 'running' then return 'gone' end
if ARGV[9] ~= '1' and redis.call('EXISTS', KEYS[4]) == 1 then return 'alive' end
redis.call('DEL', KEYS[4])
-- Attempts lost so far (a parked run's resumes are attempts too, but not losses). A run
-- started from a script (genx_ray.start) is failed at once: workers may lack its code.
local lost = tonumber(redis.call('HGET', KEYS[1], 'lost') or '0') + 1
redis.call('HSET', KEYS[1], 'lost', lost)
if lost >= tonumber(ARGV[2]) or redis.call('HGET', KEYS[1], 'origin') == 'local' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[5], 'finished_at', ARGV[6])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 't', 'run.failed', 'e', ARGV[4])
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
  if KEYS[5] then redis.call('EXPIRE', KEYS[5], ARGV[8]) end
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempt', tonumber(ARGV[1]) + 1,
           'requeued_at', ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 't', 'run.restarted', 'e', ARGV[3])
return 'requeued'
"""
)

# KEYS: run hash, events stream, journal hash, lease.
# ARGV: attempt, run.started event JSON, maxlen, lease ttl ms ('' = no lease), then field/value
# pairs to set.
# Claims a queued run for ``attempt``: moves it to running with its event and takes its lease,
# and returns the run's fields and its journal (flat lists), all in one round trip.
# Errors: MISSING, FENCED, INVALID <status>.
CLAIM = Script(
    _HOLDS
    + """
local cur, why = holds(KEYS[1], ARGV[1])
if not cur then return redis.error_reply(why) end
if cur ~= 'queued' then return redis.error_reply('INVALID ' .. cur) end
redis.call('HSET', KEYS[1], 'status', 'running')
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[4]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 't', 'run.started', 'e', ARGV[2])
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[3])}
"""
)

# KEYS: run hash, events stream. ARGV: attempt, reason, event JSON, stream maxlen.
# A run.queued event saying why a queued attempt still waits, once per attempt and reason (and
# only while it is queued: never after its end). Returns 1 if written.
QUEUED_BECAUSE = Script("""
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'queued_because')
local mark = ARGV[1] .. ':' .. ARGV[2]
if st[1] ~= 'queued' or st[2] ~= ARGV[1] or st[3] == mark then return 0 end
redis.call('HSET', KEYS[1], 'queued_because', mark)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 't', 'run.queued', 'e', ARGV[3])
return 1
""")

# KEYS: the leases set. ARGV: cap, run id, now, oldest renewal of a live lease.
# Admits (and watches) the run if the live leases are under the cluster-wide cap.
ADMIT = Script("""
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if redis.call('ZCOUNT', KEYS[1], ARGV[4], '+inf') >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
""")

# KEYS: an LLM budget's keys (conc, req, tok, pause, waiting; genx_ray.store.keys.BudgetKeys).
# ARGV: now ms, id prefix, lease ms, conc cap, rpm, tpm (0 = no cap), this process's id, then the
# token estimate of each caller waiting, in order.
# Grants slots to the first callers while the budget allows; the process stays listed in
# 'waiting' while some of its callers still wait. Returns {granted, ms to wait at least (0: until
# a release), how many other processes have callers waiting}. Slot i's id is '<prefix>-<i>'.
LLM_ACQUIRE = Script("""
local now = tonumber(ARGV[1])
local me = ARGV[7]
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
redis.call('ZADD', KEYS[5], now + 2000, me)
local others = redis.call('ZCARD', KEYS[5]) - 1
local paused = redis.call('PTTL', KEYS[4])
if paused > 0 then return {0, paused, others} end
local conc, rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local held, requests, used = 0, 0, 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  held = redis.call('ZCARD', KEYS[1])
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  requests = redis.call('ZCARD', KEYS[2])
end
if tpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 60000)
  for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    used = used + tonumber(string.match(member, ':(%d+)$'))
  end
end
local granted, wait = 0, 0
for i = 8, #ARGV do
  local tokens = tonumber(ARGV[i])
  if conc > 0 and held >= conc then break end
  if rpm > 0 and requests >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    wait = tonumber(oldest[2]) + 60000 - now
    break
  end
  if tpm > 0 and used > 0 and used + tokens > tpm then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    wait = tonumber(oldest[2]) + 60000 - now
    break
  end
  local id = ARGV[2] .. '-' .. (granted + 1)
  if conc > 0 then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id) end
  if rpm > 0 then redis.call('ZADD', KEYS[2], now, id) end
  if tpm > 0 then redis.call('ZADD', KEYS[3], now, id .. ':' .. tokens) end
  held, requests, used, granted = held + 1, requests + 1, used + tokens, granted + 1
end
if granted > 0 then
  if rpm > 0 then redis.call('PEXPIRE', KEYS[2], 61000) end
  if tpm > 0 then redis.call('PEXPIRE', KEYS[3], 61000) end
end
if granted == #ARGV - 7 then redis.call('ZREM', KEYS[5], me) end
redis.call('PEXPIRE', KEYS[5], 5000)
return {granted, wait, others}
""")

# KEYS: an LLM budget's conc and tok. ARGV: (id, estimated tokens, actual tokens or -1 if
# unknown) per slot. Frees the slots and corrects their token estimates.
LLM_RELEASE = Script("""
for i = 1, #ARGV, 3 do
  redis.call('ZREM', KEYS[1], ARGV[i])
  if tonumber(ARGV[i + 2]) >= 0 then
    local old = ARGV[i] .. ':' .. ARGV[i + 1]
    local score = redis.call('ZSCORE', KEYS[2], old)
    if score then
      redis.call('ZREM', KEYS[2], old)
      redis.call('ZADD', KEYS[2], score, ARGV[i] .. ':' .. ARGV[i + 2])
    end
  end
end
return 1
""")

# KEYS: an LLM budget's pause. ARGV: ms. Extends the pause; never shortens one in force.
LLM_PAUSE = Script("""
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
""")


# KEYS: run hash, events stream, journal hash, lease.
# ARGV: attempt, the wait's step (journal field), '1' when the wait is over if that field is in
# the journal already ('' = park anyway), maxlen, n events, then n (type, JSON) pairs, then
# field/value pairs describing the wait (wait_kind, wait_step...).
# Parks a running attempt: the run becomes ``waiting`` as the next attempt (so nothing more of
# this one is written), its lease released, no host holding it. Returns 'parked', or 'ready'
# when what it would wait for is already in the journal (a child that ended meanwhile).
PARK = Script(
    _HOLDS
    + """
local cur, why = holds(KEYS[1], ARGV[1])
if cur ~= 'running' then return redis.error_reply(why or ('FENCED ' .. cur)) end
if ARGV[3] == '1' and redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return 'ready' end
redis.call('HSET', KEYS[1], 'status', 'waiting', 'attempt', tonumber(ARGV[1]) + 1,
           'wait_step', ARGV[2])
local n = tonumber(ARGV[5])
for i = 6 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 6, 5 + 2 * n, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 't', ARGV[i], 'e', ARGV[i + 1])
end
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
return 'parked'
"""
)

# Fields describing a wait, cleared on resume.
WAIT_FIELDS = (
    "wait_kind", "wait_step", "input_id", "input_schema", "wait_prompt", "wait_deadline",
    "wait_until", "wait_child", "wait_hash",
)  # fmt: skip

# KEYS: run hash, events stream, journal hash.
# ARGV: the wait's step, its journal entry ('' = none), now, maxlen, n events, then n (type,
# JSON) pairs.
# Resumes a run parked on that step: the journal entry written (what the wait returns), the run
# queued again (its attempt was moved on when it parked), the events appended. Returns the
# attempt to queue, or 0 when the run is not waiting on that step (another resumed it first).
RESUME = Script(
    """
local st = redis.call('HMGET', KEYS[1], 'status', 'wait_step', 'attempt')
if st[1] ~= 'waiting' or st[2] ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) end
redis.call('HSET', KEYS[1], 'status', 'queued', 'requeued_at', ARGV[3])
redis.call('HDEL', KEYS[1], """
    + ", ".join(f"'{f}'" for f in WAIT_FIELDS)
    + """)
local n = tonumber(ARGV[5])
for i = 6, 5 + 2 * n, 2 do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 't', ARGV[i], 'e', ARGV[i + 1])
end
return tonumber(st[3])
"""
)

# KEYS: the parent's run hash, events stream, journal hash.
# ARGV: the step the parent awaits the child's outcome on, the outcome (journal entry), now,
# child.finished JSON, run.resumed JSON (for when the parent waits on it), maxlen.
# Delivers a child run's outcome to its parent once: journaled (so a parent that asks later
# gets it without waiting), and the parent resumed if it waits on it. Returns the attempt to
# queue, 0 when the parent does not wait on it (yet), -1 when it was delivered before.
CHILD_DONE = Script(
    """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', 'child.finished', 'e', ARGV[4])
local st = redis.call('HMGET', KEYS[1], 'status', 'wait_step', 'attempt')
if st[1] ~= 'waiting' or st[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'requeued_at', ARGV[3])
redis.call('HDEL', KEYS[1], """
    + ", ".join(f"'{f}'" for f in WAIT_FIELDS)
    + """)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', 'run.resumed', 'e', ARGV[5])
return tonumber(st[3])
"""
)

# KEYS: run hash, events stream. ARGV: run.queued JSON, now, maxlen.
# A scheduled run whose time came: queued, once. Returns 1, or 0 if it is not scheduled (any
# more: cancelled, or started by another timer service).
START_SCHEDULED = Script("""
if redis.call('HGET', KEYS[1], 'status') ~= 'scheduled' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'queued_at', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 't', 'run.queued', 'e', ARGV[1])
return 1
""")

# KEYS: the schedules' due set. ARGV: schedule id, the due time seen, the next due time.
# Advances a schedule from the due time seen to the next, once (compare and set): 1 when this
# caller did it, 0 when another did first (or the schedule was deleted).
ADVANCE_SCHEDULE = Script("""
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
""")

# KEYS: an idempotency key. ARGV: the value seen ('' = none), the new value, ttl seconds.
# Takes the key for a new run if it still holds what was seen (absent, or a run that expired):
# 1 taken, 0 another request took it first.
TAKE_IDEMPOTENCY = Script("""
local held = redis.call('GET', KEYS[1])
if (held or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
""")

# KEYS: the tenant's schedule index, the schedule records, the due set (one slot).
# ARGV: schedule id, created at, most schedules, record JSON, first due time.
# Creates the schedule unless the tenant has ``most`` already: 1 created, 0 full.
CREATE_SCHEDULE = Script("""
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
return 1
""")

# KEYS: the tenant's schedule index, the schedule records, the due set (one slot).
# ARGV: the previous page's last creation time ('-inf' for the first page) and id, page size.
# A page of the tenant's schedules, oldest first: {id, record, due time or false}... then 1 if
# more follow, else 0. Ids of one creation time sort by id; ids whose record is gone (a delete
# racing, an old create that died half-way) leave the index here.
LIST_SCHEDULES = Script("""
local after, after_id, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local raw = redis.call('ZRANGEBYSCORE', KEYS[1], after, '+inf', 'WITHSCORES', 'LIMIT', 0,
                       limit + 1 + 16)
local floor = after == '-inf' and -math.huge or tonumber(after)
local out, taken = {}, 0
for i = 1, #raw, 2 do
  local id, score = raw[i], tonumber(raw[i + 1])
  if score > floor or id > after_id then
    if taken == limit then
      out[#out + 1] = 1
      return out
    end
    local record = redis.call('HGET', KEYS[2], id)
    if record then
      out[#out + 1] = id
      out[#out + 1] = record
      out[#out + 1] = redis.call('ZSCORE', KEYS[3], id) or false
      out[#out + 1] = raw[i + 1]
      taken = taken + 1
    else
      redis.call('ZREM', KEYS[1], id)
    end
  end
end
-- A scan that came back full may have left some behind: more may follow.
out[#out + 1] = (#raw == 2 * (limit + 17)) and 1 or 0
return out
""")

# KEYS: a hash. ARGV: field, value. Sets the field only if it exists (a record deleted meanwhile
# stays deleted): 1 set, 0 not.
HSET_IF_EXISTS = Script("""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
""")

# KEYS: the timers set. ARGV: run id, the due time seen.
# Removes a run's timer once it has been dealt with, unless it was set again meanwhile (a run
# resumed and parked again on a new wait has a new due time).
TIMER_DONE = Script("""
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due and tonumber(due) == tonumber(ARGV[2]) then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
""")

# KEYS: the tenant's token bucket (hash), its open runs (sorted set). ARGV: runs per minute (0:
# no rate limit), most runs open (0: no cap), now (unix seconds).
# A tenant's quota for one more run: 0 when it may start one (a token taken), else the
# milliseconds to wait before a token is back (rate), or -1 when too many of its runs are open.
ADMIT_RUN = Script("""
local per_minute, most, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if most > 0 and redis.call('ZCARD', KEYS[2]) >= most then return -1 end
if per_minute <= 0 then return 0 end
local rate = per_minute / 60
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or per_minute
local at = tonumber(held[2]) or now
tokens = math.min(per_minute, tokens + math.max(0, now - at) * rate)
if tokens < 1 then return math.ceil((1 - tokens) / rate * 1000) + 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(60 / rate) + 60)
return 0
""")


# KEYS: a run's batches hash, its run hash.
# ARGV: the round's field, its record (JSON), ttl seconds, n responses, then n (field, JSON)
# pairs, then (run hash counter, amount) pairs.
# A map(llm="batch") round read: its responses, their usage and its record together, or
# nothing (an attempt that dies while reading leaves the round to read again).
BATCH_READ = Script("""
local n = tonumber(ARGV[4])
for i = 5, 4 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 5 + 2 * n, #ARGV, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return n
""")
