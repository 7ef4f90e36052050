"""The broker's rules, pure: no sockets, fake fd numbers with the facts the server would have observed."""

import itertools

import msgpack

import pytest

from texbridge._broker.registry import Policy, Quotas, Registry
from texbridge._descriptor import Descriptor, texture_layout
from texbridge._memfd import F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, FdFacts
from texbridge._protocol import VERSION, Message, Op
from texbridge import AccessDenied

SEALED = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL
PITCH, SIZE = texture_layout(64, 64, "rgba8")
TEX = Descriptor(kind="texture2d", size=SIZE, width=64, height=64, format="rgba8", planes=((0, PITCH),)).to_wire()


class World:
    """A registry plus the bookkeeping a test needs: fake fd numbers and who still owns which."""

    def __init__(self, **kw):
        self.reg = Registry(namespace="t", clock=itertools.count().__next__, **kw)
        self.fd = itertools.count(100)
        self.closed: list[int] = []
        self.rid = itertools.count(1)

    def connect(self, cid, uid=0, pid=None):
        self.reg.connect(cid, pid or 1000 + cid, uid)
        return self.call(cid, Op.HELLO, version=VERSION, name=f"c{cid}", pid=1000 + cid)

    def call(self, cid, op, fds=(), **fields):
        fx = self.reg.handle(cid, Message(op, next(self.rid), fields, len(fds)), fds)
        self.closed += fx.close
        self.last = fx
        reply = [o for o in fx.out if o.client == cid and o.message.op in (Op.REPLY, Op.ERROR)][-1]
        return reply

    def register(self, cid, facts=None, desc=TEX, **fields):
        fd = next(self.fd)
        return fd, self.call(cid, Op.REGISTER, [(fd, facts or FdFacts("memfd", SIZE, SEALED))], descriptor=desc,
                             **fields)

    def ok(self, reply):
        assert reply.message.op is Op.REPLY, reply.message.fields
        return reply.message.fields

    def err(self, reply, code):
        assert reply.message.op is Op.ERROR and reply.message.fields["code"] == code, reply.message.fields


def test_register_open_close_lifecycle_and_fd_ownership():
    w = World()
    w.connect(1), w.connect(2)
    fd, r = w.register(1)
    h = w.ok(r)["handle"]
    opened = w.call(2, Op.OPEN, handle=h)
    assert opened.fds == (fd,) and msgpack.unpackb(w.ok(opened)["descriptor"])["width"] == 64
    w.ok(w.call(1, Op.CLOSE, handle=h))
    assert fd not in w.closed  # client 2 still holds it: the resource outlives its creator
    w.ok(w.call(2, Op.CLOSE, handle=h))
    assert w.closed == [fd] and not w.reg.resources
    w.err(w.call(2, Op.CLOSE, handle=h), "not_found")  # double close


def test_disconnect_drops_every_reference_and_name():
    w = World()
    w.connect(1), w.connect(2)
    fd, r = w.register(1, name="cam")
    h = w.ok(r)["handle"]
    w.call(2, Op.OPEN, name="cam"), w.call(2, Op.OPEN, name="cam")
    w.closed += w.reg.disconnect(1).close
    assert "cam" not in w.reg.names and h in w.reg.resources  # the publisher left: name gone, memory stays
    w.closed += w.reg.disconnect(2).close
    assert w.closed == [fd] and w.reg.idle


@pytest.mark.parametrize("facts, code", [
    (FdFacts("memfd", SIZE, 0), "invalid_descriptor"),  # unsealed
    (FdFacts("memfd", SIZE, F_SEAL_GROW), "invalid_descriptor"),  # may shrink
    (FdFacts("memfd", SIZE - 1, SEALED), "invalid_descriptor"),  # too small
    (FdFacts("socket"), "invalid_descriptor"), (FdFacts("directory"), "invalid_descriptor"),
    (FdFacts("fifo"), "invalid_descriptor"), (FdFacts("regular", SIZE), "invalid_descriptor"),
])
def test_bad_memory_is_refused_and_fd_returned_for_closing(facts, code):
    w = World()
    w.connect(1)
    fd, r = w.register(1, facts)
    w.err(r, code)
    assert w.closed == [fd] and not w.reg.resources


def test_wrong_fd_count_and_bad_descriptor():
    w = World()
    w.connect(1)
    facts = FdFacts("memfd", SIZE, SEALED)
    r = w.call(1, Op.REGISTER, [(1, facts), (2, facts)], descriptor=TEX)
    w.err(r, "invalid_descriptor")
    w.err(w.register(1, desc={**TEX, "width": 0})[1], "invalid_descriptor")
    w.err(w.register(1, desc={**TEX, "format": "nope"})[1], "invalid_descriptor")
    w.err(w.register(1, desc={**TEX, "size": 1 << 80})[1], "invalid_descriptor")
    w.err(w.register(1, desc="not a map")[1], "invalid_descriptor")
    assert sorted(w.closed) == [1, 2, 100, 101, 102, 103]


