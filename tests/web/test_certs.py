"""The block page's CA (sinkhole ca) and the leaves it mints, checked with Python's own TLS client and openssl."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sinkhole.cli import cli
from sinkhole.web import certs


def run(db: Path, *args: str):
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)


def handshake(ca_pem: Path, ctx: ssl.SSLContext, name: str) -> x509.Certificate:
    """A real TLS handshake over loopback: a server with `ctx`, a client that verifies against `ca_pem`."""
    client_ctx = ssl.create_default_context(cafile=str(ca_pem))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
            tls.sendall(b"x")
    finally:
        t.join(5)
        listener.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_ca_init_writes_key_0600_and_never_overwrites(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    result = run(db, "ca", "init", "--name", "Ministry CA", "--organization", "Ministry")
    assert result.exit_code == 0, result.output
    key, cert = tmp_path / "ca" / "ca.key", tmp_path / "ca" / "ca.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca").stat().st_mode & 0o777 == 0o700
    ca = certs.load_ca(tmp_path / "ca")
    assert certs.fingerprint(ca.cert) in result.output  # what the deploying admin compares
    assert "ImportEnterpriseRoots" in result.output and "QuicAllowed" in result.output
    before = (key.read_bytes(), cert.read_bytes())
    again = run(db, "ca", "init")
    assert again.exit_code == 2 and "--force" in again.output
    assert (key.read_bytes(), cert.read_bytes()) == before  # nothing written
    forced = run(db, "ca", "init", "--force")
    assert forced.exit_code == 0 and key.read_bytes() != before[0]
    assert key.stat().st_mode & 0o777 == 0o600


def test_ca_export_pem_and_der_for_group_policy(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    assert run(db, "ca", "init").exit_code == 0
    pem = run(db, "ca", "export")
    assert pem.exit_code == 0 and pem.output.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE" not in pem.output
    out = tmp_path / "sinkhole-ca.cer"
    assert run(db, "ca", "export", "--der", "-o", str(out)).exit_code == 0
    der = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(out), "-noout", "-subject"],
                         capture_output=True, text=True, check=True)
    assert "sinkhole block page CA" in der.stdout
    refused = run(db, "ca", "export", "--der", "-o", str(out))
    assert refused.exit_code == 2 and "exists" in refused.output


def test_minted_leaf_verifies_for_its_name_only(tmp_path: Path) -> None:
    ca = certs.init_ca(tmp_path / "ca", "Test CA")
    minter = certs.Minter(ca)
    ctx = minter.context("chat.deepseek.com")
    assert ctx is not None
    leaf = handshake(tmp_path / "ca" / "ca.pem", ctx, "chat.deepseek.com")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["chat.deepseek.com"]
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey) and leaf.public_key().curve.name == "secp256r1"
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=certs.LEAF_DAYS, hours=1)
    assert minter.context("chat.deepseek.com") is ctx  # cached: minted once
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        handshake(tmp_path / "ca" / "ca.pem", ctx, "www.example.org")


def test_name_constraints_limit_what_the_ca_signs(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    assert run(db, "ca", "init", "--permit", "deepseek.com", "--permit", "chatgpt.com").exit_code == 0
    ca = certs.load_ca(tmp_path / "ca")
    assert ca.permitted == ("deepseek.com", "chatgpt.com")
    minter = certs.Minter(ca)
    ctx = minter.context("chat.deepseek.com")
    assert ctx is not None
    handshake(tmp_path / "ca" / "ca.pem", ctx, "chat.deepseek.com")  # Python's verifier honours the constraint
    assert minter.context("claude.ai") is None and minter.refused == 1
    assert minter.context("notdeepseek.com") is None  # a label boundary, not a string suffix


def _agency_root(tmp_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Agency Root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=99))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(key, hashes.SHA384()))
    return cert, key


def _intermediate(root: x509.Certificate, root_key,
                  ca: bool = True) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Agency block page CA")]))
            .issuer_name(root.subject).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .sign(root_key, hashes.SHA384()))
    return cert, key


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def test_ca_import_of_an_agency_intermediate_chains_leaves_to_the_agency_root(tmp_path: Path) -> None:
    root, root_key = _agency_root(tmp_path)
    inter, inter_key = _intermediate(root, root_key)
    (tmp_path / "inter.pem").write_bytes(_pem(inter))
    (tmp_path / "inter.key").write_bytes(_pem(inter_key))
    (tmp_path / "root.pem").write_bytes(_pem(root))
    db = tmp_path / "s.db"
    result = run(db, "ca", "import", "--cert", str(tmp_path / "inter.pem"), "--key", str(tmp_path / "inter.key"),
                 "--chain", str(tmp_path / "root.pem"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    ctx = certs.Minter(certs.load_ca(tmp_path / "ca")).context("chatgpt.com")
    assert ctx is not None
    leaf = handshake(tmp_path / "root.pem", ctx, "chatgpt.com")  # a PC that trusts only the agency's root
    assert leaf.issuer == inter.subject


@pytest.mark.parametrize("case", ["not a CA", "wrong key", "encrypted key", "not a certificate"])
def test_ca_import_refuses_what_cannot_sign_and_writes_nothing(tmp_path: Path, case: str) -> None:
    root, root_key = _agency_root(tmp_path)
    inter, inter_key = _intermediate(root, root_key, ca=case != "not a CA")
    cert_bytes = b"hello" if case == "not a certificate" else _pem(inter)
    key = ec.generate_private_key(ec.SECP256R1()) if case == "wrong key" else inter_key
    key_bytes = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.BestAvailableEncryption(b"pw")) if case == "encrypted key"
                 else _pem(key))
    (tmp_path / "c.pem").write_bytes(cert_bytes)
    (tmp_path / "k.pem").write_bytes(key_bytes)
    result = run(tmp_path / "s.db", "ca", "import", "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem"))
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "ca").exists()


def test_ca_init_makes_a_new_state_directory_private_whatever_the_umask(tmp_path: Path) -> None:
    """A first `sinkhole ca init` on a fresh account (no --db): the state directory it makes holds the CA key
    and later the database, so it and the directories made for it are 0700, not the umask's 0755."""
    import os
    import shutil
    import sys

    exe = shutil.which("sinkhole", path=str(Path(sys.executable).parent))
    assert exe
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SINKHOLE_DB", "XDG_STATE_HOME")}
    env["HOME"] = str(home)
    out = subprocess.run([exe, "ca", "init", "--name", "Fresh CA"], env=env, capture_output=True, text=True,
                         timeout=60, umask=0o022)
    assert out.returncode == 0, out.stderr
    state = home / ".local" / "state" / "sinkhole"
    assert (state / "ca" / "ca.key").exists()
    for made in (home / ".local", home / ".local" / "state", state, state / "ca"):
        assert made.stat().st_mode & 0o777 == 0o700, made
    assert home.stat().st_mode & 0o777 == 0o755  # a directory that was there stays as it was
