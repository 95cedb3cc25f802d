"""The block page's certificate authority, and the leaf certificates it signs for blocked names.

A browser that asks `https://chat.deepseek.com/` and gets sinkhole's address connects to the block page
and says, in the TLS handshake (SNI), which name it wants. The page can only answer it with a certificate
for that name, chained to a CA the browser trusts: the agency's, deployed to managed PCs by group policy.

- `init_ca` makes a new root (ECDSA P-256; key 0600, never overwritten without `force`), optionally with
  X.509 name constraints (the root can then sign only for the names it lists);
- `import_ca` takes an intermediate the agency's own enterprise CA issued (certificate, its chain, key);
- `load_ca` reads either back; `Minter` signs a leaf (ECDSA P-256, a few days' validity) per name on first
  use and keeps its TLS context in a bounded cache. It signs only what it is asked to: the block page asks
  only for names the policy in force blocks.

The CA lives in a directory of its own (`blockpage_ca`, default `ca/` beside the database): `ca.pem` (the
CA certificate, then any chain above it) and `ca.key`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import secrets
import ssl
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sinkhole import files
from sinkhole.errors import ConfigError

log = logging.getLogger(__name__)

CERT_FILE = "ca.pem"
KEY_FILE = "ca.key"
LEAF_DAYS = 7  # a leaf is re-minted after half of it (and on restart: leaves live in memory only)
CLOCK_SKEW = dt.timedelta(hours=1)  # leaves are valid from an hour back: PCs whose clocks run late
CACHE_SIZE = 4096  # TLS contexts of minted leaves kept in memory


class CertError(ConfigError):
    """A CA file is missing, unreadable, or not what it has to be (bad input: exit code 2)."""


def ca_directory(db: str | os.PathLike[str], setting: str = "") -> Path:
    """The CA's directory: `setting` when given, else `ca/` beside the database."""
    return Path(setting) if setting.strip() else Path(db).parent / "ca"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as browsers and certutil show it (AB:CD:...)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


@dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...] = ()  # above `cert`, for an imported intermediate

    @property
    def permitted(self) -> tuple[str, ...] | None:
        """The DNS names of the CA's name constraints (permitted subtrees), None when unconstrained."""
        try:
            ext = self.cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None
        return tuple(n.value.lower().lstrip(".") for n in ext.permitted_subtrees or ()
                     if isinstance(n, x509.DNSName))

    def may_sign(self, name: str) -> bool:
        """Whether a leaf for `name` can chain to this CA (its name constraints, if any, allow it)."""
        permitted = self.permitted
        if permitted is None:
            return True
        return any(name == p or name.endswith("." + p) for p in permitted)

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def describe(self) -> str:
        c = self.cert
        return (f"{c.subject.rfc4514_string()}, valid {c.not_valid_before_utc:%Y-%m-%d} to "
                f"{c.not_valid_after_utc:%Y-%m-%d}, SHA-256 fingerprint {fingerprint(c)}")


