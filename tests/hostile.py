"""A hostile upstream for tests: what real resolvers and attackers send, built with dnspython.

`HostileStub` has the real UDP and TCP sockets of `tests.dnsstub.StubResolver` (and records every query
it gets in `seen`), but answers with dnspython, which knows record types dnslib does not, and keeps
every reply it sent in `sent`. The first label of the name asked chooses the answer:

    rr.*       one record of the type asked, owned by the name, with the sample data of `SAMPLES`
               (every non-meta type dnspython knows; types it has no class for as RFC 3597 generic data)
    leak.*     its A record, and records of blocked names (chat.deepseek.com, deepseek.com) in the answer,
               authority and additional sections, beside a denial record (NSEC) owned by a blocked name
    opts.*     an A record, and an OPT carrying NSID, COOKIE, Client Subnet, EDE, padding and an unknown option
    ad.*       an A record with AD set ("validated")
    mapped.*   AAAA ::ffff:203.0.113.7 (an IPv4-mapped address)
    nat64.*    AAAA 64:ff9b::203.0.113.8 (RFC 6052: the well-known NAT64 prefix over an IPv4 address)
    dname.*    a DNAME of the name to chat.deepseek.com and the CNAME it synthesizes
    dnameok.*  a DNAME of the name to elsewhere.test and the CNAME it synthesizes
    svcbhint.* SVCB 1 . with ipv4hint 203.0.113.9
    svcbto.*   SVCB 1 chat.deepseek.com.
    cut.*      an answer whose one record is cut short (a message no client could read)
    (type DS)  the DS RRset of the name and its RRSIG, and beside them records the name owns in the zone
               below the cut (A, TXT, AAAA, and an RRSIG over its A) in every section, an NSEC owned by it
               and the parent's SOA
    anything else: an A record (tests.dnsstub.address_for)

A name with a label `slowly` (ad.slowly.example.test) is answered after 0.3 s, so that identical queries
sent at once are coalesced by sinkhole into one upstream query.
"""

from __future__ import annotations

import time

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.dnsstub import Seen, StubResolver, address_for

