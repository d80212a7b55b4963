"""Our package is named `ssl`: it must be found from the repo root while the stdlib API keeps working."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_package_and_stdlib_api_coexist():
    result = run_python("""
        import ssl, ssl.ema, ssl.models, urllib.request, http.client
        assert ssl.__file__.endswith("ssl/__init__.py"), ssl.__file__
        ctx = ssl.create_default_context()
        assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED
        assert ssl.SSLContext.__module__ == "ssl" and callable(ssl._create_default_https_context)
        assert http.client.HTTPSConnection("example.org", context=ctx)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_no_submodule_shadows_a_stdlib_ssl_name(tmp_path):
    # Outside the repo, `import ssl` is the real stdlib module: list its globals there.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_python("import ssl, json; print(json.dumps(sorted(vars(ssl))))", cwd=tmp_path, env=env)
    stdlib_names = set(json.loads(result.stdout))
    ours = {p.stem for p in (ROOT / "ssl").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert not (ours - {"__init__"}) & stdlib_names


def test_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "ssl.pretrain", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pretrain" in result.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a self-signed certificate")
def test_https_through_urllib_and_requests(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    result = run_python(f"""
        import http.server, ssl, threading, urllib.request, requests

        class Hello(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"hello over tls")
            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Hello)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain({str(cert)!r}, {str(key)!r})
        server.socket = server_ctx.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"https://127.0.0.1:{{server.server_address[1]}}/"
        client_ctx = ssl.create_default_context(cafile={str(cert)!r})
        assert urllib.request.urlopen(url, context=client_ctx, timeout=10).read() == b"hello over tls"
        assert requests.get(url, verify={str(cert)!r}, timeout=10).content == b"hello over tls"
        try:
            urllib.request.urlopen(url, timeout=10)  # default trust store: the self-signed cert must be refused
            raise SystemExit("unverified certificate accepted")
        except urllib.error.URLError as error:
            assert isinstance(error.reason, ssl.SSLCertVerificationError), error
        server.shutdown()
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