def test_names_are_unique_and_belong_to_their_publisher():
    w = World()
    w.connect(1), w.connect(2)
    h = w.ok(w.register(1, name="cam")[1])["handle"]
    w.err(w.register(2, name="cam")[1], "name_in_use")
    w.err(w.call(2, Op.PUBLISH, handle=h, name="other"), "access_denied")  # not a holder
    w.call(2, Op.OPEN, handle=h)
    w.ok(w.call(2, Op.PUBLISH, handle=h, name="other"))
    w.err(w.call(2, Op.UNPUBLISH, name="cam"), "access_denied")
    w.ok(w.call(1, Op.UNPUBLISH, name="cam"))
    w.err(w.call(1, Op.OPEN, name="cam"), "not_found")
    w.err(w.call(1, Op.PUBLISH, handle=h, name=""), "invalid_descriptor")


def test_quotas():
    w = World(quotas=Quotas(resources=2, bytes=SIZE * 10, names=1))
    w.connect(1)
    w.ok(w.register(1, name="a")[1])
    w.err(w.register(1, name="b")[1], "quota_exceeded")
    w.ok(w.register(1)[1])
    w.err(w.register(1)[1], "quota_exceeded")


def test_watchers_get_events():
    w = World()
    w.connect(1), w.connect(2)
    w.call(2, Op.WATCH)
    h = w.ok(w.register(1, name="cam")[1])["handle"]
    assert [o.message.fields["event"] for o in w.last.out if o.client == 2] == ["published"]
    w.call(1, Op.CLOSE, handle=h)
    assert [o.message.fields["event"] for o in w.last.out if o.client == 2] == ["released", "unpublished", "retired"]


def test_list_pages_and_stats():
    w = World()
    w.connect(1)
    for _ in range(450):
        w.register(1)
    page = w.ok(w.call(1, Op.LIST, offset=400))
    assert page["total"] == 450 and len(page["resources"]) == 50
    assert w.ok(w.call(1, Op.STATS))["resources"] == 450


def test_policy_and_shutdown_rights():
    w = World(policy=Policy(broker_uid=1000, allowed_uids=frozenset({1001})))
    with pytest.raises(AccessDenied):
        w.reg.connect(9, 1, 1002)
    w.connect(1, uid=1001)
    w.err(w.call(1, Op.SHUTDOWN), "access_denied")
    w.connect(2, uid=1000)
    w.ok(w.call(2, Op.SHUTDOWN))
    assert w.last.shutdown


def test_unknown_handle_is_not_found():
    w = World()
    w.connect(1)
    w.err(w.call(1, Op.OPEN, handle=12345), "not_found")
    w.err(w.call(1, Op.INFO, name="x"), "not_found")


def test_quiet_close_sends_nothing_even_on_error():
    w = World()
    w.connect(1)
    h = w.ok(w.register(1)[1])["handle"]
    fx = w.reg.handle(1, Message(Op.CLOSE, 9, {"handle": h, "quiet": True}))
    assert fx.out == [] and not w.reg.resources
    fx = w.reg.handle(1, Message(Op.CLOSE, 10, {"handle": h, "quiet": True}))
    assert fx.out == []


def test_lost_fds_retire_their_resources_for_every_holder():
    """The server lost some fds (an fd keeper died): those resources are retired at once, names and references
    included, watchers told; the rest is untouched."""
    w = World()
    w.connect(1), w.connect(2), w.connect(3)
    w.ok(w.call(3, Op.WATCH))
    fd_a, r = w.register(1, name="a")
    a = w.ok(r)["handle"]
    fd_b, r = w.register(1, name="b")
    b = w.ok(r)["handle"]
    w.call(2, Op.OPEN, name="a"), w.call(2, Op.OPEN, name="a")
    fx = w.reg.lose([fd_a, 999])
    assert fx.close == [fd_a] and a not in w.reg.resources and "a" not in w.reg.names
    assert a not in w.reg.clients[1].refs and a not in w.reg.clients[2].refs
    assert w.reg.clients[1].bytes == SIZE  # only b is still charged to its creator
    events = [o.message.fields["event"] for o in fx.out if o.client == 3]
    assert events[-1] == "retired" and "unpublished" in events
    w.err(w.call(2, Op.OPEN, name="a"), "not_found")
    w.err(w.call(2, Op.CLOSE, handle=a), "not_found")
    assert w.ok(w.call(2, Op.OPEN, name="b"))["handle"] == b


