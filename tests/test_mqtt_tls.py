"""Broker credentials and TLS against a real mosquitto: a password file, anonymous clients refused, and TLS
listeners with certificates this module makes with the openssl CLI (a CA, a server certificate it signed, one
signed by another CA, a client certificate).

Right credentials deliver; wrong ones are one clear line and the records end up spooled (exit 75); a server
certificate from another CA, or for another host name, is refused unless --mqtt-insecure says otherwise. No
password appears in any line.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mqtt_helpers import (  # noqa: F401
    MOSQUITTO,
    TOPIC,
    Broker,
    Subscriber,
    accounted,
    backend,
    free_port,
    parts,
    quiet,
    run_with,
    some_parts,
)

from protoad_edge.cli.run import main
from protoad_edge.errors import ProtoADError
from protoad_edge.runtime.backends.ort import OrtBackend
from protoad_edge.runtime.outputs.mqtt import EXIT_UNDELIVERED, PASSWORD_ENV, BrokerAccess, MqttSink

OPENSSL = shutil.which("openssl")
PASSWORD = "correct horse 7"  # the publisher's; a space in it, as a real one may have
READER, READER_PASSWORD = "reader", "reader-pw"  # the test's subscriber

pytestmark = pytest.mark.skipif(
    MOSQUITTO is None or OPENSSL is None, reason="needs mosquitto and openssl (apt-get install mosquitto openssl)"
)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-subj",
        f"/CN=protoad test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )


def make_cert(folder: Path, name: str, ca: str, usage: str, alt_name: str = "IP:127.0.0.1") -> None:
    (folder / f"{name}.ext").write_text(
        f"subjectAltName={alt_name}\nbasicConstraints=CA:FALSE\n"
        f"keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
        f"authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.pem",
        "-extfile",
        f"{name}.ext",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca (the plant's), server (signed by ca, for 127.0.0.1), rogue (another CA's), client (ca's, clientAuth)."""
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "other-ca")
    make_cert(folder, "server", "ca", "serverAuth")
    make_cert(folder, "rogue", "other-ca", "serverAuth")
    make_cert(folder, "client", "ca", "clientAuth", alt_name="DNS:line3-station")
    return folder


class SecureBroker(Broker):
    """Anonymous clients refused, users from a password file; the plain listener (for the subscriber) plus TLS
    listeners: ``tls`` (the plant CA's certificate), ``rogue`` (another CA's), ``mutual`` (requires a client
    certificate from the plant CA)."""

    def __init__(self, folder: Path, pki: Path) -> None:
        passwords = folder / "passwords"
        for user, password in [("line3", PASSWORD), (READER, READER_PASSWORD)]:
            create = ["-c"] if not passwords.exists() else []
            subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(passwords), user, password],
                check=True,
                capture_output=True,
                timeout=30,
            )
        self.tls, self.rogue, self.mutual = free_port(), free_port(), free_port()
        server = [f"cafile {pki / 'ca.pem'}", f"certfile {pki / 'server.pem'}", f"keyfile {pki / 'server.key'}"]
        super().__init__(
            folder,
            extra=(
                "allow_anonymous false",
                f"password_file {passwords}",
                f"listener {self.tls} 127.0.0.1",
                *server,
                f"listener {self.rogue} 127.0.0.1",
                f"certfile {pki / 'rogue.pem'}",
                f"keyfile {pki / 'rogue.key'}",
                f"listener {self.mutual} 127.0.0.1",
                *server,
                "require_certificate true",
            ),
        )

    def tls_url(self, port: int, host: str = "127.0.0.1") -> str:
        return f"mqtts://{host}:{port}/{TOPIC}"


@pytest.fixture
def secure(tmp_path: Path, pki: Path):
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = SecureBroker(folder, pki)
    broker.start()
    yield broker
    broker.stop()


def reader(broker: Broker) -> Subscriber:
    return Subscriber(broker, user=READER, password=READER_PASSWORD)


def cli(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, args, env={PASSWORD_ENV: None, **(env or {})})


# ---------------------------------------------------------------- options, no broker


