"""The broker's rules, pure: no sockets, fake fd numbers with the facts the server would have observed."""

import itertools

import msgpack

import pytest

from texbridge._broker.registry import (LAST_ERRORS, LIST_PAGE, MAX_DESCRIPTOR, MAX_META, MAX_NAMES, Policy, Quotas,
                                        Registry, error_message)
from texbridge._descriptor import Descriptor, texture_layout
from texbridge._errors import MAX_MESSAGE, TexbridgeError
from texbridge._fdinfo import FdFacts
from texbridge._sharedmem import F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK
from texbridge._protocol import MAX_FRAME, MAX_NAME, VERSION, Message, Op, encode
from texbridge import AccessDenied

from conftest import assert_unguessable

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


@pytest.mark.parametrize("memory, facts, refusal", [
    ("memfd", FdFacts("anon", SIZE, detail="dmabuf"), "needs a memfd, got a anon"),  # host-mappable memory is a memfd
    ("memfd", FdFacts("chardev", SIZE, detail="/dev/dri/renderD128", major=226), "needs a memfd"),
    ("opaque_fd", FdFacts("anon", SIZE, detail="dmabuf"), None),  # what GPU drivers export
    ("dma_buf", FdFacts("anon", SIZE, detail="dmabuf"), None),
    ("cuda_vmm", FdFacts("chardev", 0, detail="/dev/nvidiactl", major=195), None),
    ("opaque_fd", FdFacts("memfd", 0, 0), None),  # lavapipe exports unsealed memfds, which no importer maps
])
def test_memory_fd_kinds_follow_the_memory_type_table(memory, facts, refusal):
    w = World()
    w.connect(1)
    desc = Descriptor(kind="buffer", size=SIZE, memory=memory, backend="vulkan").to_wire()
    fd, r = w.register(1, facts, desc=desc)
    if refusal:
        w.err(r, "invalid_descriptor")
        assert refusal in r.message.fields["message"]
        assert w.closed == [fd] and not w.reg.resources
    else:
        assert w.ok(r)["handle"] and not w.closed


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


def test_byte_quota_counts_what_a_client_registered_until_it_is_retired():
    w = World(quotas=Quotas(bytes=SIZE * 2))
    w.connect(1), w.connect(2)
    first = w.ok(w.register(1)[1])["handle"]
    w.ok(w.register(1)[1])
    r = w.register(1)[1]
    w.err(r, "quota_exceeded")
    assert "bytes" in r.message.fields["message"] and len(w.reg.resources) == 2
    w.ok(w.register(2)[1])  # the quota is per client
    w.ok(w.call(2, Op.OPEN, handle=first))  # opening costs the opener no bytes...
    w.ok(w.call(1, Op.CLOSE, handle=first))
    w.ok(w.register(1)[1])  # ...and the creator's bytes come back once it lets go, even while others hold it


def test_only_a_holder_closes_or_updates_a_resource():
    w = World()
    w.connect(1), w.connect(2)
    h = w.ok(w.register(1, meta={"owner": 1})[1])["handle"]
    w.err(w.call(2, Op.CLOSE, handle=h), "not_found")
    w.err(w.call(2, Op.UPDATE, handle=h, meta={"owner": 2}), "not_found")
    assert w.reg.resources[h].meta == {"owner": 1} and w.reg.resources[h].refs == 1


def test_closing_the_last_reference_while_owning_the_keyed_mutex_abandons_it():
    """Waiters must not hang on a mutex whose owner let go of the resource: CLOSE of a session's last reference to a
    keyed-mutex resource abandons it for that session; an earlier reference's CLOSE does not."""
    w = World()
    w.connect(1)
    state = FdFacts("memfd", 4096, SEALED)
    h = w.ok(w.call(1, Op.REGISTER, [(11, FdFacts("memfd", SIZE, SEALED)), (12, state)],
                    descriptor={**TEX, "keyed_mutex": True}))["handle"]
    session = w.reg.clients[1].session
    w.ok(w.call(1, Op.OPEN, handle=h))
    w.ok(w.call(1, Op.CLOSE, handle=h))
    assert w.last.abandon == []
    w.ok(w.call(1, Op.CLOSE, handle=h))
    assert w.last.abandon == [(12, session)]