# Presentation-form data for every type dnspython has a class for (types without one get generic data;
# a dnspython that learns a new type makes `sample` fail with its name until it is added here).
SAMPLES = {
    "A": "192.0.2.1", "NS": "ns.example.test.", "CNAME": "target.example.test.",
    "SOA": "ns.example.test. hostmaster.example.test. 1 3600 600 86400 300", "PTR": "host.example.test.",
    "HINFO": '"cpu" "os"', "MINFO": "rmail.example.test. email.example.test.", "MX": "10 mail.example.test.",
    "TXT": '"text" "two strings"', "RP": "mbox.example.test. txt.example.test.", "AFSDB": "1 afs.example.test.",
    "X25": '"311061700956"', "ISDN": '"150862028003217" "004"', "RT": "0 relay.example.test.",
    "NSAP": "0x47000580ffff000000321099991111222233334444", "NSAP_PTR": "host.example.test.",
    "SIG": "NSEC 1 3 3600 20200101000000 20190101000000 2143 example.test. AIYADP8d3zYNyQwW2EM4wXVFdslEJcUx"
           "/fxkfBeH1El4ixPFhpfHFElxbvKoWmvjDTCmfiYy2X+8XpFjwICHc398kzWsTMKlxovpz2FnCTM=",
    "KEY": "512 255 1 AQMFD5raczCJHViKtLYhWGz8hMY9UGRuniJDBzC7w0aRyzWZriO6i2odGWWQVucZqKVsENW91IOW4vqudngPZsY3"
           "GvQ/xVA8/7pyFj6b7Esga60zyGW6LFe9r8n6paHrlG5ojqf0BaqHT+8=",
    "PX": "10 map822.example.test. mapx400.example.test.", "GPOS": "-22.6882 116.8652 250.0",
    "AAAA": "2001:db8::1", "LOC": "60 9 0.000 N 24 39 0.000 E 10.00m 20.00m 2000.00m 20.00m",
    "SRV": "0 5 5060 sip.example.test.", "NAPTR": '100 10 "U" "E2U+sip" "!^.*$!sip:info@example.test!" .',
    "KX": "10 kx.example.test.", "CERT": "1 2 3 AQID", "DNAME": "new.example.test.",
    "APL": "1:192.168.32.0/21 !1:192.168.38.0/28", "DS": "60485 5 1 2BB183AF5F22588179A53B0A98631FAD1A292118",
    "SSHFP": "4 2 123456789abcdef67890123456789abcdef67890123456789abcdef123456789",
    "IPSECKEY": "10 1 2 192.0.2.38 AQNRU3mG7TVTO2BkR47usntb102uFJtugbo6BSGvgqt4AQ==",
    "RRSIG": "A 13 3 300 20400101000000 20200101000000 2143 example.test. AIYADP8d3zYNyQwW2EM4wXVFdslEJcUx"
             "/fxkfBeH1El4ixPFhpfHFElxbvKoWmvjDTCmfiYy2X+8XpFjwICHc398kzWsTMKlxovpz2FnCTM=",
    "NSEC": "next.example.test. A MX RRSIG NSEC TYPE1234",
    "DNSKEY": "257 3 13 ysp/DS1vXohaV7eW2wK7zGlcK31ubfhpjmmRXDUPUTy4u7JiBiw26qwV44s3hbiCcTXmFurD9rF3aJooa2U0aQ==",
    "DHCID": "AAIBY2/AuCccgoJbsaxcQc9TUapptP69lOjxfNuVAA2kjEA=",
    "NSEC3": "1 1 12 aabbccdd 2t7b4g4vsa5smi47k61mv5bv1a22bojr MX DNSKEY NS SOA NSEC3PARAM RRSIG",
    "NSEC3PARAM": "1 1 12 aabbccdd",
    "TLSA": "3 1 1 d2abde240d7cd3ee6b4b28c54df034b97983a1d16e8a410e4561cb106618e971",
    "SMIMEA": "3 1 1 d2abde240d7cd3ee6b4b28c54df034b97983a1d16e8a410e4561cb106618e971",
    "HIP": "2 200100107B1A74DF365639CC39F1D578 AwEAAbdxyhNuSutc5EMzxTs9LBPCIkOFH8cIvM4p9+LrV4e19WzK00+CI6zBCQTdtWsux"
           "KbWIy87UOoJTwkUs7lBu+Upr1gsNrut79ryra+bSRGQb1slImA8YVJyuIDsj7kwzG7jnERNqnWxZ48AWkskmdHaVDP4BcelrTI3r"
           "MXdXF5D rvs1.example.test.",
    "NINFO": '"info"', "CDS": "60485 5 1 2BB183AF5F22588179A53B0A98631FAD1A292118",
    "CDNSKEY": "257 3 13 ysp/DS1vXohaV7eW2wK7zGlcK31ubfhpjmmRXDUPUTy4u7JiBiw26qwV44s3hbiCcTXmFurD9rF3aJooa2U0aQ==",
    "OPENPGPKEY": "mQINBFit2jsBEADrbl5vjVxYeAE0g0IDYCBpHirv1Sjlqxx5gjtPhb2YhvyDMXjq",
    "CSYNC": "66 3 A NS AAAA",
    "ZONEMD": "2018031500 1 1 FEBE3D4CE2EC2FFA4BA99D46CD69D6D29711E55217057BEE7EB1A7B641A47BA7FED2DD5B97AE499FAFA4F"
              "22C6BD647DE",
    "SVCB": "1 svc.example.test. alpn=h2 port=8443 ipv4hint=192.0.2.1", "HTTPS": "1 . alpn=h2,h3 ipv6hint=2001:db8::1",
    "DSYNC": "CDS 1 5359 cds-scanner.example.test.", "HHIT": "AAAA", "BRID": "AAAA",
    "SPF": '"v=spf1 -all"', "NID": "10 0014:4fff:ff20:ee64", "L32": "10 10.1.2.0", "L64": "10 2001:0db8:1140:1000",
    "LP": "10 l64-subnet.example.test.", "EUI48": "00-00-5e-00-53-2a", "EUI64": "00-00-5e-ef-10-00-00-2a",
    "URI": '10 1 "ftp://ftp1.example.test/public"', "CAA": '0 issue "ca.example.net"',
    "AVC": '"app-name:WOLFGANG|app-class:OAM"', "AMTRELAY": "0 0 3 relay.example.test.",
    "RESINFO": "qnamemin exterr=15,16,17", "WALLET": '"BTC" "bc1qxy"',
    "DLV": "60485 5 1 2BB183AF5F22588179A53B0A98631FAD1A292118", "WKS": "10.0.0.1 6 0 1 2 21 23",
}
GENERIC = r"\# 6 0a0000010203"  # RFC 3597 form, for the types dnspython has no class for


def data_types() -> list[dns.rdatatype.RdataType]:
    """Every record type dnspython knows that may hold data (not OPT, TSIG, TKEY, the query-only types ...)."""
    return [t for t in dns.rdatatype.RdataType if not dns.rdatatype.is_metatype(t) and t != 0]


def sample(rdtype: dns.rdatatype.RdataType) -> dns.rdata.Rdata:
    known = dns.rdata.get_rdata_class(dns.rdataclass.IN, rdtype) is not dns.rdata.GenericRdata
    text = SAMPLES[rdtype.name] if known else GENERIC
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text, relativize=False)