def test_the_password_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    environ = {PASSWORD_ENV: "from-env"}
    assert BrokerAccess.from_options("line3", secret, environ=environ).password == PASSWORD  # the file first
    assert BrokerAccess.from_options("line3", environ=environ).password == "from-env"
    assert BrokerAccess.from_options("line3", environ={}).password is None  # a user without a password
    assert BrokerAccess.from_options(None, environ=environ) == BrokerAccess()  # no user: anonymous, env unused
    assert PASSWORD not in repr(BrokerAccess.from_options("line3", secret))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"password_file": "PW"}, "--mqtt-password-file needs --mqtt-user"),
        ({"user": "u", "password_file": "missing"}, "cannot read --mqtt-password-file {tmp}/missing: No such file"),
        ({"user": "u", "password_file": "empty"}, "--mqtt-password-file {tmp}/empty: its first line is empty"),
        ({"key": "k.pem"}, "--mqtt-key needs --mqtt-cert"),
    ],
)
def test_bad_credential_options_are_one_line(tmp_path: Path, options: dict, message: str) -> None:
    (tmp_path / "empty").write_text("\n")
    paths = {k: tmp_path / v if k in ("password_file", "key") else v for k, v in options.items()}
    with pytest.raises(ProtoADError) as error:
        BrokerAccess.from_options(**paths, environ={})
    assert str(error.value).startswith(message.format(tmp=tmp_path))


def test_tls_settings_need_an_mqtts_url_and_usable_files(pki: Path, tmp_path: Path) -> None:
    for access in (BrokerAccess(ca=pki / "ca.pem"), BrokerAccess(cert=pki / "client.pem"), BrokerAccess(insecure=True)):
        with pytest.raises(ProtoADError, match="are TLS settings: use an mqtts:// URL"):
            MqttSink("mqtt://127.0.0.1/line3", access=access)
    (tmp_path / "not.pem").write_text("not a certificate\n")
    for access, flag, path in [
        (BrokerAccess(ca=tmp_path / "missing.pem"), "--mqtt-ca", tmp_path / "missing.pem"),
        (BrokerAccess(ca=tmp_path / "not.pem"), "--mqtt-ca", tmp_path / "not.pem"),
        (BrokerAccess(cert=pki / "client.pem"), "--mqtt-cert", pki / "client.pem"),
        (BrokerAccess(cert=pki / "client.pem", key=pki / "server.key"), "--mqtt-cert/--mqtt-key", pki / "client.pem"),
    ]:
        with pytest.raises(ProtoADError, match=f"^cannot use {flag} {path}: "):
            MqttSink("mqtts://127.0.0.1/line3", access=access)


