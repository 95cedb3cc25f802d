"""The block page's reference codes: a page view's second and 18 random bits in ten characters a person can read
over the phone. Stdlib only: `sinkhole log --ref` reads them without loading the web server."""

from __future__ import annotations

import secrets

_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's: no I, L, O, U (read over the phone)
_RANDOM_BITS = 18


def make_ref(now: float) -> str:
    """A short code for one page view: its second (so that the row is found by time) and 18 random bits;
    ten characters as 'XXXXX-XXXXX'."""
    value = (int(now) << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)
    chars = "".join(_B32[(value >> (5 * i)) & 31] for i in range(9, -1, -1))
    return f"{chars[:5]}-{chars[5:]}"


def parse_ref(text: str) -> tuple[str, int]:
    """(the code as written on the page, the second it names) or ValueError."""
    raw = text.strip().upper().replace("-", "").replace(" ", "").translate(str.maketrans("ILO", "110"))
    if len(raw) != 10 or any(c not in _B32 for c in raw):
        raise ValueError(f"{text!r} is not a block page reference (ten letters and digits, like 0KQ2M-9XAB3)")
    value = 0
    for c in raw:
        value = value * 32 + _B32.index(c)
    return f"{raw[:5]}-{raw[5:]}", value >> _RANDOM_BITS