# ---------------------------------------------------------------------------- files


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write `path` with `mode` whatever the umask; an existing file only with `force` (atomically then)."""
    if path.exists() and not force:
        raise CertError(f"{path} exists; not overwriting it (--force replaces it)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _prepare(directory: Path, force: bool) -> None:
    for name in (CERT_FILE, KEY_FILE):
        if (directory / name).exists() and not force:
            raise CertError(f"{directory / name} exists: there is a CA already (`sinkhole ca export` shows it; "
                            "--force replaces it, and every PC must then trust the new one)")
    files.private_dirs(directory)  # it and every parent it makes (the state directory, say) 0700, whatever the umask


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path, common_name: str, organization: str = "", days: int = 3650,
            permitted: tuple[str, ...] = (), force: bool = False) -> CA:
    """A new root CA in `directory`: key 0600, certificate 0644. `permitted`: DNS name constraints."""
    if not common_name.strip():
        raise CertError("the CA needs a name (--name)")
    if not 1 <= days <= 36500:
        raise CertError("--days must be from 1 to 36500")
    _prepare(directory, force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name.strip())]
    if organization.strip():
        subject.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization.strip()))
    name = x509.Name(subject)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(_serial()).not_valid_before(now - CLOCK_SKEW)
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if permitted:
        builder = builder.add_extension(
            x509.NameConstraints(permitted_subtrees=[x509.DNSName(p) for p in permitted], excluded_subtrees=None),
            critical=True)
    cert = builder.sign(key, hashes.SHA256())
    _write_new(directory / KEY_FILE, _key_pem(key), 0o600, force)
    _write_new(directory / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return CA(cert, key)


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"{path}: {exc.strerror or exc}") from None
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM or DER certificate ({exc})") from None
    return certs


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"{path}: {exc.strerror or exc}") from None
    try:
        key = (serialization.load_pem_private_key(data, None) if b"-----BEGIN" in data
               else serialization.load_der_private_key(data, None))
    except TypeError:
        raise CertError(f"{path}: the key is encrypted; give it unencrypted (the server signs unattended), "
                        "e.g. `openssl pkey -in KEY -out plain.key`") from None
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM or DER private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertError(f"{path}: an {type(key).__name__}; the CA key must be ECDSA or RSA")
    return key


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_ca(ca: CA, where: str) -> None:
    cert = ca.cert
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise CertError(f"{where}: the certificate is not a CA (basicConstraints CA:TRUE): it cannot sign leaves")
    with contextlib.suppress(x509.ExtensionNotFound):
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.key_cert_sign:
            raise CertError(f"{where}: the certificate's key usage does not allow signing certificates")
    if _public_der(ca.key.public_key()) != _public_der(cert.public_key()):
        raise CertError(f"{where}: the key does not belong to the certificate")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(f"{where}: the certificate is not valid now ({cert.not_valid_before_utc:%Y-%m-%d} to "
                        f"{cert.not_valid_after_utc:%Y-%m-%d})")
    for child, parent in zip((cert, *ca.chain), ca.chain, strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CertError(f"{where}: {child.subject.rfc4514_string()} is not issued by the next certificate "
                            f"of the chain, {parent.subject.rfc4514_string()}") from None


def import_ca(directory: Path, cert_file: Path, key_file: Path, chain_file: Path | None = None,
              force: bool = False) -> CA:
    """Take an intermediate CA issued by the agency's own CA: its certificate (a file may hold its chain
    after it), its key, and optionally the chain in a file of its own. Checked before anything is written."""
    certs = _read_certs(cert_file)
    if chain_file is not None:
        certs += _read_certs(chain_file)
    ca = CA(certs[0], _read_key(key_file), tuple(certs[1:]))
    _check_ca(ca, str(cert_file))
    _prepare(directory, force)
    _write_new(directory / KEY_FILE, _key_pem(ca.key), 0o600, force)
    _write_new(directory / CERT_FILE, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), 0o644,
               force)
    return ca


def load_ca(directory: Path) -> CA:
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not cert_path.exists() or not key_path.exists():
        raise CertError(f"no CA in {directory} (sinkhole ca init, or sinkhole ca import)")
    certs = _read_certs(cert_path)
    ca = CA(certs[0], _read_key(key_path), tuple(certs[1:]))
    _check_ca(ca, str(cert_path))
    return ca


def _serial() -> int:
    return secrets.randbits(159) | 1  # positive, at most 20 octets (RFC 5280), never 0


# ---------------------------------------------------------------------------- leaves


def mint(ca: CA, name: str, days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
    """A leaf certificate for `name` signed by `ca`: (certificate chain PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alt = x509.DNSName(name)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(_serial())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    chain = [cert, ca.cert, *(c for c in ca.chain if c.issuer != c.subject)]  # never the root itself
    return (b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain), _key_pem(key))


def server_context() -> ssl.SSLContext:
    """A TLS server context as the block page uses them: TLS 1.2+, HTTP/1.1 by ALPN, no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_TICKET  # no session state to keep across names and restarts
    return ctx


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """ssl takes certificates only from files: an anonymous memory file (memfd), else a private temp file."""
    data = key_pem + chain_pem
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("sinkhole-leaf", os.MFD_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                os.write(fd, data)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
                return
            except (OSError, ssl.SSLError):
                pass  # /proc not mounted or hidden: the temp file below
            finally:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="sinkhole-leaf-") as tmp:  # made 0700
        path = Path(tmp) / "leaf.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        ctx.load_cert_chain(str(path))


class Minter:
    """TLS contexts with a leaf for one name each, minted on first use and kept (LRU, `cache_size`)."""

    def __init__(self, ca: CA, days: int = LEAF_DAYS, cache_size: int = CACHE_SIZE) -> None:
        self.ca = ca
        self.days = days
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[ssl.SSLContext, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.minted = 0
        self.refused = 0  # names the CA's name constraints do not cover

    def context(self, name: str) -> ssl.SSLContext | None:
        """The TLS context for `name` (minted now if needed); None when the CA may not sign for it."""
        now = dt.datetime.now(dt.UTC).timestamp()
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[1] > now:
                self._cache.move_to_end(name)
                return hit[0]
        if not self.ca.may_sign(name):
            self.refused += 1
            return None
        chain_pem, key_pem = mint(self.ca, name, self.days)
        ctx = server_context()
        _load_chain(ctx, chain_pem, key_pem)
        with self._lock:
            self._cache[name] = (ctx, now + self.days * 86400 / 2)
            self._cache.move_to_end(name)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.minted += 1
        return ctx