def test_warnings_for_an_unverified_broker_and_a_password_in_clear(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    cases = [
        (f"mqtt://127.0.0.1:{port}/t", BrokerAccess("line3", PASSWORD), "travels unencrypted: use mqtts://"),
        (f"mqtts://127.0.0.1:{port}/t", BrokerAccess("line3", PASSWORD, insecure=True), "is not verified"),
        (f"mqtts://127.0.0.1:{port}/t", BrokerAccess("line3", PASSWORD, ca=pki / "ca.pem"), None),
    ]
    for url, access, warning in cases:
        logs: list[str] = []
        MqttSink(url, access=access, log=logs.append, drain_timeout=0).close(keep=True)
        warnings = [line for line in logs if "WARNING" in line]
        assert len(warnings) == (warning is not None) and all(warning in line for line in warnings)
        assert not any(PASSWORD in line for line in logs)


# ---------------------------------------------------------------- a real broker


def test_right_credentials_and_the_plant_ca_deliver(
    secure: SecureBroker, tiny_model: Path, pki: Path, parts: Path, tmp_path: Path
) -> None:
    """protoad-run over mqtts:// with the password in the environment: every record arrives, in order."""
    subscriber = reader(secure)
    try:
        result = cli(
            [
                str(some_parts(parts, 6, tmp_path)),
                "--model",
                str(tiny_model),
                "--mqtt",
                secure.tls_url(secure.tls),
                "--mqtt-user",
                "line3",
                "--mqtt-ca",
                str(pki / "ca.pem"),
                "--mqtt-spool",
                str(tmp_path),
            ],
            env={PASSWORD_ENV: PASSWORD},
        )
        assert result.exit_code == 0, result.output
        assert [r["frame"] for r in subscriber.wait_for(set(range(6)))] == list(range(6))
    finally:
        subscriber.close()
    assert f"{secure.tls_url(secure.tls)}: 6 delivered, 0 queued, 0 spooled, 0 dropped" in result.stdout
    assert PASSWORD not in result.output and "WARNING" not in result.output


def test_a_client_certificate_opens_a_listener_that_requires_one(
    secure: SecureBroker, backend: OrtBackend, pki: Path, parts: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD)
    subscriber = reader(secure)
    try:
        access = BrokerAccess.from_options(
            "line3", secret, ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key", environ={}
        )
        sink = MqttSink(secure.tls_url(secure.mutual), access=access, log=quiet, drain_timeout=10)
        run_with(sink, some_parts(parts, 4, tmp_path), backend, tmp_path)
        subscriber.wait_for(set(range(4)))
    finally:
        subscriber.close()
    assert sink.delivered == 4
    without = MqttSink(
        secure.tls_url(secure.mutual),
        access=BrokerAccess("line3", PASSWORD, ca=pki / "ca.pem"),
        log=quiet,
        drain_timeout=1,
    )
    run_with(without, some_parts(parts, 2, tmp_path), backend, tmp_path)
    assert without.delivered == 0 and without.queued == 2


@pytest.mark.slow
def test_wrong_credentials_are_one_clear_line_and_the_records_are_spooled(
    secure: SecureBroker, tiny_model: Path, pki: Path, parts: Path, tmp_path: Path
) -> None:
    wrong = tmp_path / "password"
    wrong.write_text("not-the-password\n")
    source = str(some_parts(parts, 3, tmp_path))
    common = [
        "--model",
        str(tiny_model),
        "--mqtt",
        secure.tls_url(secure.tls),
        "--mqtt-ca",
        str(pki / "ca.pem"),
        "--mqtt-spool",
        str(tmp_path / "spool"),
        "--mqtt-drain-timeout",
        "1",
    ]
    result = cli(
        [source, *common, "--mqtt-user", "line3", "--mqtt-password-file", str(wrong)], env={PASSWORD_ENV: PASSWORD}
    )
    assert result.exit_code == EXIT_UNDELIVERED, result.output
    mqtt_lines = [line for line in result.stderr.splitlines() if line.startswith("mqtt:")]
    assert mqtt_lines[0] == (
        f"mqtt: broker 127.0.0.1:{secure.tls} refused the connection (Not authorized): check "
        f"--mqtt-user and the password ({PASSWORD_ENV} or --mqtt-password-file); queuing up to "
        f"10000 messages and reconnecting"
    )
    assert len(mqtt_lines) == 2 and mqtt_lines[1].startswith(
        f"mqtt: 3 records not acknowledged by 127.0.0.1:{secure.tls}: 3 spooled in {tmp_path / 'spool'}"
    )
    assert "not-the-password" not in result.output and PASSWORD not in result.output
    anonymous = cli([source, *common])  # no user at all: the broker refuses anonymous clients
    assert anonymous.exit_code == EXIT_UNDELIVERED
    assert "refused the connection (Not authorized): check --mqtt-user" in anonymous.stderr
    assert "6 spooled" in anonymous.stdout  # the first run's 3 and its own


def test_a_server_certificate_from_another_ca_is_refused(
    secure: SecureBroker, backend: OrtBackend, pki: Path, parts: Path, tmp_path: Path
) -> None:
    logs: list[str] = []
    access = BrokerAccess("line3", PASSWORD, ca=pki / "ca.pem")
    sink = MqttSink(secure.tls_url(secure.rogue), access=access, log=logs.append, drain_timeout=1, spool=tmp_path)
    run_with(sink, some_parts(parts, 3, tmp_path), backend, tmp_path)
    assert (sink.delivered, sink.spooled) == (0, 3)
    assert logs == [
        (
            f"mqtt: cannot connect to 127.0.0.1:{secure.rogue} (TLS certificate verify failed: unable to get "
            f"local issuer certificate); queuing up to 10000 messages and reconnecting"
        )
    ]


def test_a_certificate_for_another_host_name_is_refused(
    secure: SecureBroker, backend: OrtBackend, pki: Path, parts: Path, tmp_path: Path
) -> None:
    """The plant CA's certificate names 127.0.0.1; reached as 'localhost' the broker is not who it claims."""
    logs: list[str] = []
    access = BrokerAccess("line3", PASSWORD, ca=pki / "ca.pem")
    sink = MqttSink(secure.tls_url(secure.tls, host="localhost"), access=access, log=logs.append, drain_timeout=1)
    run_with(sink, some_parts(parts, 2, tmp_path), backend, tmp_path)
    assert sink.delivered == 0 and len(logs) == 1
    assert "TLS certificate verify failed: Hostname mismatch, certificate is not valid for 'localhost'" in logs[0]


def test_insecure_skips_the_check_and_says_so(
    secure: SecureBroker, backend: OrtBackend, parts: Path, tmp_path: Path
) -> None:
    logs: list[str] = []
    subscriber = reader(secure)
    try:
        sink = MqttSink(
            secure.tls_url(secure.rogue),
            access=BrokerAccess("line3", PASSWORD, insecure=True),
            log=logs.append,
            drain_timeout=10,
        )
        run_with(sink, some_parts(parts, 3, tmp_path), backend, tmp_path)
        subscriber.wait_for(set(range(3)))
    finally:
        subscriber.close()
    assert sink.delivered == 3 and accounted(sink)
    assert logs == [
        (
            f"mqtt: WARNING: --mqtt-insecure: the certificate of 127.0.0.1:{secure.rogue} is not verified; "
            f"anyone between here and the broker can read and change the verdicts"
        )
    ]
