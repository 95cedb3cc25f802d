"""One error type per boundary; each is turned into an exit code or an rcode at the edge."""


class SinkholeError(Exception):
    """Root of every error sinkhole raises on purpose."""


class ConfigError(SinkholeError):
    """A setting (flag, environment variable, config file) is unusable."""


class DomainError(SinkholeError):
    """A domain name given by a person or a list is not a valid DNS name."""


class ListFormatError(SinkholeError):
    """A list file has a bad line; the whole file is rejected."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}:{line}: {reason}")
        self.source = source
        self.line = line
        self.reason = reason


class DecodeError(SinkholeError):
    """A packet that is not a DNS query we can answer normally: dropped (codec.Drop) or answered with an error
    rcode (codec.BadQuery: FORMERR, NOTIMP, NOTAUTH, BADVERS)."""


class UpstreamError(SinkholeError):
    """No upstream gave a valid answer in time (answered with SERVFAIL)."""
