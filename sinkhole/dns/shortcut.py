"""The fast path's parts made from the pipeline's: the Blocker of one client group (its templates come from
answer.blocked, so that its answers are the pipeline's byte for byte), and the audit tags.

An audit tag is a number standing for everything an audit row of one answer says but the client, the
transport and the time (name, type, action, rule, category, rcode, answer, policy version, group, name as
asked, list): the fast path's rows carry the number, and the audit writer learns what it stands for once
(`Tags.take_new`).
"""

from __future__ import annotations

import sys

from sinkhole.dns import answer, codec, fast
from sinkhole.model import Action, Rule, RuleKind
from sinkhole.policy.decide import CANARIES, Group, Policy

# what a tag stands for, in this order
DESCRIPTION = ("qname", "qtype", "action", "rule", "category", "rcode", "answer", "policy_version", "group", "asked",
               "source")
MAX_TAGS = 1_000_000  # then numbering goes on, and the writer forgets the oldest half


class Tags:
    """Audit row descriptions by number; new ones are handed to the writer before the rows that use them."""

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}
        self._new: list[tuple[int, tuple]] = []
        self.next = 0

    def __len__(self) -> int:
        return len(self._ids)

    def tag(self, description: tuple) -> int:
        found = self._ids.get(description)
        if found is None:
            if len(self._ids) >= MAX_TAGS:
                self._ids.clear()
            found = self._ids[description] = self.next
            self.next += 1
            self._new.append((found, description))
        return found

    def take_new(self) -> list[tuple[int, tuple]]:
        new, self._new = self._new, []
        return new


def blocker(table: fast.Table, policy: Policy, group: Group, answers: answer.AnswerConfig, audited: bool,
            tags: Tags) -> fast.Blocker:
    """The Blocker answering `group`'s clients under `policy` as Pipeline.begin does (put into `table`)."""
    version = policy.version
    gname = None if group is policy.default else group.name  # the metrics key: None for the default group
    row_group = group.name

    def template(packet: bytes, domain: str, entry: tuple) -> tuple[bytes, bytes, int, str]:
        query = codec.decode_query(packet)
        built = answer.blocked(query, Rule(domain, entry[0], entry[1], entry[2]), answers, version or 1)
        return built.wire[2:12], built.wire[12 + len(query.question):], built.rcode, built.summary

    def describe(packet: bytes, qname: str, qtype: int, domain: str, entry: tuple, rcode: int,
                 summary: str) -> tuple[tuple, int | None]:
        kind = (Action.BLOCKED.value, qtype, gname)
        if not audited:
            return kind, None
        question = packet[12:]
        asked = qname if question.lower() == question else codec.asked_name(packet)
        return kind, tags.tag((qname, qtype, Action.BLOCKED.value, domain, entry[1], rcode, summary, version,
                               row_group, asked, entry[2]))

    twin = sys.modules[type(table).__module__]  # the Blocker of the table's own module (compiled or pure)
    made = twin.Blocker(table, policy._map, group.allowed, RuleKind.ALLOW,
                        CANARIES if policy.canaries else (), bool(policy._regexes), template, describe)
    table.blocker = made
    return made
