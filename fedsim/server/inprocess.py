"""An in-process :class:`~flwr.serverapp.Grid`: the ClientApp is called directly, no Ray.

:class:`InProcessGrid` gives a ServerApp (e.g. :func:`fedsim.server.app.run_server`) the same
contract as Flower's Simulation Engine, without starting Ray (``ray.init`` plus the first actor
cost ~12 s per run on a 2-core machine, more than a tiny federation's training):

* ``num_nodes`` virtual SuperNodes, node ids ``first_node_id + k``; node ``k`` has one
  :class:`~flwr.app.Context` with ``node_config = {"partition-id": k, "num-partitions": n}``
  and a ``state`` that persists across messages (rounds), like the engine's per-node run store;
* every message is delivered by calling the ClientApp in this process and thread, on a copy of
  the message and of the node's context (the engine pickles both to a Ray actor); the context the
  app leaves behind is kept only if the call succeeded, as the engine keeps the context its actor
  returns;
* a ClientApp that raises gives an error reply (:class:`~flwr.app.Error`, code
  ``CLIENT_APP_RAISED_EXCEPTION``) instead of an exception, as in the engine;
* replies get a fresh message id and keep ``reply_to_message_id`` / swapped node ids from
  ``Message(content, reply_to=msg)``.

Messages are delivered one after another when pushed, in push order; replies are returned in that
order. fedsim's :class:`~fedsim.server.app.OrderedGrid` sorts replies by partition anyway, so the
order does not change results.

Two additions for studies: ``absent`` nodes are listed as connected but never reply (their
replies are "lost", as with a node that misses Flower's ``timeout``: ``send_and_receive`` returns
fewer replies and the strategy aggregates the others), so a leave-one-out federation keeps the
other clients' data partition; ``on_reply(message, reply)`` sees every exchange (e.g. to measure
client updates).

Threads: the Ray backend gives each client actor ``OMP_NUM_THREADS = max(floor(client_cpus), 1)``
(unless the variable is already set), and torch's float results depend on the thread count. Pass
``num_threads`` to run the ClientApp calls with that many torch threads (the server side keeps the
process's setting, as the ServerApp does in the engine); see :func:`ray_client_threads`.

``timeout`` of :meth:`send_and_receive`: delivery is synchronous, so a ClientApp call that took
longer than ``timeout`` seconds (e.g. the ``hang`` fault) has its reply dropped, as the engine
stops waiting for it; the node keeps the context the call left, as the engine keeps the context of
a late reply.

Not provided: TTL expiry, Ray's per-client CPU/GPU reservations, and process isolation
(module-level state of the ClientApp survives between calls, as in a single Ray actor).
"""

from __future__ import annotations

import copy
import math
import os
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedsim._logging import logger

#: Node ids of the virtual SuperNodes start here (the SuperLink is node 1 in Flower).
FIRST_NODE_ID = 1000


