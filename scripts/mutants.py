#!/usr/bin/env python3
"""Hand-made mutation checks: break one guarantee, run the tests that should notice, put the code back.

Each mutant below is one textual edit of the source that breaks a guarantee the docs promise (docs/testing.md has
the table). For each mutant this script applies the edit, runs the tests named for it `--repeat` times, and counts
the mutant as caught only if every run fails; the file is restored in every case (a `finally`, then a check that
`git diff` of the file is empty). A mutant of `_synccore.c` rebuilds the extension before and after.

    scripts/mutants.py --list            # the mutants
    scripts/mutants.py --check           # does each mutant's text still occur once? (after refactors)
    scripts/mutants.py                   # run them all (slow: minutes)
    scripts/mutants.py open-quota d3d11-mips --repeat 5

Run it in a clean worktree: it refuses to start when a file it would mutate has uncommitted changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = "src/texbridge/"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/texbridge/
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) expected to fail
    guarantee: str
    more: tuple[tuple[str, str], ...] = ()  # further (old, new) edits of the same file, where one is not enough

    @property
    def edits(self) -> tuple[tuple[str, str], ...]:
        return ((self.old, self.new),) + self.more


MUTANTS = [
    # -- issue 16's list ----------------------------------------------------------------------------------------------
    Mutant("open-quota", "_broker/registry.py",
           "if rec.handle not in client.refs and len(client.refs) >= self.quotas.resources:",
           "if False:",
           ("tests/test_registry.py::test_open_counts_against_the_resource_quota",),
           "OPEN takes a reference only within the client's resource quota"),
    Mutant("memfd-offset", "backends/memfd.py", "fmt.numpy_dtype, offset=d.offset,", "fmt.numpy_dtype, offset=0,",
           ("tests/test_memfd.py::test_numpy_view_honours_a_nonzero_plane_offset_and_an_odd_pitch",), "numpy() starts at the descriptor's plane offset"),
    Mutant("memfd-pitch", "backends/memfd.py", "strides=(d.row_pitch, fmt.bytes_per_pixel, item)",
           "strides=(d.width * fmt.bytes_per_pixel, fmt.bytes_per_pixel, item)",
           ("tests/test_memfd.py::test_numpy_view_honours_a_nonzero_plane_offset_and_an_odd_pitch",), "numpy() rows are the descriptor's row pitch apart"),
    Mutant("layout-align", "_descriptor.py", "*, pitch_align: int = 256)", "*, pitch_align: int = 64)",
           ("tests/test_memfd.py::test_created_textures_use_the_d3d_pitch_rule",),
           "created CPU textures pad rows to D3D's 256-byte pitch"),
    Mutant("required-size-offset", "_descriptor.py", "return max(off + pitch * self.height * self.array_size",
           "return max(pitch * self.height * self.array_size",
           ("tests/test_memfd.py::test_memory_smaller_than_offset_plus_layout_is_refused",),
           "a texture's memory covers offset + pitch * height (validation and import)"),
    Mutant("memfd-import-size", "backends/memfd.py",
           "if sealed_size(fd) < descriptor.required_size():", "if sealed_size(fd) < 0:",
           ("tests/test_memfd.py::test_memory_smaller_than_offset_plus_layout_is_refused",),
           "memfd import refuses memory smaller than its layout (SIGBUS)"),
    Mutant("d3d11-mips-array", "_d3d11.py", "pack(width, height, mip_levels, array_size,", "pack(width, height, 1, 1,",
           ("tests/test_descriptor.py::test_d3d11_description_has_every_field",), "the D3D11 description carries MipLevels and ArraySize"),
    Mutant("d3d11-keyed-flag", "_d3d11.py", "D3D11_RESOURCE_MISC_SHARED_KEYEDMUTEX if keyed_mutex else",
           "D3D11_RESOURCE_MISC_SHARED if keyed_mutex else", ("tests/test_descriptor.py::test_d3d11_description_has_every_field",),
           "a keyed-mutex texture's D3D11 MiscFlags say SHARED_KEYEDMUTEX"),
    Mutant("d3d11-format", "_d3d11.py", "get_format(format).dxgi, 1, 0, 0,", "get_format(format).vk, 1, 0, 0,",
           ("tests/test_descriptor.py::test_valid_texture_round_trips_through_wire_form",), "the D3D11 Format is the DXGI_FORMAT value"),
    Mutant("memfd-d3d11-keyed", "backends/memfd.py", "d3d11_texture_desc(width, height, format, keyed_mutex=keyed_mutex)",
           "d3d11_texture_desc(width, height, format)",
           ("tests/test_descriptor.py::test_memfd_textures_carry_their_d3d11_description",), "memfd textures describe their keyed mutex to D3D11"),
    Mutant("dxgi-table", "_formats.py", 'Format("rgba16", 11,', 'Format("rgba16", 13,',
           ("tests/test_descriptor.py::test_every_format_has_its_dxgi_value",), "the format table's DXGI values are dxgiformat.h's"),
    Mutant("sequential-handles", "_broker/registry.py", "            handle = self._new_handle() or 1\n            while",
           "            handle = self.counters['registered'] + 1\n            while",
           ("tests/test_broker.py::test_handles_a_real_broker_hands_out_are_unguessable",),
           "the broker's handles are random 64-bit values"),
    Mutant("narrow-handles", "_broker/registry.py", "new_handle: Callable[[], int] = lambda: secrets.randbits(64),",
           "new_handle: Callable[[], int] = lambda: secrets.randbits(32),",
           ("tests/test_broker.py::test_handles_a_real_broker_hands_out_are_unguessable",),
           "handles use all 64 bits"),
    Mutant("gid-for-uid", "_broker/server.py", "pid, uid = creds.pid, creds.uid", "pid, uid = creds.pid, creds.gid",
           ("tests/test_broker.py::test_peer_credentials_are_read_in_ucred_order_without_root",),
           "admission goes by SO_PEERCRED's uid, not its gid"),
    Mutant("ucred-order", "_broker/server.py", "    uid: int\n    gid: int", "    gid: int\n    uid: int",
           ("tests/test_broker.py::test_peer_credentials_are_read_in_ucred_order_without_root",),
           "struct ucred is read as {pid, uid, gid}"),
    # -- senders: the ring's seqlock and pins (docs/senders.md) -----------------------------------------------------
    Mutant("ring-no-recheck", "senders/ring.py", "if int(u[_SEQ + slot]) != s1 or int(u[_GEN]) != generation:\n                continue",
           "if False:\n                continue",
           ("tests/test_senders.py::test_a_copy_overlapped_by_sends_into_every_pinned_slot_is_refused",),
           "a copy overlapped by a write is dropped (seqlock re-check after the copy)"),
    Mutant("ring-reads-odd-slot", "senders/ring.py", "if s1 & 1 or int(u[_SLOT_FRAME + slot]) != frame:",
           "if int(u[_SLOT_FRAME + slot]) != frame:", ("tests/test_ring.py::test_a_reader_skips_a_slot_being_written_and_one_holding_another_frame",),
           "a reader never copies a slot whose sequence is odd (being written)"),
    Mutant("ring-ignores-pins", "senders/ring.py", "return int(np.bitwise_or.reduce(self.rows[:, _R_PIN]))", "return 0",
           ("tests/test_ring.py::test_the_writer_skips_the_latest_and_pinned_slots_and_overwrites_only_when_all_are_pinned",),
           "the writer skips slots a reader has pinned"),
    Mutant("ring-no-pin-recheck", "senders/ring.py", "if not (pinned >> cand) & 1:\n                return cand",
           "if True:\n                return cand",
           ("tests/test_ring.py::test_a_pin_landing_between_the_busy_mark_and_the_recheck_makes_the_writer_back_off",),
           "Dekker: the writer re-reads the pins after marking a slot busy, and backs off"),
    Mutant("ring-overwrite-silent", "senders/ring.py", "self.overwrites += 1\n        _bump(u, _SEQ + slot)",
           "self.overwrites += 1\n        _bump(u, _SEQ + slot, 2)", ("tests/test_ring.py::test_a_copy_overlapped_by_a_write_is_detected_and_retried_on_the_newer_frame",),
           "overwriting a pinned slot makes its sequence odd while writing"),
    Mutant("ring-unpin-zero-copy", "senders/ring.py", "if not keep_pin:\n                rows[row, _R_PIN] = 0",
           "if True:\n                rows[row, _R_PIN] = 0",
           ("tests/test_ring.py::test_the_writer_skips_the_latest_and_pinned_slots_and_overwrites_only_when_all_are_pinned",),
           "a zero-copy read keeps its slot pinned until release()"),
    Mutant("ring-abort-keeps-frame", "senders/ring.py", "u[_SLOT_FRAME + slot] = 0\n        _bump(u, _SEQ + slot)",
           "_bump(u, _SEQ + slot)", ("tests/test_ring.py::test_abort_leaves_no_frame_and_moves_the_sequence",),
           "an aborted write leaves no frame in its slot"),
    Mutant("ring-no-stale", "senders/ring.py", "if int(u[_GEN]) != generation:\n                return Stale",
           "if False:\n                return Stale", ("tests/test_ring.py::test_a_new_ring_generation_makes_reads_stale_and_the_layout_is_a_consistent_snapshot",),
           "a read after a resize says Stale (reopen the slots)"),
    Mutant("ring-close-no-park", "senders/ring.py", "u[_LATEST] = (self.frame << _SLOT_BITS) | _SLOT_MASK\n",
           "pass\n", ("tests/test_ring.py::test_close_parks_latest_so_readers_stop_and_waiters_wake",),
           "a closing sender parks `latest` so readers stop and waiters wake"),
    Mutant("ring-publish-no-bump", "senders/ring.py", "u[_SEQ:_SEQ + n] += 1  # odd: a receiver mid-copy", "pass  # odd: a receiver mid-copy",
           ("tests/test_ring.py::test_a_reader_gets_the_newest_frame_and_nothing_before_the_first",), "a new ring generation moves every slot's sequence (mid-copy readers retry)"),
    # -- broker registry: quotas, limits, checks (docs/protocol.md, docs/architecture.md) ---------------------------
    Mutant("bytes-quota", "_broker/registry.py", "if client.bytes + desc.size > self.quotas.bytes:", "if False:",
           ("tests/test_registry.py::test_byte_quota_counts_what_a_client_registered_until_it_is_retired",), "REGISTER stays within the client's byte quota"),
    Mutant("bytes-quota-refund", "_broker/registry.py", "if rec.creator == client.id and rec.handle not in client.refs:\n            client.bytes -= rec.size",
           "if False:\n            client.bytes -= rec.size", ("tests/test_registry.py::test_byte_quota_counts_what_a_client_registered_until_it_is_retired",),
           "closing a resource gives its bytes back to its creator's quota"),
    Mutant("names-quota", "_broker/registry.py", "if len(client.names) >= self.quotas.names:", "if False:", ("tests/test_registry.py::test_quotas",),
           "a client publishes at most its quota of names"),
    Mutant("names-per-resource", "_broker/registry.py", "        if len(rec.names) >= MAX_NAMES:\n            raise QuotaExceeded(f\"{_fmt(handle)}",
           "        if False:\n            raise QuotaExceeded(f\"{_fmt(handle)}", ("tests/test_registry.py::test_names_per_resource_are_limited",),
           "a resource has at most 16 names (PUBLISH)"),
    Mutant("meta-limit", "_broker/registry.py", "if meta is not None and len(msgpack.packb(meta, use_bin_type=True)) > MAX_META:",
           "if False:", ("tests/test_registry.py::test_meta_is_limited_on_register_and_update",), "packed meta is at most 2 KiB (REGISTER, UPDATE)"),
    Mutant("descriptor-limit", "_broker/registry.py", "if len(packed) > MAX_DESCRIPTOR:", "if False:", ("tests/test_registry.py::test_packed_descriptor_is_limited",),
           "a packed descriptor is at most 16 KiB"),
    Mutant("fd-count", "_broker/registry.py", "if len(fds) != desc.nfds:", "if len(fds) < desc.nfds:", ("tests/test_registry.py::test_wrong_fd_count_and_bad_descriptor",),
           "REGISTER carries exactly the descriptor's fd count"),
    Mutant("size-seal", "_broker/registry.py", "if not facts.size_sealed:\n                raise", "if False:\n                raise",
           ("tests/test_registry.py::test_bad_memory_is_refused_and_fd_returned_for_closing",), "host-mappable memory must be size-sealed (no SIGBUS for importers)"),
    Mutant("memfd-size", "_broker/registry.py", "if facts.size < desc.required_size() or facts.size < desc.size:", "if False:",
           ("tests/test_registry.py::test_bad_memory_is_refused_and_fd_returned_for_closing",), "a memfd holds at least the descriptor's size"),
    Mutant("mutex-state-check", "_broker/registry.py", "if not (facts.size_sealed and facts.size == KEYED_MUTEX_STATE_SIZE):",
           "if False:", ("tests/test_registry.py::test_memory_must_be_sealed_against_both_shrinking_and_growing",), "a keyed-mutex state is a size-sealed memfd of 4096 bytes"),
    Mutant("fd-kind", "_broker/registry.py", "if facts.kind not in mt.fd_kinds:", "if False:", ("tests/test_registry.py::test_memory_fd_kinds_follow_the_memory_type_table",),
           "the memory fd is of a kind its memory type comes as"),
    Mutant("rejoin-proof", "_broker/registry.py", "not all(self.same_file(mine, theirs) for mine, theirs in zip(rec.fds, fds)):",
           "False:", ("tests/test_registry.py::test_register_under_a_free_handle_creates_it_and_holders_of_the_same_file_rejoin",), "only a holder of a handle's very files may re-attach to it"),
    Mutant("rejoin-descriptor", "_broker/registry.py", "if packed != rec.packed:", "if False:", ("tests/test_registry.py::test_register_under_a_free_handle_creates_it_and_holders_of_the_same_file_rejoin",),
           "re-attach needs the same descriptor"),
    Mutant("publish-holder", "_broker/registry.py", "if handle not in client.refs:\n            raise AccessDenied",
           "if False:\n            raise AccessDenied", ("tests/test_registry.py::test_names_are_unique_and_belong_to_their_publisher",), "only a holder may publish a resource"),
    Mutant("unpublish-owner", "_broker/registry.py", "if name not in client.names:", "if False:", ("tests/test_registry.py::test_names_are_unique_and_belong_to_their_publisher",),
           "only the publisher may unpublish a name"),
    Mutant("name-handle-prefix", "_broker/registry.py", "if Handle.claims_to_be(name):", "if False:", ("tests/test_registry.py::test_names_never_take_the_handle_prefix",),
           "names never start with tb: (the handles' prefix)"),
    Mutant("shutdown-rights", "_broker/registry.py", "if client.uid not in (self.policy.broker_uid, 0):", "if False:", ("tests/test_registry.py::test_policy_and_shutdown_rights",),
           "only the broker's uid or root may stop it"),
    Mutant("policy-allow-list", "_broker/registry.py", "return uid in (self.broker_uid, 0) or uid in self.allowed_uids",
           "return True", ("tests/test_registry.py::test_policy_and_shutdown_rights",), "only the broker's uid, root and --allow-uid may connect"),
    Mutant("close-not-held", "_broker/registry.py", "if rec is None or handle not in client.refs:", "if rec is None:", ("tests/test_registry.py::test_only_a_holder_closes_or_updates_a_resource",),
           "a client closes only references it holds"),
    Mutant("session-hijack", "_broker/registry.py", "if wanted is not None and 1 <= wanted <= MAX_SESSION and wanted not in self.sessions:",
           "if wanted is not None and 1 <= wanted <= MAX_SESSION:", ("tests/test_registry.py::test_session_ids_resume_when_free_and_abandon_follows_the_session",),
           "HELLO never grants a session id a connected client has"),
    Mutant("disconnect-abandons", "_broker/registry.py", "                fx.abandon.append((rec.fds[-1], client.session))\n            self._unref",
           "                pass\n            self._unref", ("tests/test_registry.py::test_session_ids_resume_when_free_and_abandon_follows_the_session",),
           "a disconnecting session's keyed mutexes are abandoned"),
    Mutant("close-abandons", "_broker/registry.py", "if client.refs.get(handle) == 1 and _has_mutex(rec):", "if False:",
           ("tests/test_registry.py::test_closing_the_last_reference_while_owning_the_keyed_mutex_abandons_it",), "closing the last reference while owning abandons the mutex"),
    Mutant("retire-closes-fds", "_broker/registry.py", "            fx.close.extend(rec.fds)\n            self.counters",
           "            self.counters", ("tests/test_registry.py::test_register_open_close_lifecycle_and_fd_ownership",), "a retired resource's fds are closed"),
    Mutant("error-message-cut", "_broker/registry.py", "if len(text) > MAX_MESSAGE:", "if False:", ("tests/test_registry.py::test_error_messages_are_bounded",),
           "an error reply's message is cut to 1024 characters"),
    Mutant("list-budget", "_broker/registry.py", "if page and used > LIST_BUDGET:", "if False:", ("tests/test_registry.py::test_list_pages_by_bytes_and_paging_sees_everything",),
           "a LIST page fits its byte budget"),
    Mutant("list-page", "_broker/registry.py", "limit = min(LIST_PAGE, max(1, msg.fields.get(\"limit\", LIST_PAGE)))",
           "limit = max(1, msg.fields.get(\"limit\", LIST_PAGE))", ("tests/test_registry.py::test_a_list_page_holds_at_most_list_page_entries_whatever_limit_asks",), "a LIST page holds at most 200"),
    Mutant("handle-range", "_broker/registry.py", "if not 1 <= handle < 1 << 64:", "if False:", ("tests/test_registry.py::test_register_under_a_free_handle_creates_it_and_holders_of_the_same_file_rejoin",),
           "a handle asked for at REGISTER is 64-bit and non-zero"),
    # -- protocol (docs/protocol.md: Frame) ------------------------------------------------------------------------
    Mutant("proto-version", "_protocol.py", "if type(version) is not int or version != VERSION:",
           "if version != VERSION:", ("tests/test_protocol.py::test_malformed_frames_are_remote_errors",), "version is exactly the integer 1 (not true, not 1.0)"),
    Mutant("proto-nfds", "_protocol.py", "if type(declared) is not int or declared != nfds:", "if type(declared) is not int:",
           ("tests/test_protocol.py::test_malformed_frames_are_remote_errors",), "nfds declared equals fds arrived"),
    Mutant("proto-fd-limits", "_protocol.py", "    if not lo <= nfds <= hi:\n        raise RemoteProtocolError",
           "    if False:\n        raise RemoteProtocolError", ("tests/test_protocol.py::test_malformed_frames_are_remote_errors",), "only REGISTER carries fds (1..4)"),
    Mutant("proto-hello-first", "_protocol.py", "State.AWAITING_HELLO: frozenset({Op.HELLO}),",
           "State.AWAITING_HELLO: REQUESTS,", ("tests/test_protocol.py::test_requests_before_hello_are_refused",), "hello must come first"),
    Mutant("proto-unknown-field", "_protocol.py", "        if typ is None:\n            raise", "        if typ is None:\n            continue\n            raise",
           ("tests/test_protocol.py::test_malformed_frames_are_remote_errors",), "unknown fields are refused"),
    Mutant("proto-depth", "_protocol.py", "if typ is dict and not _shallow(value, MAX_DEPTH):", "if False:",
           ("tests/test_protocol.py::test_deep_nesting_is_refused_with_a_reason",), "maps nest at most 16 deep"),
    Mutant("proto-bool-int", "_protocol.py", "if type(value) is not typ:",
           "if not isinstance(value, typ):", ("tests/test_protocol.py::test_malformed_frames_are_remote_errors",), "a bool is not an int on the wire"),
    Mutant("proto-string-length", "_protocol.py", "            if len(value) > MAX_NAME * 8:", "            if False:",
           ("tests/test_protocol.py::test_request_strings_are_at_most_1_kib",), "strings in requests are at most 1 KiB"),
    Mutant("proto-handle-xor-name", "_protocol.py", "if op in _ONE_TARGET and (\"handle\" in fields) == (\"name\" in fields):",
           "if False:", ("tests/test_protocol.py::test_malformed_frames_are_remote_errors",), "OPEN/INFO give exactly one of handle or name"),
    Mutant("proto-unpacker-reset", "_protocol.py", "        except BaseException:\n            self._fresh()\n            raise",
           "        except BaseException:\n            raise",
           ("tests/test_protocol.py::test_a_bad_frame_leaves_nothing_behind_for_the_next",),
           "a frame the connection's Unpacker could not decode leaves nothing for the next"),
    Mutant("proto-unpacker-consumed", "_protocol.py", "if unpacker.tell() != self._consumed:", "if False:",
           ("tests/test_protocol.py::test_a_bad_frame_leaves_nothing_behind_for_the_next",),
           "bytes after a frame's object are refused, not read as the next frame"),
    Mutant("proto-frame-size", "_protocol.py", "    if len(data) > MAX_FRAME:\n        raise LocalProtocolError",
           "    if False:\n        raise LocalProtocolError", ("tests/test_protocol.py::test_oversized_outgoing_message_is_local_error",), "no frame over 64 KiB is sent"),
    # -- descriptor validation (docs/protocol.md: Descriptor) --------------------------------------------------------
    Mutant("desc-pitch", "_descriptor.py", "_check(self.width * fmt.bytes_per_pixel <= pitch <= MAX_BYTES,",
           "_check(pitch <= MAX_BYTES,", ("tests/test_descriptor.py::test_invalid_descriptors_are_refused",), "a row pitch holds a row"),
    Mutant("desc-layout-size", "_descriptor.py", "_check(self.required_size() <= self.size,", "_check(True,",
           ("tests/test_descriptor.py::test_invalid_descriptors_are_refused",), "a layout fits its size"),
    Mutant("desc-dimensions", "_descriptor.py", "_check(1 <= v <= hi, f\"{name} must be 1..{hi}, not {v}\")",
           "_check(1 <= v, f\"{name} must be 1..{hi}, not {v}\")", ("tests/test_descriptor.py::test_each_dimension_limit_is_exact",), "dimensions, mips, layers within limits"),
    Mutant("desc-memfd-mips", "_descriptor.py", "_check(self.mip_levels == 1, f\"{self.memory} textures have one mip level\")",
           "pass", ("tests/test_descriptor.py::test_invalid_descriptors_are_refused",), "host-mappable textures have one mip level"),
    Mutant("desc-planes", "_descriptor.py", "_check(len(self.planes) <= MAX_PLANES,", "_check(True,", ("tests/test_descriptor.py::test_at_most_four_planes",),
           "at most 4 planes"),
    Mutant("desc-unknown-fields", "_descriptor.py", "        if unknown:\n            raise InvalidDescriptor",
           "        if False:\n            raise InvalidDescriptor", ("tests/test_descriptor.py::test_unknown_wire_fields_are_named_in_the_refusal",), "unknown descriptor fields are refused"),
    Mutant("desc-blob", "_descriptor.py", "len(self.runtime_private) <= MAX_BLOB,", "True,", ("tests/test_descriptor.py::test_invalid_descriptors_are_refused",),
           "runtime_private is at most 4 KiB"),
    # -- keyed mutex C core (docs/keyed-mutex.md): each of these rebuilds the extension twice ----------------------
    Mutant("km-any-key", "_synccore.c", "if (!LD(st->locked) && (LD(st->abandoned) || LD(st->key) == key)) {",
           "if (!LD(st->locked)) {", ("tests/test_keyed_mutex.py::test_new_mutex_is_free_with_its_initial_key",), "acquire(key) succeeds only when the mutex's key is `key`"),
    Mutant("km-release-non-owner", "_synccore.c", "        else if (!is_owner(c)) r = KR_NOT_OWNER;\n        else {", "        else if (0) r = KR_NOT_OWNER;\n        else {",
           ("tests/test_keyed_mutex.py::test_misuse_is_an_error",), "release by a non-owner is an error"),
    Mutant("km-lifo", "_synccore.c", "if (best < 0 || age > best_age) { best = i; best_age = age; }",
           "if (best < 0 || age < best_age) { best = i; best_age = age; }", ("tests/test_keyed_mutex.py::test_fifo_order_for_one_key",),
           "waiters for a key are served FIFO"),
    Mutant("km-no-sync-step", "_synccore.c", "ST(st->sync_value, svo != Py_None ? sv : LD(st->sync_value) + 1);",
           "ST(st->sync_value, svo != Py_None ? sv : LD(st->sync_value));", ("tests/test_keyed_mutex.py::test_sync_value_rises_by_default_and_can_be_set",),
           "each release without sync_value stores the last value + 1"),
    Mutant("km-abandon-any-session", "_synccore.c",
           "if (atomic_load(&st->locked) == 1 && atomic_load(&st->owner_session) == (uint32_t)session) {",
           "if (atomic_load(&st->locked) == 1) {", ("tests/test_keyed_mutex.py::test_abandon_session_from_the_broker_side",),
           "abandon_session abandons only that session's ownership (both checks: the early look and the locked one)",
           more=(("else if (LD(st->locked) && LD(st->owner_session) == (uint32_t)session) {",
                  "else if (LD(st->locked)) {"),)),
    Mutant("km-close-keeps", "_synccore.c", "    if (!c->broken) abandon_if_owner(c); /* a corrupted state", "    /* a corrupted state",
           ("tests/test_keyed_mutex.py::test_close_is_idempotent_and_closing_an_owner_abandons",), "close() of an owning handle abandons the mutex"),
    Mutant("km-pid-reuse", "_synccore.c", "return start == 0 || s == start;", "return 1;", ("tests/test_keyed_mutex.py::test_an_owner_whose_pid_now_names_another_process_is_dead",),
           "an owner whose pid was reused (other start time) counts as dead"),
    Mutant("km-zombie", "_synccore.c", "if (st == 'Z' || st == 'X' || st == 'x') return 0;\n    return start",
           "return start", ("tests/test_keyed_mutex.py::test_sigkill_of_the_holder_gives_waiters_abandoned_promptly",), "a zombie owner counts as dead"),
    Mutant("km-died-before-grant", "_synccore.c",
           "if (os >= 1 && os <= KM_SLOTS && slot_is_owner_grant(st, &st->slots[os - 1], SLOT_GRANTED)) {",
           "if (0) {", ("tests/test_keyed_mutex.py::test_an_owner_that_died_before_waking_from_its_grant_passes_it_on_unabandoned",), "an owner that died before waking from its grant did not touch the data: "
           "passed on, not abandoned"),
    Mutant("km-abandoned-sticks", "_synccore.c", "    ST(st->owner_slot, 0);\n    ST(st->locked, 1);\n    ST(st->abandoned, 0);",
           "    ST(st->owner_slot, 0);\n    ST(st->locked, 1);", ("tests/test_keyed_mutex.py::test_close_is_idempotent_and_closing_an_owner_abandons",),
           "the abandoned state is reported once, to the next owner only"),
    Mutant("km-private-cap", "_synccore.c", "if (pd.len > KM_PRIVATE) {", "if (pd.len > KM_PRIVATE + 1024) {", ("tests/test_keyed_mutex.py::test_misuse_is_an_error",),
           "private data over 2048 bytes is refused"),
    Mutant("km-header-check", "_synccore.c", "LD(st->private_len) > KM_PRIVATE || LD(st->owner_slot) > KM_SLOTS)",
           "LD(st->owner_slot) > KM_SLOTS)", ("tests/test_keyed_mutex.py::test_a_scribbled_private_length_is_corruption_never_an_overrun",), "a corrupted private_len is refused (no over-read)"),
    # -- fd checks (docs/protocol.md: fds that can never be GPU memory) ----------------------------------------------
    Mutant("fd-eventfd", "_fdinfo.py", 'frozenset({"eventfd", "eventpoll",', 'frozenset({"eventpoll",',
           ("tests/test_registry.py::test_fds_that_are_never_gpu_memory_are_refused",), "an eventfd is never GPU memory or a semaphore"),
    Mutant("fd-mem-major", "_fdinfo.py", "frozenset({1, 4, 5, 7, 10, 13}", "frozenset({4, 5, 7, 10, 13}",
           ("tests/test_registry.py::test_fds_that_are_never_gpu_memory_are_refused",), "/dev/null and /dev/zero (major 1) are never GPU memory"),
    Mutant("fd-memfd-semaphore", "_fdinfo.py", "or (semaphore and facts.kind == \"memfd\")", "or False",
           ("tests/test_registry.py::test_gpu_semaphore_fd_must_be_able_to_be_one",), "a file (memfd) is never a GPU semaphore"),
    Mutant("fd-both-seals", "_fdinfo.py", "_SIZE_SEALED = F_SEAL_SHRINK | F_SEAL_GROW  #",
           "_SIZE_SEALED = F_SEAL_SHRINK  #", ("tests/test_registry.py::test_memory_must_be_sealed_against_both_shrinking_and_growing",),
           "size-sealed means sealed against shrinking and growing"),
    # -- broker server: bounded and fd-tight whatever a client sends -------------------------------------------------
    Mutant("conn-limit", "_broker/server.py", "if refusal is None and held >= self.max_connections:", "if False:",
           ("tests/test_broker.py::test_connections_per_uid_are_limited",), "a uid holds at most its connection limit"),
    Mutant("refused-fds-leak", "_broker/server.py", "        if peer.refusal is not None:\n            _close_all(fds)\n",
           "        if peer.refusal is not None:\n", ("tests/test_broker.py::test_a_refused_client_s_fds_are_closed",),
           "a refused client's fds are closed, not kept"),
    Mutant("undecodable-fds-leak", "_broker/server.py", "        except Exception as e:\n            _close_all(fds)\n",
           "        except Exception as e:\n", ("tests/test_broker.py::test_wrong_fd_counts_close_every_fd",),
           "the fds of a frame that does not decode are closed"),
    Mutant("slow-client-unbounded", "_broker/server.py", "if len(peer.queue) >= _MAX_QUEUE:", "if False:",
           ("tests/test_broker.py::test_a_client_that_never_reads_its_replies_is_disconnected",), "a client that does not read is disconnected past 1024 queued frames"),
    Mutant("truncation-unseen", "_seqpacket.py", "return data, fds, bool(flags & _TRUNCATED)", "return data, fds, False",
           ("tests/test_broker.py::test_fds_dropped_by_a_broker_out_of_fds_are_answered_busy",), "a frame cut by the kernel (MSG_TRUNC/CTRUNC) is an error"),
    Mutant("out-of-fds-check-raises", "_broker/server.py", "    except OSError as e:\n        return e.errno in _FD_ERRORS",
           "    except ValueError:\n        return True", ("tests/test_broker.py::test_fds_dropped_by_a_broker_out_of_fds_are_answered_busy",),
           "a broker out of fds answers busy when the kernel dropped a frame's fds (the check itself needs an fd)"),
    Mutant("runtime-dir-open", "_broker/daemon.py", "ensure_runtime_dir(0o711 if args.allow_uid else 0o700)",
           "ensure_runtime_dir(0o711)", ("tests/test_daemon.py::test_the_runtime_directory_and_socket_modes_are_the_first_gate",),
           "without --allow-uid the runtime directory is 0700 (other users cannot reach the socket)"),
    Mutant("socket-open", "_broker/daemon.py", "os.chmod(path, 0o666 if args.allow_uid else 0o600)", "os.chmod(path, 0o666)",
           ("tests/test_daemon.py::test_the_runtime_directory_and_socket_modes_are_the_first_gate",),
           "without --allow-uid the socket is 0600"),
    Mutant("upload-casts", "_resources.py", "    if arr.dtype != dtype:\n", "    if False:\n",
           ("tests/test_bad_input.py::test_upload_never_reshapes_or_casts",), "uploads and sends never cast pixels silently"),
    # -- liveness and senders -------------------------------------------------------------------------------------
    Mutant("pid-reuse", "_liveness.py", "    return start == 0 or s == start", "    return True",
           ("tests/test_liveness.py::test_a_different_start_time_is_a_reused_pid",), "a reused pid (other start time) is not the recorded process"),
    Mutant("ring-attach-dead-rows", "senders/ring.py", "if row_pid == 0 or not alive(row_pid):", "if row_pid == 0:",
           ("tests/test_ring.py::test_attach_reuses_dead_rows_and_refuses_when_full",), "rows of dead readers are reused"),
    Mutant("ring-drop-live-reader", "senders/ring.py",
           "if r[i, _R_CONSUMED] < self.frame and not alive(int(r[i, _R_PID])):", "if r[i, _R_CONSUMED] < self.frame:",
           ("tests/test_ring.py::test_frame_sync_counts_consumption_and_drops_dead_readers",), "frame_sync drops only readers whose process died"),
    Mutant("ring-no-ack", "senders/ring.py", "            if int(u[_SYNC]):\n", "            if False:\n",
           ("tests/test_ring.py::test_frame_sync_counts_consumption_and_drops_dead_readers",), "a frame_sync reader acknowledges each frame it consumes"),
    Mutant("memfd-imports-gpu-memory", "backends/memfd.py", "            check_importer(descriptor.memory, \"memfd\",", "            (descriptor.memory, \"memfd\",",
           ("tests/test_memfd.py::test_gpu_memory_is_never_mapped_as_a_cpu_layout",),
           "the memfd backend imports only memfd memory"),
]


def run_tests(tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    failed = [ln.split(" - ")[0].split()[1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    summary = lines[-1] if lines else p.stderr[-300:]
    return p.returncode, f"{summary}: {failed[0]}" if failed else summary


def rebuild() -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
                   cwd=ROOT, check=True, capture_output=True)


def dirty(path: Path) -> bool:
    return subprocess.run(["git", "diff", "--quiet", "--", str(path)], cwd=ROOT).returncode != 0


def check(m: Mutant, repeat: int, timeout: float) -> tuple[bool, list[str]]:
    path = ROOT / SRC / m.file
    original = path.read_text()
    mutated = original
    for old, new in m.edits:
        count = mutated.count(old)
        if count != 1:
            raise SystemExit(f"{m.name}: the text to mutate occurs {count} times in {m.file} (the code moved?)")
        mutated = mutated.replace(old, new, 1)
    results = []
    try:
        path.write_text(mutated)
        if path.suffix == ".c":
            rebuild()
        for _ in range(repeat):
            rc, last = run_tests(m.tests, timeout)
            results.append(f"rc={rc} {last}")
            if rc == 0:
                break  # survived once: no need to run it again
    finally:
        path.write_text(original)
        if path.suffix == ".c":
            rebuild()
    if dirty(path):
        raise SystemExit(f"{m.name}: {m.file} differs from git after restoring: check it by hand")
    caught = len(results) == repeat and all(not r.startswith("rc=0 ") for r in results)
    return caught, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true", help="only check that each mutant's text is still in its file")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mutant; caught only if every run fails")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    names = {m.name for m in MUTANTS}
    if len(names) != len(MUTANTS):
        raise SystemExit("duplicate mutant names")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28} {m.file:28} {m.guarantee}")
        return 0
    if args.check:
        moved = [m.name for m in MUTANTS
                 if any((ROOT / SRC / m.file).read_text().count(old) != 1 for old, _ in m.edits)]
        print(f"{len(MUTANTS) - len(moved)}/{len(MUTANTS)} mutants apply" + (f"; moved: {', '.join(moved)}"
                                                                          if moved else ""))
        return 1 if moved else 0
    unknown = set(args.names) - names
    if unknown:
        raise SystemExit(f"unknown mutants: {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    for m in chosen:
        if dirty(ROOT / SRC / m.file):
            raise SystemExit(f"{m.file} has uncommitted changes: commit or stash them first")
    survivors = []
    for m in chosen:
        t0 = time.monotonic()
        caught, results = check(m, args.repeat, args.timeout)
        print(f"{'CAUGHT  ' if caught else 'SURVIVED'} {m.name:28} {time.monotonic() - t0:6.1f}s  {results[-1]}",
              flush=True)
        if not caught:
            survivors.append(m.name)
    print(f"{len(chosen) - len(survivors)}/{len(chosen)} caught" + (f"; survived: {', '.join(survivors)}"
                                                                     if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
