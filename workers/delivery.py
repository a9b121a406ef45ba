"""Which deliveries of a sync request run, and their replies, in one round trip each.

A queue message carries one request (chat) or several that one API process
coalesced (embeddings, rerank). For all of a message's requests together, one
Lua script checks each request's cancel mark and answered mark, claims it for
this replica, and publishes "accepted" for those that will run; one pipeline
later publishes their final replies and marks them answered. Replies go to the
API process that sent the request: for a batched message on its
`<instance>.group` channel, as `{"many": {request_id: reply}}`, which its
result router fans out; for a message of one request on the request's own
channel, which is all an API process of an earlier release listens to.

A copy of a request whose claim is held by a replica that has died is taken
over here (the broker redelivered it); a copy that a live replica holds is
skipped, and so is a copy of an attempt that was answered already.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from app.keys import KeySpace

#: KEYS: cancel, answered and claim key of each request; ARGV: this replica's id, the
#: accepted reply (JSON), the result channel prefix, then each request's id, attempt,
#: claim TTL and 1 if it came in a batched message. Returns one status per request:
#: "" (run it), "cancelled", "answered", or "held:<replica id>".
CLAIM_AND_ACCEPT = """
local me, accepted, prefix = ARGV[1], ARGV[2], ARGV[3]
local out, by_instance = {}, {}
for i = 1, #KEYS / 3 do
  local base = 4 * i
  local rid, attempt, ttl = ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2]
  local status = ''
  if redis.call('EXISTS', KEYS[3 * i - 2]) == 1 then
    status = 'cancelled'
  else
    local answered = redis.call('GET', KEYS[3 * i - 1])
    if answered and tonumber(answered) >= attempt then
      status = 'answered'
    elseif not redis.call('SET', KEYS[3 * i], me, 'NX', 'EX', ttl) then
      status = 'held:' .. (redis.call('GET', KEYS[3 * i]) or '')
    end
  end
  out[i] = status
  if status == '' and ARGV[base + 3] == '0' then
    redis.call('PUBLISH', prefix .. rid, accepted)
  elseif status == '' then
    local instance = string.match(rid, '^([^.]*)%.') or rid
    if not by_instance[instance] then by_instance[instance] = {} end
    table.insert(by_instance[instance], cjson.encode(rid) .. ':' .. accepted)
  end
end
for instance, parts in pairs(by_instance) do
  redis.call('PUBLISH', prefix .. instance .. '.group',
             '{"many":{' .. table.concat(parts, ',') .. '}}')
end
return out
"""

#: How long a request is remembered as answered: longer than any redelivery takes.
ANSWERED_TTL_S = 3600


@dataclass(frozen=True)
class Delivery:
    """One request of a queue message, as the API sent it."""

    request_id: str
    payload: dict[str, Any]
    deadline: float
    attempt: int = 0
    #: The caller's X-Request-Id, for the log lines written while serving it.
    trace: str | None = None
    #: Came in a batched message: its replies go out with its message's others.
    batched: bool = False

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Delivery:
        """One request of a batched message."""
        return cls(
            str(raw["request_id"]),
            raw.get("payload") or {},
            float(raw["deadline"]),
            int(raw.get("attempt") or 0),
            raw.get("trace"),
            batched=True,
        )

    @property
    def instance(self) -> str:
        """The API process waiting for it: request ids are `<instance>.<uuid>`."""
        return self.request_id.split(".", 1)[0]


@dataclass(frozen=True)
class Claimed:
    run: list[Delivery]
    cancelled: int = 0
    duplicates: int = 0


class Deliveries:
    def __init__(self, client: redis.Redis, keys: KeySpace, replica_id: str, label: str) -> None:
        self._client = client
        self._keys = keys
        self._me = replica_id
        self._accepted = json.dumps({"accepted": label, "replica_id": replica_id})
        self._claim_script = client.register_script(CLAIM_AND_ACCEPT)

    def _claim_key(self, delivery: Delivery) -> str:
        # A later attempt (the API asking again after its result channel dropped) runs
        # even if an earlier one answered: that answer may have reached nobody.
        name = delivery.request_id
        return self._keys.request_claim(f"{name}#{delivery.attempt}" if delivery.attempt else name)

    def claim(self, deliveries: list[Delivery]) -> Claimed:
        """The deliveries this replica should run, with "accepted" already published."""
        if not deliveries:
            return Claimed([])
        keys: list[str] = []
        args: list[Any] = [self._me, self._accepted, self._keys.result_channel("")]
        now = time.time()
        for d in deliveries:
            keys += [
                self._keys.cancel(d.request_id),
                self._keys.answered(d.request_id),
                self._claim_key(d),
            ]
            ttl = max(1, int(d.deadline - now) + 60)
            args += [d.request_id, d.attempt, ttl, int(d.batched)]
        statuses = self._claim_script(keys=keys, args=args)
        run: list[Delivery] = []
        taken_over: list[Delivery] = []
        cancelled = duplicates = 0
        for d, raw in zip(deliveries, statuses, strict=True):
            status = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not status:
                run.append(d)
            elif status == "cancelled":
                cancelled += 1
            elif status == "answered":
                duplicates += 1
            else:
                holder = status.removeprefix("held:")
                # A copy this very replica holds runs in another of its threads (the API
                # resent it while it sat prefetched here): running it again would double it.
                if holder and (holder == self._me or self.replica_alive(holder)):
                    duplicates += 1
                else:
                    taken_over.append(d)
        if taken_over:
            # Their replica died: these copies carry on here.
            pipe = self._client.pipeline(transaction=False)
            for d in taken_over:
                pipe.set(self._claim_key(d), self._me, ex=max(1, int(d.deadline - now) + 60))
            self._publish(pipe, [(d, self._accepted) for d in taken_over])
            pipe.execute()
            run += taken_over
        return Claimed(run, cancelled, duplicates)

    def replica_alive(self, replica_id: str) -> bool:
        return bool(self._client.exists(self._keys.replica_info(replica_id)))

    def reply(self, finals: list[tuple[Delivery, dict[str, Any]]]) -> None:
        """The last replies, and the marks that make later copies of these attempts skip."""
        if not finals:
            return
        pipe = self._client.pipeline(transaction=False)
        self._publish(pipe, [(d, json.dumps(message)) for d, message in finals])
        for d, _ in finals:
            pipe.set(self._keys.answered(d.request_id), d.attempt, ex=ANSWERED_TTL_S)
        pipe.execute()

    def _publish(self, pipe: Any, replies: list[tuple[Delivery, str]]) -> None:
        """One message per waiting API process, holding each of its requests' reply."""
        by_instance: dict[str, list[str]] = {}
        for d, encoded in replies:
            if not d.batched:
                pipe.publish(self._keys.result_channel(d.request_id), encoded)
                continue
            by_instance.setdefault(d.instance, []).append(f"{json.dumps(d.request_id)}:{encoded}")
        for instance, parts in by_instance.items():
            channel = self._keys.result_channel(f"{instance}.group")
            pipe.publish(channel, '{"many":{' + ",".join(parts) + "}}")
