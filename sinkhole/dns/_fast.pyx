# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The per-packet fast path, compiled: the twin of `sinkhole.dns._fastpure` (read that module's docstring;
every name and behaviour is the same, tests/dns/test_fast.py runs against both). What only this one does:
`UdpFast.drain` reads up to 32 datagrams per system call (recvmmsg) and sends the answers it has in one
(sendmmsg), the reply's ID and tail as two pieces of one message, without copying the tail; a client is
looked up by its raw address (text is made once per address, not per packet)."""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.ref cimport PyObject
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from cpython.unicode cimport PyUnicode_DecodeASCII

import socket as _socket

COMPILED = True
MAX_ENTRIES = 100_000
MAX_PACKET = 512
MAX_CLIENTS = 65_536
INF = float("inf")

cdef double _INF = float("inf")


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct iovec:
        void *iov_base
        size_t iov_len

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    int recvmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int sockfd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int AF_INET
    int AF_INET6
    int MSG_DONTWAIT
    int MSG_TRUNC

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr

    struct in6_addr:
        uint8_t s6_addr[16]

    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    unsigned short ntohs(unsigned short)
    uint32_t ntohl(uint32_t)

cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)


# ---------------------------------------------------------------------------- the table


# not tracked by the cyclic garbage collector: an entry holds bytes, numbers and tuples of them (its kind is
# (action, qtype, transport, group name), its tag a number), never a cycle; an object that could refer back to a
# table must not be put in one (it would never be collected)
@cython.no_gc
cdef class Entry:
    cdef public bytes tail
    cdef public object kind
    cdef public object tag
    cdef public bint cached
    cdef public bytes base
    cdef public tuple offsets
    cdef public tuple ttls
    cdef public double stored
    cdef public double expires
    cdef public double refresh_at
    cdef public long elapsed

    def __init__(self, bytes tail, object kind, object tag):
        self.tail = tail
        self.kind = kind
        self.tag = tag
        self.cached = False
        self.base = tail
        self.offsets = ()
        self.ttls = ()
        self.stored = 0.0
        self.expires = _INF
        self.refresh_at = _INF
        self.elapsed = 0


cdef bytes _aged(bytes base, tuple offsets, tuple ttls, long elapsed):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(base), i, off
    cdef bytes out = PyBytes_FromStringAndSize(PyBytes_AS_STRING(base), n)
    cdef uint8_t *p = <uint8_t *> PyBytes_AS_STRING(out)
    cdef long ttl
    for i in range(len(offsets)):
        off = offsets[i]
        ttl = ttls[i]
        ttl -= elapsed
        if ttl < 0:
            ttl = 0
        if off < 0 or off + 4 > n:
            continue
        p[off] = (ttl >> 24) & 0xFF
        p[off + 1] = (ttl >> 16) & 0xFF
        p[off + 2] = (ttl >> 8) & 0xFF
        p[off + 3] = ttl & 0xFF
    return out


cdef class Table:
    cdef dict _entries
    cdef public Py_ssize_t max_entries
    cdef public Py_ssize_t hits
    cdef public object blocker

    def __init__(self, Py_ssize_t max_entries=MAX_ENTRIES):
        self.max_entries = max_entries
        self._entries = {}
        self.hits = 0
        self.blocker = None

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()

    cdef bint _put(self, bytes packet, Entry entry):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(packet)
        if n > MAX_PACKET or n < 12 or self.max_entries <= 0:
            return False
        if len(self._entries) >= self.max_entries:
            self._evict()
        self._entries[packet[2:]] = entry
        return True

    cdef void _evict(self):
        """The oldest eighth goes (dicts keep insertion order): a flood of new names costs a table's worth of
        memory, and the names asked again and again stay (a full clear sent all of them the slow way)."""
        cdef Py_ssize_t n = len(self._entries) // 8 + 1
        cdef list old = []
        for key in self._entries:
            old.append(key)
            if len(old) >= n:
                break
        for key in old:
            del self._entries[key]

    def put_blocked(self, bytes packet, bytes reply, object kind=None, object tag=None):
        return self._put(packet, Entry(reply[2:], kind, tag))

    def put_cached(self, bytes packet, bytes reply, offsets, ttls, double stored, double expires,
                   double refresh_at=_INF, object kind=None, object tag=None):
        cdef Entry entry = Entry(reply[2:], kind, tag)
        entry.cached = True
        entry.offsets = tuple([o - 2 for o in offsets])
        entry.ttls = tuple(ttls)
        entry.stored = stored
        entry.expires = expires
        entry.refresh_at = refresh_at
        return self._put(packet, entry)

    cdef Entry _lookup(self, object key, double now):
        cdef PyObject *found = PyDict_GetItem(self._entries, key)
        cdef Entry entry
        cdef long elapsed
        if found == NULL:
            return None
        entry = <Entry> found
        if entry.cached:
            if now >= entry.expires or now >= entry.refresh_at or now < entry.stored:
                del self._entries[key]
                return None
            elapsed = <long> (now - entry.stored)
            if elapsed != entry.elapsed:
                entry.tail = _aged(entry.base, entry.offsets, entry.ttls, elapsed)
                entry.elapsed = elapsed
        self.hits += 1
        return entry

    def lookup(self, bytes key, double now):
        return self._lookup(key, now)

    def answer(self, bytes packet, double now):
        if PyBytes_GET_SIZE(packet) < 12:
            return None
        cdef Entry entry = self._lookup(packet[2:], now)
        return None if entry is None else packet[:2] + entry.tail


# ---------------------------------------------------------------------------- blocked names never seen before


cdef enum:
    NAME_MAX = 255
    SHAPE_FLAGS = 0x7800 | 0x0100 | 0x0010  # opcode, RD, CD: what the blocked answer copies (codec.reply_flags)
    T_SOA = 6
    T_OPT = 41
    T_DS = 43


cdef inline int _plain(uint8_t c):
    """The lower-case form of a byte allowed in a plain label (letters, digits, '-', '_'), or -1."""
    if c >= 97 and c <= 122:
        return c
    if c >= 65 and c <= 90:
        return c + 32
    if (c >= 48 and c <= 57) or c == 45 or c == 95:
        return c
    return -1


cdef class Blocker:
    cdef public Table table
    cdef dict names
    cdef frozenset allowed
    cdef object allow_kind
    cdef frozenset canaries
    cdef bint regexes
    cdef dict shapes
    cdef public object template
    cdef public object describe
    cdef public Py_ssize_t answered, passed

    def __init__(self, Table table, dict names, allowed, allow_kind, canaries, bint regexes, template, describe):
        self.table = table
        self.names = names
        self.allowed = frozenset(allowed)
        self.allow_kind = allow_kind
        self.canaries = frozenset(canaries)
        self.regexes = regexes
        self.shapes = {}
        self.template = template
        self.describe = describe
        self.answered = 0
        self.passed = 0

    def answer(self, bytes packet):
        cdef Entry entry = self._answer(PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet))
        return None if entry is None else packet[:2] + entry.tail

    cdef Entry _answer(self, const char *wire, Py_ssize_t n):
        cdef const uint8_t *w = <const uint8_t *> wire
        cdef char name[NAME_MAX + 1]
        cdef Py_ssize_t pos = 12, length, i, nlen = 0, qend, k
        cdef int c, flags, qtype, qclass, do = -1
        cdef int starts[128]
        cdef int nlabels = 0
        cdef object key, hit, found, entry_t, shape, tpl, qname
        cdef PyObject *have
        cdef bytes reply, head, tail
        cdef char *out
        if n < 17 or n > MAX_PACKET:
            return None
        flags = (w[2] << 8) | w[3]
        if flags & (0x8000 | 0x7800 | 0x0200):  # a response, an opcode other than QUERY, TC: the slow way
            return None
        if w[4] != 0 or w[5] != 1 or w[6] or w[7] or w[8] or w[9] or w[10] or w[11] > 1:
            return None
        while True:
            if pos >= n:
                return None
            length = w[pos]
            if length == 0:
                pos += 1
                break
            if length > 63 or pos + 1 + length > n or nlabels >= 127:
                return None
            if nlen:
                name[nlen] = 46  # '.'
                nlen += 1
            starts[nlabels] = nlen
            nlabels += 1
            for i in range(pos + 1, pos + 1 + length):
                c = _plain(w[i])
                if c < 0:
                    return None  # escapes, dots, anything but a plain name: the codec's job
                name[nlen] = c
                nlen += 1
            pos += 1 + length
            if pos - 12 > NAME_MAX:
                return None
        if nlabels == 0 or pos + 4 > n:
            return None
        qtype = (w[pos] << 8) | w[pos + 1]
        qclass = (w[pos + 2] << 8) | w[pos + 3]
        qend = pos + 4
        if qclass != 1 or qtype == 0 or qtype == T_SOA or qtype == T_OPT or qtype == T_DS or qtype >= 249:
            return None  # meta types, transfers, ANY; the SOA and DS of a rule's apex have their own answers
        if w[11] == 1:  # one additional record: a plain OPT (root, version 0, no options), nothing after it
            if qend + 11 != n or w[qend] != 0 or ((w[qend + 1] << 8) | w[qend + 2]) != T_OPT:
                return None
            if w[qend + 6] != 0 or w[qend + 9] or w[qend + 10]:
                return None
            do = 1 if w[qend + 7] & 0x80 else 0
        elif qend != n:
            return None
        qname = PyUnicode_DecodeASCII(name, nlen, NULL)
        if qname in self.canaries:
            return None
        found = None
        for k in range(nlabels):
            key = qname if k == 0 else PyUnicode_DecodeASCII(name + starts[k], nlen - starts[k], NULL)
            have = PyDict_GetItem(self.names, key)
            if have == NULL:
                continue
            for entry_t in <tuple> have:
                if (<tuple> entry_t)[1] in self.allowed:
                    if (<tuple> entry_t)[0] is self.allow_kind:
                        return None  # allowed: forwarded, the slow way
                    if found is None:
                        found = entry_t
            if found is not None:
                break
        if found is None:
            return None  # not blocked (or only a regex may say): the slow way
        shape = (key, found, qtype, flags & SHAPE_FLAGS, do)
        have = PyDict_GetItem(self.shapes, shape)
        if have == NULL:
            tpl = self.template(PyBytes_FromStringAndSize(wire, n), key, found)
            if len(self.shapes) >= 10_000:
                self.shapes.clear()
            self.shapes[shape] = tpl
        else:
            tpl = <object> have
        head = tpl[0]
        tail = tpl[1]
        reply = PyBytes_FromStringAndSize(NULL, 12 + (qend - 12) + PyBytes_GET_SIZE(tail))
        out = PyBytes_AS_STRING(reply)
        out[0] = wire[0]
        out[1] = wire[1]
        memcpy(out + 2, PyBytes_AS_STRING(head), 10)
        memcpy(out + 12, wire + 12, qend - 12)
        memcpy(out + qend, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail))
        packet = PyBytes_FromStringAndSize(wire, n)
        kind, tag = self.describe(packet, qname, qtype, key, found, tpl[2], tpl[3])
        entry = Entry(reply[2:], kind, tag)
        self.table._put(packet, entry)
        self.answered += 1
        return entry


# ---------------------------------------------------------------------------- clients and rate limits


cdef class Bucket:
    cdef public double tokens
    cdef public double last

    def __init__(self, double tokens, double last):
        self.tokens = tokens
        self.last = last


cdef inline bint _take(Bucket bucket, double rate, double burst, double now):
    cdef double tokens
    if bucket.last < 0:
        bucket.last = now
    tokens = bucket.tokens + (now - bucket.last) * rate
    if tokens > burst:
        tokens = burst
    bucket.last = now
    if tokens >= 1.0:
        bucket.tokens = tokens - 1.0
        return True
    bucket.tokens = tokens
    return False


cdef class Client:
    cdef public str text
    cdef public Table table
    cdef public bint exempt
    cdef public Bucket own
    cdef public Bucket net

    def __init__(self, str text, Table table, bint exempt):
        self.text = text
        self.table = table
        self.exempt = exempt
        self.own = None
        self.net = None


cdef object _packed(str text):
    """An address as UdpFast keys it (4 or 16 bytes); the text itself when it is not an address."""
    try:
        return _socket.inet_pton(_socket.AF_INET6 if ":" in text else _socket.AF_INET, text)
    except (OSError, ValueError):
        return text


cdef class Clients:
    cdef public object classify
    cdef public double rate, burst, net_rate, net_burst
    cdef dict _known
    cdef dict _nets

    def __init__(self, classify, double rate=0.0, double burst=1.0, double net_rate=0.0, double net_burst=1.0):
        self.classify = classify
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.net_rate = net_rate
        self.net_burst = max(net_burst, 1.0)
        self._known = {}
        self._nets = {}

    def __len__(self):
        return len(self._known)

    def clear(self):
        self._known.clear()
        self._nets.clear()

    cpdef Client get(self, object key, str text):
        cdef PyObject *found = PyDict_GetItem(self._known, key)
        cdef Client client
        cdef Bucket bucket
        if found != NULL:
            return <Client> found
        table, exempt, net = self.classify(text)
        client = Client(text, table, exempt)
        if len(self._known) >= MAX_CLIENTS:
            self._known.clear()
            self._nets.clear()
        if not exempt:
            if self.rate > 0:
                client.own = Bucket(self.burst, -1.0)
            if self.net_rate > 0:
                bucket = self._nets.get(net)
                if bucket is None:
                    bucket = Bucket(self.net_burst, -1.0)
                    self._nets[net] = bucket
                client.net = bucket
        self._known[key] = client
        return client

    cpdef bint admit(self, Client client, double now):
        if client.own is not None and not _take(client.own, self.rate, self.burst, now):
            return False
        if client.net is not None and not _take(client.net, self.net_rate, self.net_burst, now):
            return False
        return True

    def lookup(self, str text):
        """The client for an address given as text (TCP, the slow path): the same one UdpFast finds by the
        packed address, so that both share its buckets."""
        return self.get(_packed(text), text)


# ---------------------------------------------------------------------------- the audit tally


cdef class _Cell:
    cdef long count
    cdef double first, last


cdef class Tally:
    cdef public double window
    cdef dict _cells
    cdef list _rows
    cdef public long added

    def __init__(self, double window=1.0):
        self.window = window
        self._cells = {}
        self._rows = []
        self.added = 0

    def __len__(self):
        return len(self._cells) + len(self._rows)

    cpdef add(self, str client, object tag, str transport, double now):
        cdef object key
        cdef PyObject *found
        cdef _Cell cell
        self.added += 1
        if self.window <= 0:
            self._rows.append((tag, client, transport, 1, now, now))
            return
        key = (client, tag, transport)
        found = PyDict_GetItem(self._cells, key)
        if found == NULL:
            cell = _Cell.__new__(_Cell)
            cell.count = 1
            cell.first = now
            cell.last = now
            self._cells[key] = cell
        else:
            cell = <_Cell> found
            cell.count += 1
            cell.last = now

    def take(self):
        cdef list rows = self._rows
        cdef _Cell cell
        self._rows = []
        if self._cells:
            cells = self._cells
            self._cells = {}
            for (client, tag, transport), cell in cells.items():
                rows.append((tag, client, transport, cell.count, cell.first, cell.last))
        return rows


# ---------------------------------------------------------------------------- the UDP socket


cdef enum:
    BATCH = 32
    BUFSIZE = 65536


cdef class UdpFast:
    cdef public object sock
    cdef public Clients clients
    cdef public Tally tally
    cdef public long received, answered, send_failed
    cdef public dict counts
    cdef public dict actions
    cdef int fd
    cdef char *bufs
    cdef mmsghdr rmsgs[BATCH]
    cdef iovec riov[BATCH]
    cdef sockaddr_storage raddr[BATCH]
    cdef mmsghdr smsgs[BATCH]
    cdef iovec siov[2 * BATCH]

    def __cinit__(self):
        self.bufs = NULL

    def __init__(self, sock, Clients clients, Tally tally, int batch=32):
        self.sock = sock
        self.fd = sock.fileno()
        self.clients = clients
        self.tally = tally
        self.received = 0
        self.answered = 0
        self.send_failed = 0
        self.counts = {}
        self.actions = {}
        self.bufs = <char *> malloc(BATCH * BUFSIZE)
        if self.bufs == NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.bufs != NULL:
            free(self.bufs)
            self.bufs = NULL

    cdef object _key(self, sockaddr_storage *sa):
        if sa.ss_family == AF_INET:
            return PyBytes_FromStringAndSize(<char *> &(<sockaddr_in *> sa).sin_addr, 4)
        if sa.ss_family == AF_INET6:
            return PyBytes_FromStringAndSize(<char *> &(<sockaddr_in6 *> sa).sin6_addr, 16)
        return None

    cdef tuple _address(self, sockaddr_storage *sa):
        cdef char text[64]
        cdef sockaddr_in *v4
        cdef sockaddr_in6 *v6
        if sa.ss_family == AF_INET:
            v4 = <sockaddr_in *> sa
            inet_ntop(AF_INET, &v4.sin_addr, text, 64)
            return ((<bytes> text).decode("ascii"), ntohs(v4.sin_port))
        v6 = <sockaddr_in6 *> sa
        inet_ntop(AF_INET6, &v6.sin6_addr, text, 64)
        return ((<bytes> text).decode("ascii"), ntohs(v6.sin6_port), ntohl(v6.sin6_flowinfo), v6.sin6_scope_id)

    def drain(self, double mono, double wall, int budget=256):
        cdef list slow = []
        cdef list keep = []
        cdef int got, i, nsend, sent, done, total = 0
        cdef char *buf
        cdef Py_ssize_t n
        cdef object key, tag, kind
        cdef Client client
        cdef Table table
        cdef Entry entry
        cdef PyObject *have
        cdef Clients clients = self.clients
        cdef Tally tally = self.tally
        cdef dict counts = self.counts
        cdef dict actions = self.actions
        cdef object action
        cdef bytes data
        while total < budget:
            for i in range(BATCH):
                self.riov[i].iov_base = self.bufs + i * BUFSIZE
                self.riov[i].iov_len = BUFSIZE
                memset(&self.rmsgs[i].msg_hdr, 0, sizeof(msghdr))
                self.rmsgs[i].msg_hdr.msg_name = &self.raddr[i]
                self.rmsgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                self.rmsgs[i].msg_hdr.msg_iov = &self.riov[i]
                self.rmsgs[i].msg_hdr.msg_iovlen = 1
            got = recvmmsg(self.fd, self.rmsgs, BATCH if budget - total >= BATCH else budget - total,
                           MSG_DONTWAIT, NULL)
            if got <= 0:
                if got < 0 and errno == EINTR:
                    continue
                break  # EAGAIN: empty; another error (an ICMP one queued on the socket): read again next time
            total += got
            self.received += got
            nsend = 0
            for i in range(got):
                buf = self.bufs + i * BUFSIZE
                n = self.rmsgs[i].msg_len
                if self.rmsgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                    continue  # larger than any UDP datagram can be: never happens, never answered
                key = self._key(&self.raddr[i])
                if key is None:
                    continue
                have = PyDict_GetItem(clients._known, key)
                if have != NULL:
                    client = <Client> have
                else:
                    client = clients.get(key, self._address(&self.raddr[i])[0])
                table = client.table
                if table is None:
                    slow.append((PyBytes_FromStringAndSize(buf, n), self._address(&self.raddr[i]), None))
                    continue
                if (client.own is not None or client.net is not None) and not clients.admit(client, mono):
                    slow.append((PyBytes_FromStringAndSize(buf, n), self._address(&self.raddr[i]), False))
                    continue
                entry = None
                if n >= 12 and n <= MAX_PACKET:
                    entry = table._lookup(PyBytes_FromStringAndSize(buf + 2, n - 2), mono)
                    if entry is None and table.blocker is not None:
                        entry = (<Blocker> table.blocker)._answer(buf, n)
                if entry is None:
                    slow.append((PyBytes_FromStringAndSize(buf, n), self._address(&self.raddr[i]), True))
                    continue
                self.answered += 1
                kind = entry.kind
                if kind is not None:
                    have = PyDict_GetItem(counts, kind)
                    counts[kind] = (<object> have) + 1 if have != NULL else 1
                    action = kind[0]
                    have = PyDict_GetItem(actions, action)
                    actions[action] = (<object> have) + 1 if have != NULL else 1
                tag = entry.tag
                if tag is not None:
                    tally.add(client.text, tag, "udp", wall)
                keep.append(entry.tail)  # alive until sent, whatever the table does meanwhile
                self.siov[2 * nsend].iov_base = buf
                self.siov[2 * nsend].iov_len = 2
                self.siov[2 * nsend + 1].iov_base = PyBytes_AS_STRING(entry.tail)
                self.siov[2 * nsend + 1].iov_len = PyBytes_GET_SIZE(entry.tail)
                memset(&self.smsgs[nsend].msg_hdr, 0, sizeof(msghdr))
                self.smsgs[nsend].msg_hdr.msg_name = &self.raddr[i]
                self.smsgs[nsend].msg_hdr.msg_namelen = self.rmsgs[i].msg_hdr.msg_namelen
                self.smsgs[nsend].msg_hdr.msg_iov = &self.siov[2 * nsend]
                self.smsgs[nsend].msg_hdr.msg_iovlen = 2
                nsend += 1
            done = 0
            while done < nsend:
                sent = sendmmsg(self.fd, &self.smsgs[done], nsend - done, MSG_DONTWAIT)
                if sent < 0:
                    if errno == EINTR:
                        continue
                    self.send_failed += 1  # this one is lost (EAGAIN: the socket buffer is full); try the rest
                    done += 1
                    continue
                done += sent
            keep.clear()
            if got < BATCH:
                break  # the socket is empty
        return slow