# -- re-attach after a broker restart -------------------------------------------------------------------------------
def reattach_world():
    """Fake fd numbers stand for files: fd // 1000 is the file, so 5001 and 5002 are two fds of one file."""
    return World(same_file=lambda a, b: a // 1000 == b // 1000)


def claim(w, cid, handle, fd, desc=TEX, **fields):
    return w.call(cid, Op.REGISTER, [(fd, FdFacts("memfd", SIZE, SEALED))], descriptor=desc, handle=handle, **fields)


def test_register_under_a_free_handle_creates_it_and_holders_of_the_same_file_rejoin():
    w = reattach_world()
    w.connect(1), w.connect(2), w.connect(3)
    h = 0xDEADBEEF12345678
    assert w.ok(claim(w, 1, h, 5001, meta={"a": 1}))["handle"] == h
    assert w.ok(claim(w, 2, h, 5002))["handle"] == h  # same file: one entry, one more reference
    assert w.closed == [5002] and w.reg.resources[h].fds == (5001,) and w.reg.resources[h].refs == 2
    w.err(claim(w, 3, h, 6001), "access_denied")  # other memory cannot take over a live handle
    w.err(claim(w, 3, h, 5003, desc={**TEX, "width": 32, "height": 128}), "invalid_descriptor")
    assert sorted(w.closed) == [5002, 5003, 6001] and w.reg.resources[h].refs == 2
    w.closed += w.reg.disconnect(1).close
    assert h in w.reg.resources  # the creator-by-claim left; client 2 still holds it
    w.closed += w.reg.disconnect(2).close
    assert 5001 in w.closed and not w.reg.resources
    w.err(claim(w, 3, 0, 7001), "invalid_descriptor")


def test_rejoin_needs_a_way_to_compare_files():
    w = World()  # no same_file: the registry cannot verify a claim on a live handle, so it refuses it
    w.connect(1), w.connect(2)
    h = w.ok(claim(w, 1, 77, 5001))["handle"]
    w.err(claim(w, 2, h, 5002), "access_denied")


def test_rejoin_with_meta_updates_watchers_and_name_publishes():
    w = reattach_world()
    w.connect(1), w.connect(2), w.connect(3)
    w.call(3, Op.WATCH)
    w.ok(claim(w, 1, 42, 5001))  # a receiver came back first: no meta yet
    w.ok(claim(w, 2, 42, 5002, meta={"sender": 1}, name="cam"))
    events = [o.message.fields["event"] for o in w.last.out if o.client == 3]
    assert events == ["updated", "published"] and w.reg.resources[42].meta == {"sender": 1}
    assert w.ok(w.call(3, Op.OPEN, name="cam"))["handle"] == 42


def test_session_ids_resume_when_free_and_abandon_follows_the_session():
    w = World()
    w.connect(1)
    w.reg.connect(2, 1002, 0)
    assert w.ok(w.call(2, Op.HELLO, version=VERSION, name="c2", pid=1002, session_id=4242))["session_id"] == 4242
    w.reg.connect(3, 1003, 0)
    again = w.ok(w.call(3, Op.HELLO, version=VERSION, name="c3", pid=1003, session_id=4242))["session_id"]
    assert again != 4242  # taken: a fresh one
    fd, r = w.register(2, desc={**TEX, "keyed_mutex": True}, facts=None)
    w.err(r, "invalid_descriptor")  # (needs the state fd too)
    facts = FdFacts("memfd", SIZE, SEALED)
    state = FdFacts("memfd", 4096, SEALED)
    w.ok(w.call(2, Op.REGISTER, [(11, facts), (12, state)], descriptor={**TEX, "keyed_mutex": True}))
    assert w.reg.disconnect(2).abandon == [(12, 4242)]
    w.reg.connect(4, 1004, 0)
    assert w.ok(w.call(4, Op.HELLO, version=VERSION, name="c4", pid=1004, session_id=4242))["session_id"] == 4242


def test_fresh_session_ids_start_at_a_random_point():
    assert len({Registry().sessions or Registry()._next_session for _ in range(8)}) > 1


def test_shutdown_without_force_refuses_while_others_are_live():
    w = World(policy=Policy(broker_uid=1000))
    w.connect(1, uid=1000), w.connect(2, uid=1000)
    r = w.call(1, Op.SHUTDOWN, force=False)
    w.err(r, "access_denied")
    assert "pid 1002 (c2)" in r.message.fields["message"] and not w.last.shutdown
    w.reg.disconnect(2)
    w.ok(w.call(1, Op.SHUTDOWN, force=False))
    assert w.last.shutdown
