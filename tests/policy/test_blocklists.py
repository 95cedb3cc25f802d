"""The shipped lists: well-formed, sourced, free of shared parents; loaded on first start; bad lists rejected."""

from __future__ import annotations

import re

import pytest

from sinkhole.errors import ListFormatError
from sinkhole.model import RuleKind
from sinkhole.policy import lists
from sinkhole.store.db import open_store
from tests.conftest import ROOT, ask

SHIPPED = sorted((ROOT / "blocklists").glob("*.txt"))
README = (ROOT / "blocklists" / "README.md").read_text(encoding="utf-8")

# Parents shared by unrelated services: no shipped rule may equal one or cover one.
NEVER_BLOCK = """google.com googleapis.com gstatic.com microsoft.com cloud.microsoft bing.com x.com tencent.com qq.com
baidu.com baidubce.com aliyun.com aliyuncs.com volces.com volcengine.com volccdn.com fengkongcloud.com xfyun.cn
iflytek.com azure.com windows.net cloudflare.net cdn.cloudflare.net amazonaws.com azureedge.net azurefd.net
imgix.net b-cdn.net cloudinary.com workers.dev github.com apple.com icloud.com facebook.com meta.com instagram.com
whatsapp.com live.com office.com youtube.com livekit.cloud gemini.com yahoo.com""".split()
# Look-alikes that are not the service (research §5.3)
NOT_THE_SERVICE = ["gemini.com", "deepseek.ai", "deepseekv3.net", "deepseekap.org", "chat-deep.ai"]


def test_lists_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"deepseek", "genai", "genai-cn", "doh-bypass"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_entry_is_valid_and_cites_a_source_in_the_index(path):
    bl = lists.load_file(path)
    assert bl.headers["category"] == path.stem
    # index rows look like `| V2 | repo/path@commit |`; `RT-x` stands for the RT-<project> family
    ids = set(re.findall(r"^\|\s*`?([A-Z][A-Za-z0-9-]*)`?\s*\|", README, flags=re.M))
    ids |= {i[:-1] for i in ids if i.endswith("-x")}
    assert ids, "blocklists/README.md must carry the source index"
    for domain, note in bl.entries:
        assert note, f"{path.name}: {domain} has no source"
        cited = set()
        for token in re.findall(r"\b[A-Z][A-Za-z0-9-]*", note.split(" — ")[0]):
            cited |= {token, token.split("-")[0] + "-"}
        assert cited & ids, f"{path.name}: {domain} cites no source from the index: {note!r}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_no_shared_parent_or_lookalike_is_listed(path):
    for domain, _ in lists.load_file(path).entries:
        for parent in NEVER_BLOCK:
            assert not (parent == domain or parent.endswith("." + domain)), f"{domain} would block {parent}"
        assert domain not in NOT_THE_SERVICE


def test_deepseek_list_covers_every_known_host():
    entries = {d for d, _ in lists.load_file(ROOT / "blocklists" / "deepseek.txt").entries}
    for host in ["deepseek.com", "chat.deepseek.com", "api.deepseek.com", "platform.deepseek.com",
                 "cdn.deepseek.com", "static.deepseek.com", "fe-static.deepseek.com", "api-docs.deepseek.com"]:
        assert host in entries


def test_first_start_loads_the_default_shipped_lists(db):
    store = open_store(db)
    try:
        rules = store.list_rules(RuleKind.BLOCK)
        cats = {r["category"] for r in rules}
        assert {"deepseek", "genai", "genai-cn", "doh-bypass"} <= cats
        assert "deepseek-telemetry" not in cats  # `# default: off`: opt-in
        chat = next(r for r in rules if r["domain"] == "chat.deepseek.com")
        assert chat["source"] == "blocklists/deepseek.txt" and "JP" in chat["note"]
        journal = store.journal()
        assert [j["action"] for j in journal] == ["lists load"] * len(journal)
    finally:
        store.close()
    # a second open does not load them again over the operator's changes
    store = open_store(db)
    store.remove_rules(RuleKind.BLOCK, ["claude.ai"])
    store.close()
    store = open_store(db)
    assert not [r for r in store.list_rules(RuleKind.BLOCK) if r["domain"] == "claude.ai"]
    store.close()


def test_fresh_server_blocks_shipped_names(make_server, stub):
    s = make_server(upstream=(stub.address,))
    for name in ["chat.deepseek.com", "api.deepseek.com", "chatgpt.com", "claude.ai", "gemini.google.com",
                 "kimi.moonshot.cn", "yiyan.baidu.com", "dns.google", "cloudflare-dns.com", "dns.quad9.net"]:
        assert ask(s, name).answer[0][0].to_text() == "0.0.0.0", name
    for name in ["www.google.com", "www.bing.com", "www.baidu.com", "gemini.com", "www.cloudflare.com",
                 "www.quad9.net"]:
        assert ask(s, name).answer[0][0].to_text().startswith("192.0.2."), name


@pytest.mark.parametrize("text,line,reason", [
    ("good.example\nbad..example\n", 2, "empty label"),
    ("# header\n\na.example  # ok\n" + "x" * 64 + ".example\n", 4, "over 63"),
    ("a.example\nb.example c.example\n", 2, "one domain per line"),
    ("0.0.0.0 a.example\n10.1.2.3 b.example\n", 2, "not a sink address"),
    ("||a.example^\n||b.example\n", 2, "must end with '^'"),
    ("# only comments\n", 0, "no domain"),
])
def test_broken_list_is_rejected_whole_with_line_number(text, line, reason):
    with pytest.raises(ListFormatError) as err:
        lists.parse(text, "test.txt")
    assert err.value.line == line and reason in err.value.reason
    assert str(err.value).startswith(f"test.txt:{line}: ")


def test_hosts_plain_and_adblock_forms_parse():
    text = "127.0.0.1 localhost\n0.0.0.0 A.Example.\n||b.example^\nc.example # note\nbücher.example\n"
    bl = lists.parse(text, "mixed.txt")
    assert bl.entries == [("a.example", ""), ("b.example", ""), ("c.example", "note"),
                          ("xn--bcher-kva.example", "")]


def test_no_shipped_lists_is_warned_about(tmp_path, monkeypatch, caplog):
    import logging

    empty = tmp_path / "lists"
    empty.mkdir()
    monkeypatch.setenv("SINKHOLE_BLOCKLISTS", str(empty))
    monkeypatch.setattr(lists, "shipped_dir", lambda: None)
    caplog.set_level(logging.WARNING)
    store = open_store(tmp_path / "new.db")
    store.close()
    assert any("nothing is blocked" in r.getMessage() for r in caplog.records)