def _rrset(name: str, ttl: int, rdtype: str, *texts: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, *texts)


class HostileStub(StubResolver):
    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.sent: list[bytes] = []

    def respond(self, wire: bytes, proto: str, src: tuple) -> list[bytes]:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return []
        question = query.question[0]
        qname = question.name.to_text(omit_final_dot=True).lower()
        with self._lock:
            self.seen.append(Seen(proto, query.id, src, qname, dns.rdatatype.to_text(question.rdtype), wire))
        labels = qname.split(".")
        first = labels[0]
        if "slowly" in labels:
            time.sleep(0.3)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        name = question.name.to_text()
        out: bytes | None = None
        if question.rdtype == dns.rdatatype.DS and first != "rr":
            rrsig = "{} 13 2 300 20400101000000 20200101000000 2143 example.test. " + SAMPLES["RRSIG"].split()[-1]
            reply.answer += [_rrset(name, 300, "DS", SAMPLES["DS"]), _rrset(name, 300, "RRSIG", rrsig.format("DS")),
                             _rrset(name, 300, "A", "198.51.100.77"), _rrset(name, 300, "RRSIG", rrsig.format("A"))]
            reply.authority += [_rrset(name, 300, "TXT", '"below the cut"'),
                                _rrset(name, 300, "NSEC", "z.example.test. NS DS RRSIG NSEC"),
                                _rrset("com.", 300, "SOA", SAMPLES["SOA"])]
            reply.additional += [_rrset(name, 300, "AAAA", "2001:db8:bad::77")]
        elif first == "rr":
            rdataset = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
            rdataset.add(sample(dns.rdatatype.RdataType.make(question.rdtype)), 300)
            reply.answer.append(rdataset)
        elif first == "leak":
            reply.answer += [_rrset(name, 300, "A", address_for(qname)),
                             _rrset("chat.deepseek.com.", 300, "A", "198.51.100.66")]
            reply.authority += [_rrset("example.test.", 300, "NS", "ns.example.test."),
                                _rrset("deepseek.com.", 300, "NS", "ns1.deepseek.com."),
                                _rrset("deepseek.com.", 300, "NSEC", "f.example.test. A NS SOA RRSIG NSEC")]
            reply.additional += [_rrset("ns.example.test.", 300, "A", "192.0.2.53"),
                                 _rrset("chat.deepseek.com.", 300, "AAAA", "2001:db8:bad::66"),
                                 _rrset("ns1.deepseek.com.", 300, "A", "198.51.100.53")]
        elif first == "opts":
            reply.answer.append(_rrset(name, 300, "A", address_for(qname)))
            reply.use_edns(0, payload=4096, options=[
                dns.edns.GenericOption(dns.edns.NSID, b"upstream-resolver-7"),
                dns.edns.GenericOption(dns.edns.COOKIE, b"\x01" * 8 + b"\x02" * 16),
                dns.edns.ECSOption("10.1.2.0", 24, 24),
                dns.edns.EDEOption(dns.edns.EDECode.DNSSEC_BOGUS, "upstream's own words"),
                dns.edns.GenericOption(dns.edns.PADDING, b"\x00" * 32),
                dns.edns.GenericOption(65001, b"unknown"),
            ])
        elif first == "ad":
            reply.flags |= dns.flags.AD
            reply.answer.append(_rrset(name, 300, "A", address_for(qname)))
        elif first == "mapped":
            reply.answer.append(_rrset(name, 300, "AAAA", "::ffff:203.0.113.7"))
        elif first == "nat64":
            reply.answer.append(_rrset(name, 300, "AAAA", "64:ff9b::203.0.113.8"))
        elif first in ("dname", "dnameok"):
            target = "chat.deepseek.com." if first == "dname" else "elsewhere.test."
            reply.answer += [_rrset(name, 300, "DNAME", target),
                             _rrset(f"www.{name}", 300, "CNAME", f"www.{target}")]
        elif first == "svcbhint":
            reply.answer.append(_rrset(name, 300, "SVCB", "1 . alpn=h2 ipv4hint=203.0.113.9"))
        elif first == "svcbto":
            reply.answer.append(_rrset(name, 300, "SVCB", "1 chat.deepseek.com. alpn=h2"))
        elif first == "cut":
            reply.answer.append(_rrset(name, 300, "A", address_for(qname)))
            reply.use_edns(False)
            out = reply.to_wire()[:-2]  # the A record's data cut short
        else:
            reply.answer.append(_rrset(name, 300, "A", address_for(qname)))
        if out is None:
            out = reply.to_wire()
        with self._lock:
            self.sent.append(out)
        return [out]