def test_names_never_take_the_handle_prefix():
    w = World()
    w.connect(1)
    h = w.ok(w.register(1)[1])["handle"]
    for name in ("tb:cam", "TB:0123456789abcdef", " tb:x"):
        w.err(w.call(1, Op.PUBLISH, handle=h, name=name), "invalid_descriptor")
        w.err(w.register(1, name=name)[1], "invalid_descriptor")
    assert not w.reg.names


def test_a_list_page_holds_at_most_list_page_entries_whatever_limit_asks():
    w = World()
    w.connect(1)
    buf = Descriptor(kind="buffer", size=4096).to_wire()
    for _ in range(LIST_PAGE + 20):
        w.ok(w.register(1, FdFacts("memfd", 4096, SEALED), desc=buf)[1])
    page = w.ok(w.call(1, Op.LIST, limit=10 * LIST_PAGE))
    assert len(page["resources"]) == LIST_PAGE and page["total"] == LIST_PAGE + 20


@pytest.mark.parametrize("seals", [0, F_SEAL_SHRINK | F_SEAL_SEAL, F_SEAL_GROW | F_SEAL_SEAL])
def test_memory_must_be_sealed_against_both_shrinking_and_growing(seals):
    w = World()
    w.connect(1)
    r = w.register(1, FdFacts("memfd", SIZE, seals))[1]
    w.err(r, "invalid_descriptor")
    assert "not sealed" in r.message.fields["message"]
    state = FdFacts("memfd", 4096, seals)  # a keyed-mutex state likewise
    w.err(w.call(1, Op.REGISTER, [(11, FdFacts("memfd", SIZE, SEALED)), (12, state)],
                 descriptor={**TEX, "keyed_mutex": True}), "invalid_descriptor")


def test_a_registry_draws_its_handles_at_random():
    """Without a handle source given (the daemon gives none), REGISTER's handles are random 64-bit values."""
    w = World()
    w.connect(1)
    assert_unguessable([w.ok(w.register(1)[1])["handle"] for _ in range(48)])


def test_open_counts_against_the_resource_quota():
    """Opening is taking a reference like registering: a client at its quota cannot open past it (else it could
    reach any number of resources by having another client register them), yet may re-open what it holds."""
    w = World(quotas=Quotas(resources=2))
    w.connect(1), w.connect(2), w.connect(3)
    handles = [w.ok(w.register(cid)[1])["handle"] for cid in (1, 1, 3)]  # others register, within their quotas
    w.ok(w.call(2, Op.OPEN, handle=handles[0]))
    w.ok(w.call(2, Op.OPEN, handle=handles[1]))
    refused = w.call(2, Op.OPEN, handle=handles[2])
    w.err(refused, "quota_exceeded")
    assert refused.fds == () and handles[2] not in w.reg.clients[2].refs
    assert w.reg.resources[handles[2]].refs == 1, "a refused OPEN took no reference"
    w.ok(w.call(2, Op.OPEN, handle=handles[0]))  # one more reference to a resource it holds: no new resource
    assert w.reg.clients[2].refs == {handles[0]: 2, handles[1]: 1}
    w.ok(w.call(2, Op.CLOSE, handle=handles[1]))
    w.ok(w.call(2, Op.OPEN, handle=handles[2]))  # room again


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
    r = claim(w, 3, h, 5003, desc={**TEX, "format": "bgra8"})  # a valid descriptor, not the entry's, same file
    w.err(r, "invalid_descriptor")
    assert "another descriptor" in r.message.fields["message"]
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


# -- limits: everything stored is bounded, so every reply and event fits a frame -------------------------------------

def fits(fx):
    """Every message in the effects encodes within a frame (encode raises LocalProtocolError otherwise)."""
    for o in fx.out:
        assert len(encode(o.message)) <= MAX_FRAME


def test_meta_is_limited_on_register_and_update():
    w = World()
    w.connect(1)
    w.err(w.register(1, meta={"x": "y" * MAX_META})[1], "quota_exceeded")
    h = w.ok(w.register(1, meta={"x": "y" * (MAX_META - 16)})[1])["handle"]
    w.err(w.call(1, Op.UPDATE, handle=h, meta={"x": "y" * MAX_META}), "quota_exceeded")
    assert len(msgpack.packb(w.reg.resources[h].meta)) <= MAX_META  # the refused update changed nothing
    assert sorted(w.closed) == [100]


