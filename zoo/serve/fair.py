"""Fair sharing of one engine between tenants: vLLM's scheduler with a virtual token counter.

vLLM admits waiting requests first come, first served: a tenant with 300 requests queued
makes every other tenant wait behind all of them. ``FairScheduler`` (vLLM's own extension
point, ``--scheduler-cls``) keeps vLLM's scheduling and replaces its waiting queue with
one queue per tenant, served by the Virtual Token Counter (Sheng et al., "Fairness in
Serving Large Language Models", OSDI 2024):

* every token the engine schedules is charged to its tenant's counter, a prompt token
  ``PREFILL_COST`` and a generated one ``DECODE_COST``, divided by the tenant's weight
  (``"weight"`` in the keys file; base requests count for their tenant too);
* the next request admitted is the head of the backlogged tenant with the lowest
  counter, so backlogged tenants receive service in proportion to their weights; a request
  admitted counts at once for its prompt (VTC charges a prompt on admission), so that the
  several admitted in one step are shared by weight too, not all given to one tenant;
* a tenant that was idle rejoins at the lowest counter of those waiting, or when nobody
  waits at the counter of the last tenant served (it cannot bank credit while idle), and
  an idle tenant's share goes to the others (work-conserving);
* when every place in the batch is taken and the tenant next in line holds fewer than
  half its share of the places (the batch's places x its weight / the weights of the
  tenants running or waiting; none at all, when a share is below two places), the newest
  request of the tenant furthest above its share makes room (vLLM's own preemption: its
  KV blocks are freed and it is computed again when re-admitted, for a short request a
  step's work). Without it a tenant that holds every place makes the next one wait until
  one of its requests ends, however long (measured: 12 engine steps for 16-token
  requests, admitted in waves). One request makes room per step; a tenant never gives a
  place that would leave it below its share. Half, not all of it: the counters keep the
  shares between backlogged tenants, and a place taken back for every one-place swing
  of theirs was measured to cost the weighted tenant 9% of its service.

Which tenant a request belongs to travels from the middleware to the engine inside
``cache_salt`` (``zoo1.TENANT.HMAC``), which the middleware always overwrites: a client
cannot forge it, and it reaches the engine from every generating route. A request
without one (a server without tenants) belongs to ``-``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler

from zoo.serve.policy import tenant_of_salt

logger = logging.getLogger("zoo.serve")

PREFILL_COST = 1.0  # VTC's w_p and w_q: a generated token costs twice a prompt token
DECODE_COST = 2.0
WEIGHTS_REFRESH_S = 2.0


def tenant_of(request) -> str:
    return tenant_of_salt(getattr(request, "cache_salt", None))


def prefill_tokens(request, tokens: int) -> int:
    """How many of the ``tokens`` scheduled for ``request`` this step are input computed,
    not a token generated: a prompt, or a preempted request's prompt and output again."""
    if request.num_output_tokens == 0:
        return max(0, min(tokens, request.num_prompt_tokens - request.num_computed_tokens))
    return max(0, min(tokens, request.num_tokens - 1 - request.num_computed_tokens))


def tenant_to_make_room(next_tenant: str, seats: Counter, waiting: Iterable[str],
                        weight_of: Callable[[str], float], places: int) -> str | None:
    """Whose request gives up its place to ``next_tenant`` when all ``places`` are taken
    (``seats``: places held per tenant), or None: only a tenant holding fewer than half
    its share takes one, and only from the tenant furthest above its share, if that one
    keeps at least its share."""
    tenants = set(seats) | set(waiting) | {next_tenant}
    weights = {t: max(weight_of(t), 1e-6) for t in tenants}
    total = sum(weights.values())
    share = {t: places * w / total for t, w in weights.items()}
    if seats[next_tenant] >= share[next_tenant] / 2:
        return None
    others = [t for t in seats if t != next_tenant and seats[t] > 0]
    if not others:
        return None
    victim = max(others, key=lambda t: (seats[t] - share[t], t))
    return victim if seats[victim] - 1 >= share[victim] else None


class Weights:
    """Tenant weights from the server's keys file (re-read when it changes; 1 by default)."""

    def __init__(self, path: str | None):
        self.path = path
        self.weights: dict[str, float] = {}
        self._checked = 0.0
        self._stamp = None

    def __call__(self, tenant: str) -> float:
        now = time.monotonic()
        if self.path and now - self._checked > WEIGHTS_REFRESH_S:
            self._checked = now
            self._reload()
        return self.weights.get(tenant, 1.0)

    def _reload(self) -> None:
        from zoo.serve.policy import load_tenants

        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                self.weights = {t.name: t.weight for t in load_tenants(self.path)}
                self._stamp = stamp
        except Exception as error:  # noqa: BLE001 - keep the last weights, never stop the engine
            logger.warning("zoo: tenant weights not re-read (%s); keeping the last ones", error)


