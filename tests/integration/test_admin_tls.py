"""[tlsops] The TCP admin over TLS ([global] admin_tls, issue 12): `fastlb ctl` with the token over
TLS, or with a client certificate instead of it; a plain client, a client without a
certificate or with one of a foreign CA refused; bad admin_tls configurations refused naming the
key; a TLS admin off loopback needs no admin_allow_remote. Certificates made by trustme."""
import subprocess

import pytest

from helpers import PY, closed_port, service, start_backend, start_fastlb
from test_admin_hardening import check, free_port, write_token

trustme = pytest.importorskip("trustme")


@pytest.fixture
def pki(tmp_path):
    """The admin's CA and certificate (for 127.0.0.1 and admin.test), the clients' CA, a client
    certificate of it and one of a foreign CA: paths."""
    server_ca, clients, foreign = trustme.CA(), trustme.CA(), trustme.CA()
    out = {}
    server_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    leaf = server_ca.issue_cert("127.0.0.1", "admin.test")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "admin.pem"))
    out.update(ca=str(tmp_path / "ca.pem"), clients=str(tmp_path / "clients.pem"),
               admin=str(tmp_path / "admin.pem"))
    for name, issuer in (("ops", clients), ("stranger", foreign)):
        c = issuer.issue_cert(f"{name}.internal", common_name=name)
        c.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.crt"))
        c.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        out[name] = (str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key"))
    return out


def ctl(aport, *args, env=None):
    return subprocess.run([PY, "-m", "fastlb", "ctl", "--tcp", f"127.0.0.1:{aport}", *args],
                          capture_output=True, text=True, timeout=30, env=env)


def lb_with(procs, tmp_path, admin_tls, token=True, extra=""):
    _, be = start_backend(procs, "echo")
    aport = free_port()
    text = (f'[global]\nadmin = "tcp:127.0.0.1:{aport}"\n'
            + (f'admin_token_file = "{write_token(tmp_path)}"\n' if token else "")
            + f"admin_tls = {admin_tls}\n{extra}" + service("web", [(be, 1)]))
    lb, _ = start_fastlb(procs, text)
    return lb, aport, be


def test_ctl_over_tls_with_the_token_and_a_plain_client_refused(procs, tmp_path, pki):
    lb, aport, _ = lb_with(procs, tmp_path, f'{{ cert = "{pki["admin"]}", key = "{pki["admin"]}" }}')
    token = ["--token-file", str(tmp_path / "token")]
    out = ctl(aport, *token, "--tls-ca", pki["ca"], "ping")
    assert out.returncode == 0 and out.stdout.strip() == "pong", out.stderr
    out = ctl(aport, *token, "--tls-ca", pki["ca"], "--tls-server-name", "admin.test", "stats")
    assert out.returncode == 0 and "web" in out.stdout, out.stderr
    out = ctl(aport, *token, "ping")                       # plain TCP to a TLS admin: nothing
    assert out.returncode == 2 and "pong" not in out.stdout, out.stdout
    out = ctl(aport, *token, "--tls-ca", pki["clients"], "ping")    # a CA that did not sign it
    assert out.returncode == 2 and "TLS with the admin" in out.stderr, out.stderr
    out = ctl(aport, *token, "--tls-ca", pki["ca"], "--tls-server-name", "other.test", "ping")
    assert out.returncode == 2 and "TLS with the admin" in out.stderr, out.stderr
    bad = tmp_path / "bad"
    bad.write_text("x" * 40)
    out = ctl(aport, "--token-file", str(bad), "--tls-ca", pki["ca"], "ping")
    assert out.returncode == 1 and "unauthorized" in out.stderr       # TLS, yet a wrong token
    env = {"FASTLB_TLS_CA": pki["ca"], "PATH": "/usr/bin:/bin"}
    assert ctl(aport, *token, "ping", env=env).stdout.strip() == "pong"   # the CA from the env


def test_a_client_certificate_instead_of_the_token(procs, tmp_path, pki):
    """admin_tls with client_ca (verify_client required) and no admin_token_file: a client
    certificate of client_ca is the authentication (named in the audit trail); none, or one of
    another CA, is refused in the handshake."""
    lb, aport, be = lb_with(procs, tmp_path, f'{{ cert = "{pki["admin"]}", key = "{pki["admin"]}", '
                                         f'client_ca = "{pki["clients"]}" }}', token=False)
    ca = ["--tls-ca", pki["ca"]]
    out = ctl(aport, *ca, "--tls-cert", pki["ops"][0], "--tls-key", pki["ops"][1], "weight", "web",
              f"127.0.0.1:{be}", "3")
    assert out.returncode == 0, out.stderr
    lb.wait_line(r"audit: tcp 127\.0\.0\.1:\d+ \(certificate CN=ops\): set_weight")
    out = ctl(aport, *ca, "ping")
    assert out.returncode == 2 and "--token-file" in out.stderr            # nothing to offer
    out = ctl(aport, *ca, "--tls-cert", pki["stranger"][0], "--tls-key", pki["stranger"][1], "ping")
    assert out.returncode == 2 and "pong" not in out.stdout, (out.stdout, out.stderr)
    out = ctl(aport, *ca, "--tls", "--token-file", str(write_token(tmp_path)), "ping")
    assert out.returncode == 2 and "pong" not in out.stdout      # a token but no certificate


@pytest.mark.parametrize("admin_tls, where, what", [
    ('{ cert = "{admin}" }', "global.admin_tls.key", "required key is missing"),
    ('{ cert = "{admin}", key = "{admin}", verify_client = "optional" }',
     "global.admin_tls.verify_client", "only meaningful with client_ca"),
    ('{ cert = "{admin}", key = "{admin}", client_ca = "{admin}x" }', "global.admin_tls.client_ca",
     "cannot read"),
    ('{ cert = "{ca}", key = "{ca}" }', "global.admin_tls.cert", "PEM"),
    ('{ cert = "{admin}", key = "{admin}", client_ca = "{clients}", verify_client = "maybe" }',
     "global.admin_tls.verify_client", "required"),
    ('{ cert = "{admin}", key = "{admin}", certs = 1 }', "global.admin_tls.certs", "unknown key"),
])
def test_bad_admin_tls_is_refused_naming_the_key(tmp_path, pki, admin_tls, where, what):
    for name in ("admin", "ca", "clients"):
        admin_tls = admin_tls.replace("{" + name + "}", pki[name])
    text = (f'[global]\nadmin = "tcp:127.0.0.1:{closed_port()}"\n'
            f'admin_token_file = "{write_token(tmp_path)}"\n'
            f'admin_tls = {admin_tls}\n' + service("web", [(closed_port(), 1)]))
    out = check(tmp_path, text, "check", "--no-bind")
    assert out.returncode == 2 and where in out.stderr and what in out.stderr, out.stderr


def test_admin_tls_rules_token_unix_and_the_off_loopback_opt_in(tmp_path, pki):
    """Without a token file a client certificate must be required; admin_tls is for a tcp
    admin; off loopback, a TLS admin needs no admin_allow_remote (a plain one still does)."""
    tls = f'admin_tls = {{ cert = "{pki["admin"]}", key = "{pki["admin"]}" }}\n'
    svc = service("web", [(closed_port(), 1)])
    out = check(tmp_path, f'[global]\nadmin = "tcp:127.0.0.1:{closed_port()}"\n{tls}' + svc,
                "check", "--no-bind")
    assert out.returncode == 2 and "global.admin" in out.stderr and "admin_token_file" in out.stderr
    out = check(tmp_path, f'[global]\nadmin = "unix:{tmp_path}/a.sock"\n{tls}' + svc, "check",
                "--no-bind")
    assert out.returncode == 2 and "global.admin_tls" in out.stderr and "tcp" in out.stderr
    remote = f'[global]\nadmin = "tcp:192.0.2.1:9000"\nadmin_token_file = "{write_token(tmp_path)}"\n'
    out = check(tmp_path, remote + svc, "check", "--no-bind")
    assert out.returncode == 2 and "admin_tls" in out.stderr and "not a loopback" in out.stderr
    out = check(tmp_path, remote + tls + svc, "check", "--no-bind")
    assert out.returncode == 0, out.stderr
    certs_only = (f'[global]\nadmin = "tcp:192.0.2.1:9000"\nadmin_tls = {{ cert = "{pki["admin"]}", '
                  f'key = "{pki["admin"]}", client_ca = "{pki["clients"]}" }}\n')
    out = check(tmp_path, certs_only + svc, "check", "--no-bind")
    assert out.returncode == 0, out.stderr