def test_names_per_resource_are_limited():
    w = World()
    w.connect(1)
    h = w.ok(w.register(1)[1])["handle"]
    for i in range(MAX_NAMES):
        w.ok(w.call(1, Op.PUBLISH, handle=h, name=f"n{i}"))
    w.err(w.call(1, Op.PUBLISH, handle=h, name="one-too-many"), "quota_exceeded")


def test_packed_descriptor_is_limited():
    w = World()
    w.connect(1)
    big = {**TEX, "driver_private": {"blob": b"x" * MAX_DESCRIPTOR}}
    w.err(w.register(1, desc=big)[1], "invalid_descriptor")


def test_worst_case_resource_fits_every_reply_and_event():
    """Longest names (4-byte characters), all of them, the largest meta and descriptor: OPEN, INFO, LIST and the
    events still fit a frame."""
    w = World()
    w.connect(1), w.connect(2)
    w.call(2, Op.WATCH)
    desc = {**TEX, "runtime_private": b"r" * 4096, "driver_private": {"k": b"x" * (MAX_DESCRIPTOR - 4096 - 400)}}
    meta = {"m": "\U0001F600" * ((MAX_META - 16) // 4)}
    h = w.ok(w.register(1, desc=desc, meta=meta, name="\U0001F600" * MAX_NAME)[1])["handle"]
    for i in range(1, MAX_NAMES):
        w.ok(w.call(1, Op.PUBLISH, handle=h, name=f"{i:03d}" + "\U0001F600" * (MAX_NAME - 3)))
        fits(w.last)
    for op, fields in [(Op.OPEN, {"handle": h}), (Op.INFO, {"handle": h}), (Op.LIST, {}),
                       (Op.UPDATE, {"handle": h, "meta": meta})]:
        w.ok(w.call(1, op, **fields))
        fits(w.last)
    fits(w.reg.disconnect(1))


def test_list_pages_by_bytes_and_paging_sees_everything():
    """200 buffers with 300-byte meta once made a 200-entry page larger than a frame (the issue's public-API case)."""
    w = World()
    w.connect(1)
    buf = Descriptor(kind="buffer", size=4096).to_wire()
    for i in range(LIST_PAGE + 50):
        w.ok(w.register(1, FdFacts("memfd", 4096, SEALED), desc=buf, meta={"note": f"{i:04d}" + "m" * 300})[1])
    seen, pages = [], 0
    while True:
        reply = w.ok(w.call(1, Op.LIST, offset=len(seen)))
        fits(w.last)
        pages += 1
        seen += reply["resources"]
        if not reply["resources"] or len(seen) >= reply["total"]:
            break
    assert sorted(r["meta"]["note"][:4] for r in seen) == [f"{i:04d}" for i in range(LIST_PAGE + 50)]
    assert pages > 2  # a count-only page would need 2


def test_error_messages_are_bounded():
    """An error that quotes a client's value quotes a short, cut repr."""
    w = World()
    w.connect(1)
    long = "z" * 50_000
    for desc in ({**TEX, "format": long}, {**TEX, "kind": long}, {**TEX, long: 1}, {**TEX, "memory": long}):
        r = w.register(1, desc=desc)[1]
        assert r.message.op is Op.ERROR and len(r.message.fields["message"]) <= MAX_MESSAGE, desc.keys()
        assert len(encode(r.message)) < 2048
    w.err(w.call(1, Op.OPEN, name="n" * 1024), "not_found")
    assert len(w.last.out[0].message.fields["message"]) < 200
    long_error = error_message(5, TexbridgeError("e" * 100_000))  # whatever a message says, the reply is bounded
    assert len(long_error.fields["message"]) <= MAX_MESSAGE and len(encode(long_error)) < 2 * MAX_MESSAGE


@pytest.mark.parametrize("facts", [
    FdFacts("anon", detail="eventfd"), FdFacts("anon", detail="eventpoll"), FdFacts("anon", detail="pidfd"),
    FdFacts("anon", detail="timerfd"), FdFacts("anon", detail="signalfd"), FdFacts("anon", detail="inotify"),
    FdFacts("chardev", detail="/dev/null", major=1), FdFacts("chardev", detail="/dev/pts/0", major=136),
])
@pytest.mark.parametrize("memory", ["opaque_fd", "dma_buf"])
def test_fds_that_are_never_gpu_memory_are_refused(facts, memory):
    w = World()
    w.connect(1)
    fd, r = w.register(1, facts, desc={**TEX, "memory": memory, "backend": "vulkan"})
    w.err(r, "invalid_descriptor")
    assert w.closed == [fd]


@pytest.mark.parametrize("facts", [
    FdFacts("anon", 1 << 20, detail="dmabuf"),  # a dma-buf (anon inode of its own fs)
    FdFacts("chardev", detail="/dev/nvidiactl", major=195),  # NVIDIA exports OPAQUE_FD memory as a device fd
    FdFacts("memfd", SIZE, SEALED),  # lavapipe exports OPAQUE_FD memory as a memfd
    FdFacts("anon", detail="syncobj"),
])
def test_gpu_export_fds_are_accepted(facts):
    w = World()
    w.connect(1)
    w.ok(w.register(1, facts, desc={**TEX, "memory": "opaque_fd", "backend": "vulkan"})[1])


def test_stats_say_what_the_errors_were():
    w = World()
    w.connect(1)
    w.err(w.call(1, Op.OPEN, handle=5), "not_found")
    w.err(w.call(1, Op.OPEN, handle=6), "not_found")
    w.err(w.register(1, FdFacts("socket"))[1], "invalid_descriptor")
    stats = w.ok(w.call(1, Op.STATS))
    assert stats["errors"] == 3 and stats["error_codes"] == {"not_found": 2, "invalid_descriptor": 1}
    assert [e[2:4] for e in stats["last_errors"]] == [["open", "not_found"]] * 2 + [["register", "invalid_descriptor"]]
    assert stats["last_errors"][0][1] == 1001  # the pid of the client that got the error
    for i in range(20):
        w.call(1, Op.CLOSE, handle=i + 1)
    assert len(w.ok(w.call(1, Op.STATS))["last_errors"]) == LAST_ERRORS


@pytest.mark.parametrize("facts", [FdFacts("memfd", 8192, SEALED), FdFacts("memfd", 4096, 0), FdFacts("anon", 4096)])
def test_keyed_mutex_kind_needs_a_real_state_memfd(facts):
    """The broker maps a keyed_mutex resource's fd to abandon a dead owner: it must be exactly a sealed state page."""
    w = World()
    w.connect(1)
    desc = Descriptor(kind="keyed_mutex", size=4096, memory="opaque_fd").to_wire()
    w.err(w.register(1, facts, desc=desc)[1], "invalid_descriptor")
    w.ok(w.register(1, FdFacts("memfd", 4096, SEALED), desc=desc)[1])


def test_default_resource_quota_is_enforced():
    """A client may not reference more resources than the default quota, far below any fd budget (each resource is
    an fd in the broker or a keeper): one client cannot take the broker's capacity for itself."""
    w = World()
    w.connect(1)
    limit = Quotas().resources
    assert limit <= 65536
    buf = Descriptor(kind="buffer", size=4096).to_wire()
    facts = FdFacts("memfd", 4096, SEALED)
    for _ in range(limit):
        w.reg.handle(1, Message(Op.REGISTER, 1, {"descriptor": buf}, 1), [(next(w.fd), facts)])
    assert len(w.reg.clients[1].refs) == limit
    w.err(w.register(1, facts, desc=buf)[1], "quota_exceeded")


@pytest.mark.parametrize("sem_facts, refused", [
    (FdFacts("memfd", 4096, SEALED), True),  # a file is never a semaphore export (NVIDIA's device broke on one)
    (FdFacts("anon", detail="eventfd"), True),
    (FdFacts("regular", 10), True),
    (FdFacts("chardev", detail="/dev/nvidiactl", major=195), False),  # NVIDIA's semaphore export
    (FdFacts("anon", detail="syncobj"), False),  # Mesa's
])
def test_gpu_semaphore_fd_must_be_able_to_be_one(sem_facts, refused):
    w = World()
    w.connect(1)
    desc = Descriptor(kind="buffer", size=SIZE, memory="opaque_fd", backend="vulkan",
                      gpu_sync="timeline_opaque_fd").to_wire()
    mem = FdFacts("chardev", detail="/dev/nvidiactl", major=195)
    r = w.call(1, Op.REGISTER, [(next(w.fd), mem), (next(w.fd), sem_facts)], descriptor=desc)
    if refused:
        w.err(r, "invalid_descriptor")
        assert "GPU semaphore" in r.message.fields["message"]
    else:
        assert w.ok(r)["handle"]