class InProcessGrid(Grid):
    """A Flower :class:`~flwr.serverapp.Grid` that runs ``client_app`` for ``num_nodes`` virtual
    nodes in this process.

    >>> grid = InProcessGrid(fedsim.clients.app.app, cfg.clients)   # doctest: +SKIP
    >>> run_server(grid, cfg)                                         # doctest: +SKIP

    ``node_config`` adds keys to every node's config (e.g. ``{"data-dir": ...}``); ``absent``
    lists partition ids whose nodes never reply; ``on_reply(message, reply)`` is called after every
    delivery; ``num_threads`` sets torch's thread count during ClientApp calls (``None``: leave it).
    ``contexts`` maps node id -> that node's :class:`~flwr.app.Context` (its ``state`` is what the
    ClientApp keeps between rounds) and may be inspected after a run.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_id: int = 1,
        node_config: dict[str, bool | int | float | str] | None = None,
        first_node_id: int = FIRST_NODE_ID,
        absent: Collection[int] = (),
        on_reply: Callable[[Message, Message], None] | None = None,
        num_threads: int | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if any(not 0 <= k < num_nodes for k in absent):
            raise ValueError(f"absent partitions {sorted(absent)} must lie in 0..{num_nodes - 1}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self._app = client_app
        self._on_reply = on_reply
        self._num_threads = num_threads
        self._run = Run.create_empty(run_id=run_id)
        self._node_ids = [first_node_id + k for k in range(num_nodes)]
        self.contexts: dict[int, Context] = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": k, "num-partitions": num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for k, nid in enumerate(self._node_ids)
        }
        self._absent = {self._node_ids[k] for k in absent}
        self._replies: dict[str, Message] = {}
        self._took: dict[str, float] = {}  # message id -> seconds its ClientApp call took
        _set_server_task_identity(run_id)

    # ------------------------------------------------------------------ Grid API
    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver every message now (ClientApp call) and keep its reply for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"message to unknown node {msg.metadata.dst_node_id}; nodes are {self._node_ids}")
            if msg.metadata.message_id or msg.metadata.reply_to_message_id:
                raise ValueError("only new instruction messages can be pushed (message id and reply-to must be empty)")
            _set_message_id(msg)
            ids.append(msg.metadata.message_id)
            if msg.metadata.dst_node_id in self._absent:
                continue  # its reply never comes
            start = time.monotonic()
            reply = self._deliver(msg)
            self._took[msg.metadata.message_id] = time.monotonic() - start
            self._replies[msg.metadata.message_id] = reply
            if self._on_reply is not None:
                self._on_reply(msg, reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` (each is returned once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver ``messages`` and return the replies; a reply whose ClientApp call took longer
        than ``timeout`` seconds is dropped (lost, as in the engine)."""
        replies = list(self.pull_messages(list(self.push_messages(messages))))
        if timeout is None:
            return replies
        late = {mid: secs for mid, secs in self._took.items() if secs > timeout}
        self._took.clear()
        for r in replies:
            if r.metadata.reply_to_message_id in late:
                secs = late[r.metadata.reply_to_message_id]
                logger.debug(
                    "node %d replied after %.1f s, beyond the %g s timeout: its reply is dropped", r.metadata.src_node_id, secs, timeout
                )
        return [r for r in replies if r.metadata.reply_to_message_id not in late]

    # ------------------------------------------------------------------ delivery
    def _deliver(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        context = copy.deepcopy(self.contexts[node_id])
        try:
            with torch_threads(self._num_threads):
                reply = self._app(copy.deepcopy(msg), context)
        except Exception as exc:  # noqa: BLE001  (reported as an error reply, like Flower's Simulation Engine)
            logger.debug("ClientApp failed on node %d (%s):\n%s", node_id, msg.metadata.message_type, traceback.format_exc())
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        else:
            if reply.metadata.reply_to_message_id != msg.metadata.message_id:
                reply = Message(
                    Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="the ClientApp's reply is not a reply to the message it got"),
                    reply_to=msg,
                )
            else:
                self.contexts[node_id] = context
        _set_message_id(reply)
        return reply


def ray_client_threads(client_cpus: float) -> int:
    """The torch thread count a Ray client actor gets: ``OMP_NUM_THREADS`` if set in this
    environment (Ray workers inherit it), else ``max(floor(client_cpus), 1)``
    (``ray._private.utils.set_omp_num_threads_if_unset``)."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(math.floor(client_cpus), 1)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads in this process (``None``: leave the setting alone)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- Flower internals
# Flower has no public way to (a) give a message its id (the SuperLink assigns it; Flower's own
# InMemoryGrid and Simulation Engine write the private field) or (b) set the process's task
# identity, which the public `Message(content, dst_node_id, message_type)` constructor reads
# (Flower's `run_simulation` sets a dummy one). Both are kept here, in two small functions.


def _set_message_id(msg: Message) -> None:
    """Give ``msg`` a fresh id, as Flower's InMemoryGrid / Simulation Engine do (uuid4)."""
    msg.metadata.__dict__["_message_id"] = str(uuid4())


def _set_server_task_identity(run_id: int) -> None:
    """Make this process the SuperLink side of run ``run_id`` (as ``flwr.simulation.run_simulation``
    does), so strategies can build instruction messages."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