class FairQueue(RequestQueue):
    """vLLM's waiting queue, one FIFO per tenant, served lowest virtual counter first.

    ``peek_request`` and the ``pop_request`` after it return the same request (the choice
    depends on the queues and counters only, which a peek does not change)."""

    def __init__(self, weight_of):
        self.queues: dict[str, deque] = {}
        self.counters: dict[str, float] = {}
        self.weight_of = weight_of
        self.size = 0
        self.joined: dict[str, int] = {}  # when each tenant last became backlogged
        self._joins = 0
        self.last_served: str | None = None
        # the prompts of the requests popped in this scheduling step, charged once the
        # step's tokens are (settle): until then they count towards the next choice
        self.in_step: dict[str, float] = {}

    # service accounting
    def charge(self, tenant: str, cost: float) -> None:
        weight = max(self.weight_of(tenant), 1e-6)
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / weight

    def settle(self) -> None:
        """The step's tokens have been charged (prompts included): forget the estimates."""
        self.in_step.clear()

    def _counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0) + self.in_step.get(tenant, 0.0)

    def backlogged(self) -> list[str]:
        return [t for t, q in self.queues.items() if q]

    def next_tenant(self) -> str:
        """The tenant whose request the next pop returns."""
        # lowest counter first; on a tie, the tenant that became backlogged last (one that
        # just rejoined at the others' level goes before them, not after all of them)
        waiting = [(self._counter(t), -self.joined.get(t, 0), t)
                   for t, q in self.queues.items() if q]
        if not waiting:
            raise IndexError("pop from an empty queue")
        return min(waiting)[2]

    def _queue(self, request) -> deque:
        tenant = tenant_of(request)
        queue = self.queues.get(tenant)
        if queue is None:
            queue = self.queues[tenant] = deque()
        if not queue:  # rejoins: no credit for the time it was idle
            waiting = [self._counter(t) for t, q in self.queues.items() if q]
            if not waiting and self.last_served is not None:  # nobody waits: VTC lifts it
                waiting = [self._counter(self.last_served)]  # to the last one served
            if waiting:
                self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(waiting))
            self._joins += 1
            self.joined[tenant] = self._joins
        return queue

    # vLLM's RequestQueue
    def add_request(self, request) -> None:
        self._queue(request).append(request)
        self.size += 1

    def pop_request(self):
        tenant = self.last_served = self.next_tenant()
        request = self.queues[tenant].popleft()
        self.size -= 1
        prompt = max(1, request.num_prompt_tokens - request.num_computed_tokens)
        weight = max(self.weight_of(tenant), 1e-6)
        self.in_step[tenant] = self.in_step.get(tenant, 0.0) + prompt * PREFILL_COST / weight
        return request

    def peek_request(self):
        return self.queues[self.next_tenant()][0]

    def prepend_request(self, request) -> None:
        self._queue(request).appendleft(request)
        self.size += 1

    def prepend_requests(self, requests: Iterable) -> None:
        # as vLLM's FCFS queue (extendleft): the scheduler hands them over reversed
        for request in requests:
            self.prepend_request(request)

    def remove_request(self, request) -> None:
        self.queues[tenant_of(request)].remove(request)
        self.size -= 1

    def remove_requests(self, requests: Iterable) -> None:
        doomed = {id(r) for r in requests}
        for tenant, queue in self.queues.items():
            kept = deque(r for r in queue if id(r) not in doomed)
            self.size -= len(queue) - len(kept)
            self.queues[tenant] = kept

    def __bool__(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator:
        for queue in list(self.queues.values()):
            yield from list(queue)


class _Fair:
    """What both schedulers add: the fair waiting queue and the charging of tokens."""

    def _make_fair(self) -> None:
        if len(self.waiting):  # pragma: no cover - vLLM builds it empty
            raise RuntimeError("the waiting queue is not empty at start")
        self.waiting = FairQueue(Weights(os.environ.get("ZOO_SERVE_API_KEYS")))
        logger.info("zoo: fair scheduling between tenants (virtual token counter)")

    def schedule(self, *args, **kwargs):
        self._make_room()
        return super().schedule(*args, **kwargs)

    def _make_room(self) -> None:
        """Preempt one request for the tenant next in line if it holds less than half its
        share of the batch's places and they are all taken (see the module's docstring)."""
        taken = len(self.running) + self.num_waiting_for_streaming_input
        if not self.waiting or taken < self.max_num_active_reqs:
            return
        seats = Counter(tenant_of(r) for r in self.running)
        victim = tenant_to_make_room(self.waiting.next_tenant(), seats, self.waiting.backlogged(),
                                     self.waiting.weight_of, self.max_num_active_reqs)
        if victim is None or not self._adapter_fits(self.waiting.peek_request()):
            return
        for request in reversed(self.running):  # its newest: the least work to compute again
            if tenant_of(request) == victim and self._request_blocks_can_be_freed(request):
                self.running.remove(request)
                self._preempt_request(request, time.monotonic())
                return

    def _adapter_fits(self, request) -> bool:
        """Whether the request's adapter has a slot in the batch as it runs (vLLM skips a
        request whose adapter has none: a place made for it would go to another)."""
        lora = getattr(request, "lora_request", None)
        if lora is None or self.lora_config is None:
            return True
        running = {r.lora_request.lora_int_id for r in self.running if r.lora_request}
        return lora.lora_int_id in running or len(running) < self.lora_config.max_loras

    def _update_after_schedule(self, scheduler_output) -> None:
        for request_id, tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            prefill = prefill_tokens(request, tokens)
            self.waiting.charge(tenant_of(request),
                                prefill * PREFILL_COST + (tokens - prefill) * DECODE_COST)
        self.waiting.settle()
        super()._update_after_schedule(scheduler_output)


class FairScheduler(_Fair, Scheduler):
    """For engines without async scheduling (vLLM's CPU platform)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._make_fair()


class FairAsyncScheduler(_Fair, AsyncScheduler):
    """For engines with async scheduling (GPUs)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._make_fair()


FAIR_SCHEDULER = f"{__name__}.FairScheduler"
FAIR_ASYNC_SCHEDULER = f"{__name__}.FairAsyncScheduler"
