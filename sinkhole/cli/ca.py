"""sinkhole ca init|import|export|show: the block page's certificate authority."""

from __future__ import annotations

from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from sinkhole.cli.common import Env, pass_env
from sinkhole.files import guard_output
from sinkhole.policy.names import normalize
from sinkhole.web import certs

_CA_DIR = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                       envvar="SINKHOLE_BLOCKPAGE_CA", default=None,
                       help="The CA directory [env SINKHOLE_BLOCKPAGE_CA, as the server's blockpage_ca; default: "
                            "ca/ beside the database].")


def _ca_dir(env: Env, directory: Path | None) -> Path:
    return directory or certs.ca_directory(env.checked_path())


@click.group("ca")
def ca_group() -> None:
    """The block page's certificate authority: PCs that trust it see the page over HTTPS for blocked names."""


def _deploy_hint(directory: Path) -> None:
    click.echo(f"key: {directory / 'ca.key'} (0600: only the server's account may read it; never copy it)")
    click.echo("deploy the certificate (sinkhole ca export -o sinkhole-ca.crt) to every managed PC as a trusted root:")
    click.echo("  Windows: Group Policy > Computer Configuration > Windows Settings > Security Settings > "
               "Public Key Policies > Trusted Root Certification Authorities > Import")
    click.echo("  Firefox: policy ImportEnterpriseRoots = true (it then trusts the Windows roots)")
    click.echo("  Chrome/Edge: policy QuicAllowed = false (HTTP/3 would not reach the page); see README.md")


@ca_group.command("init")
@click.option("--name", default="sinkhole block page CA", show_default=True, help="The CA's common name.")
@click.option("--organization", default="", help="The agency's name, in the certificate's subject.")
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True, help="Validity of the root.")
@click.option("--permit", "permitted", multiple=True, metavar="DOMAIN",
              help="Name constraint: the CA can sign only for DOMAIN and its subdomains (browsers enforce it); "
                   "repeatable [no constraint].")
@click.option("--force", is_flag=True, help="Replace an existing CA (every PC must then trust the new one).")
@_CA_DIR
@pass_env
def ca_init(env: Env, name: str, organization: str, days: int, permitted: tuple[str, ...], force: bool,
            directory: Path | None) -> None:
    """Make a new root CA for the block page (ECDSA P-256; key 0600) and say how to deploy it."""
    where = _ca_dir(env, directory)
    ca = certs.init_ca(where, name, organization, days, tuple(normalize(p) for p in permitted), force)
    click.echo(f"made CA {ca.describe()}")
    click.echo(f"certificate: {where / certs.CERT_FILE}")
    if permitted:
        click.echo(f"name constraints: it can sign only for {', '.join(ca.permitted or ())} and their subdomains")
    _deploy_hint(where)


@ca_group.command("import")
@click.option("--cert", "cert_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The intermediate CA certificate the agency's CA issued (PEM or DER; its chain may follow it).")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Its private key, unencrypted (PEM or DER).")
@click.option("--chain", "chain_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="The certificates above it, up to the agency's root (PEM).")
@click.option("--force", is_flag=True, help="Replace an existing CA.")
@_CA_DIR
@pass_env
def ca_import(env: Env, cert_file: Path, key_file: Path, chain_file: Path | None, force: bool,
              directory: Path | None) -> None:
    """Use an intermediate CA issued by the agency's own CA (already trusted by its PCs)."""
    where = _ca_dir(env, directory)
    ca = certs.import_ca(where, cert_file, key_file, chain_file, force)
    click.echo(f"imported CA {ca.describe()}" + (f" with {len(ca.chain)} chain certificates" if ca.chain else ""))
    click.echo(f"key: {where / certs.KEY_FILE} (0600); the original at {key_file} can now be removed")


@ca_group.command("export")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the certificate here [stdout].")
@click.option("--der", is_flag=True, help="DER (binary .cer/.crt, as the Group Policy import takes it) [PEM].")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@_CA_DIR
@pass_env
def ca_export(env: Env, output: Path | None, der: bool, force: bool, directory: Path | None) -> None:
    """The CA certificate (never the key), for Group Policy and the other trust stores."""
    ca = certs.load_ca(_ca_dir(env, directory))
    data = ca.cert.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
    if output is None:
        if der:
            raise click.BadParameter("DER is binary: give --output FILE", param_hint="--der")
        click.echo(data.decode(), nl=False)
        return
    guard_output(output, force, [*env.protected(None), _ca_dir(env, directory) / certs.KEY_FILE], "--output")
    output.write_bytes(data)
    click.echo(f"wrote {output}: {ca.describe()}", err=True)


@ca_group.command("show")
@_CA_DIR
@pass_env
def ca_show(env: Env, directory: Path | None) -> None:
    """The CA in use: subject, validity, fingerprint, name constraints."""
    where = _ca_dir(env, directory)
    ca = certs.load_ca(where)
    click.echo(f"{where}: {ca.describe()}")
    permitted = ca.permitted
    click.echo("name constraints: " + (", ".join(permitted) if permitted is not None
                                       else "none (it may sign any name)"))
    for c in ca.chain:
        click.echo(f"chain: {c.subject.rfc4514_string()}")
