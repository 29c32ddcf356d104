"""Strangers on the network: TLS, mutual TLS and bearer tokens, over real loopback gRPC.

The service runs in-process with the fake pipeline; certificates are made per test session
(tests/certs.py). Each case asserts what the caller gets: enhanced faces, or a refusal that
names its cause, and that a refused caller's faces never reach the device.
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AccessDenied, AsyncFaceEnhanceClient, EnhanceOptions, Security
from client.security import SecurityConfigError
from contract.pb import face_enhance_pb2 as pb
from contract.pb import face_enhance_pb2_grpc as pb_grpc
from server.security import SecurityError, TokenAuth, read_tokens
from tests.certs import issue, make_ca
from tests.fakes import FakePipeline, fake_enhanced, random_faces
from tests.test_server import request, running

pytestmark = pytest.mark.timeout(60)
OPTIONS = EnhanceOptions(output_size=256)
TOKENS = ["first-token-0123456789abcdef", "second-token-0123456789abcdef"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server CA with a localhost certificate, a client CA with a client certificate, and a
    stranger CA with its own client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = (make_ca(folder, name) for name in
                                         ("server-ca", "client-ca", "stranger-ca"))
    server_cert, server_key = issue(folder, server_ca, "server", server=True)
    client_cert, client_key = issue(folder, client_ca, "client", server=False)
    stranger_cert, stranger_key = issue(folder, stranger_ca, "stranger", server=False)
    tokens = folder / "tokens"
    tokens.write_text("# one per line\n" + "\n".join(TOKENS) + "\n\n")
    return dict(server_ca=str(server_ca[2]), client_ca=str(client_ca[2]), stranger_ca=str(stranger_ca[2]),
                server_cert=str(server_cert), server_key=str(server_key),
                client_cert=str(client_cert), client_key=str(client_key),
                stranger_cert=str(stranger_cert), stranger_key=str(stranger_key), tokens=str(tokens))


async def enhance(app, security: Security, timeout_ms: float = 3000):
    faces = random_faces(np.random.default_rng(0), 2)
    async with AsyncFaceEnhanceClient(f"localhost:{app.port}", options=OPTIONS, timeout_ms=timeout_ms,
                                      security=security) as client:
        return faces, await client.enhance(faces)


def assert_enhanced(faces, result):
    assert not result.fell_back, (result.fallback_reason, result.extra)
    assert (result.faces == fake_enhanced(faces, OPTIONS)[0]).all()


# --- TLS ---------------------------------------------------------------------------------------

async def test_tls_serves_a_client_that_trusts_its_ca_and_no_one_else(pki):
    pipeline = FakePipeline()
    async with running(pipeline, tls_cert=pki["server_cert"], tls_key=pki["server_key"]) as app:
        faces, result = await enhance(app, Security(ca_file=pki["server_ca"]))
        assert_enhanced(faces, result)
        _, plaintext = await enhance(app, Security(), timeout_ms=1000)
        _, wrong_ca = await enhance(app, Security(ca_file=pki["stranger_ca"]), timeout_ms=1000)
    assert plaintext.fell_back and plaintext.fallback_reason == "unavailable"
    assert wrong_ca.fell_back and wrong_ca.fallback_reason == "unavailable"
    assert pipeline.faces_total == 2  # only the trusting client's faces reached the device


async def test_mutual_tls_refuses_clients_without_a_certificate_from_its_client_ca(pki):
    pipeline = FakePipeline()
    async with running(pipeline, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                       tls_client_ca=pki["client_ca"]) as app:
        faces, result = await enhance(app, Security(ca_file=pki["server_ca"], cert_file=pki["client_cert"],
                                                    key_file=pki["client_key"]))
        assert_enhanced(faces, result)
        _, anonymous = await enhance(app, Security(ca_file=pki["server_ca"]), timeout_ms=1000)
        _, stranger = await enhance(app, Security(ca_file=pki["server_ca"], cert_file=pki["stranger_cert"],
                                                  key_file=pki["stranger_key"]), timeout_ms=1000)
    assert anonymous.fell_back and stranger.fell_back
    assert pipeline.faces_total == 2


# --- tokens ------------------------------------------------------------------------------------

async def test_a_token_is_needed_for_every_call_but_health_and_any_of_several_works(pki, caplog):
    caplog.set_level(logging.WARNING)
    pipeline = FakePipeline()
    async with running(pipeline, auth_tokens_file=pki["tokens"]) as app:
        for token in TOKENS:
            faces, result = await enhance(app, Security(token=token))
            assert_enhanced(faces, result)
        _, none = await enhance(app, Security(), timeout_ms=1000)
        _, wrong = await enhance(app, Security(token="not-one-of-them-0123456789"), timeout_ms=1000)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            stub = pb_grpc.FaceEnhancerStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.Enhance(request(1, random_faces(np.random.default_rng(1), 1)))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetInfo(pb.GetInfoRequest(), metadata=(("authorization", "Bearer nope"),))
            with pytest.raises(grpc.aio.AioRpcError) as basic:
                await stub.GetInfo(pb.GetInfoRequest(), metadata=(("authorization", f"Basic {TOKENS[0]}"),))
            ok = await stub.GetInfo(pb.GetInfoRequest(), metadata=(("authorization", f"Bearer {TOKENS[1]}"),))
        refused = app.metrics.registry.get_sample_value("faceenhance_unauthenticated_requests_total")
    assert none.fell_back and none.fallback_reason == "unauthenticated"
    assert wrong.fell_back and wrong.fallback_reason == "unauthenticated"
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    for refusal in (unary, info, basic):
        assert refusal.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in refusal.value.details()
    assert ok.max_faces_per_request == 8
    assert pipeline.faces_total == 4  # the two good clients' faces only
    assert refused >= 5
    denied_lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(denied_lines) <= 2  # logged at a bounded rate


async def test_the_client_says_its_credentials_were_refused_not_that_the_service_is_down(pki):
    async with running(FakePipeline(), auth_tokens_file=pki["tokens"]) as app:
        async with AsyncFaceEnhanceClient(f"127.0.0.1:{app.port}") as client:
            with pytest.raises(AccessDenied, match="refused this client's credentials"):
                await client.info()


async def test_tls_and_a_token_together(pki):
    pipeline = FakePipeline()
    async with running(pipeline, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                       auth_tokens_file=pki["tokens"]) as app:
        faces, result = await enhance(app, Security(ca_file=pki["server_ca"], token=TOKENS[0]))
        _, no_token = await enhance(app, Security(ca_file=pki["server_ca"]), timeout_ms=1000)
    assert_enhanced(faces, result)
    assert no_token.fallback_reason == "unauthenticated"


def test_every_token_is_compared_whichever_matches():
    """Constant time over the list: a match on the first token still compares the others."""
    compared = []
    auth = TokenAuth(TOKENS)
    import hmac

    real = hmac.compare_digest

    def counting(a, b):
        compared.append(b)
        return real(a, b)

    hmac_module = __import__("server.security", fromlist=["hmac"]).hmac
    original, hmac_module.compare_digest = hmac_module.compare_digest, counting
    try:
        assert auth.valid(f"Bearer {TOKENS[0]}") and not auth.valid("Bearer x") and not auth.valid("")
    finally:
        hmac_module.compare_digest = original
    assert len(compared) == 3 * len(TOKENS)


# --- bad configuration is refused clearly ------------------------------------------------------

def test_bad_token_files_and_tls_settings_are_refused_with_the_setting_named(tmp_path, pki):
    short = tmp_path / "short"
    short.write_text("abc\n")
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SecurityError, match="shorter than 16 characters"):
        read_tokens(str(short))
    with pytest.raises(SecurityError, match="holds no token"):
        read_tokens(str(empty))
    with pytest.raises(SecurityError, match="cannot read it"):
        read_tokens(str(tmp_path / "missing"))
    from server.settings import Settings

    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        Settings(tls_cert=pki["server_cert"])
    with pytest.raises(ValueError, match="--tls-client-ca .* needs the server's own --tls-cert"):
        Settings(tls_client_ca=pki["client_ca"])
    with pytest.raises(SecurityConfigError, match="needs its key"):
        Security(cert_file=pki["client_cert"]).validate()
    with pytest.raises(SecurityConfigError, match="not a readable file"):
        Security(ca_file=str(tmp_path / "nowhere.pem")).validate()


async def test_a_key_that_is_not_pem_stops_the_start_with_the_file_named(pki, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(SecurityError, match="--tls-key must be a PEM file"):
        async with running(FakePipeline(), tls_cert=pki["server_cert"], tls_key=str(bad)):
            pass


def test_the_client_reads_its_credentials_from_the_environment(pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"# mine\n{TOKENS[1]}\n")
    security = Security.from_env({"GFPGAN_TLS_CA": pki["server_ca"], "GFPGAN_TOKEN_FILE": str(token_file)})
    assert security.uses_tls and security.token == TOKENS[1]
    assert Security.from_env({"GFPGAN_TOKEN": TOKENS[0]}).call_metadata() == (
        ("authorization", f"Bearer {TOKENS[0]}"),)
    assert Security.from_env({}) == Security()
    assert Security(token=TOKENS[0]).plaintext_token_to("gpu-box:50051")
    assert not Security(token=TOKENS[0]).plaintext_token_to("127.0.0.1:50051")
    assert not Security(token=TOKENS[0], tls=True).plaintext_token_to("gpu-box:50051")


async def test_listening_beyond_loopback_without_credentials_is_warned_about(caplog):
    caplog.set_level(logging.WARNING)
    async with running(FakePipeline(), host="0.0.0.0"):
        await asyncio.sleep(0)
    assert any("anyone who can reach port" in r.getMessage() for r in caplog.records)


async def test_the_container_health_check_speaks_tls_and_mutual_tls_when_the_service_does(pki):
    """deploy/docker/healthcheck.py (HEALTHCHECK, and the exec probes of the secure Kubernetes
    overlay): SERVING through TLS with the CA it is given; without the CA it fails, as it must."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "deploy" / "docker" / "healthcheck.py"

    def check(port: int, *args: str, **env) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GFPGAN_")}
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              timeout=30,
                              env={**clean, "GFPGAN_PORT": str(port), "PYTHONPATH": str(script.parents[2]),
                                   **env})

    async with running(FakePipeline(), tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                       tls_client_ca=pki["client_ca"]) as app:
        tls = dict(GFPGAN_TLS_CERT=pki["server_cert"], GFPGAN_TLS_CA=pki["server_ca"])
        ok = await asyncio.to_thread(check, app.port, **tls, GFPGAN_CLIENT_CERT=pki["client_cert"],
                                     GFPGAN_CLIENT_KEY=pki["client_key"])
        no_client_cert = await asyncio.to_thread(check, app.port, **tls)
        no_tls = await asyncio.to_thread(check, app.port)
    async with running(FakePipeline()) as app:
        plain = await asyncio.to_thread(check, app.port)
        whole = await asyncio.to_thread(check, app.port, "--service", "")
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    assert whole.returncode == 0 and "'': SERVING" in whole.stdout
    assert no_client_cert.returncode == 1 and no_tls.returncode == 1
    assert plain.returncode == 0 and "SERVING" in plain.stdout


async def test_the_adapter_and_the_cli_reach_a_service_with_tls_and_a_token(pki, tmp_path, monkeypatch):
    """The MuseTalk adapter (its tls_ca / token_file settings, or GFPGAN_TOKEN) and
    gfpgan-enhance (--tls-ca, GFPGAN_TOKEN): enhanced faces; with no token the adapter stops at
    start saying the credentials were refused, instead of falling back on every batch."""
    import cv2

    from client.cli import main as cli_main
    from musetalk_adapter import GFPGANEnhancer, SettingsError
    from tests.faces import make_faces

    token_file = tmp_path / "token"
    token_file.write_text(TOKENS[0] + "\n")
    for index, face in enumerate(make_faces(2, size=64)):
        (tmp_path / "in").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "in" / f"{index}.png"), face)
    pipeline = FakePipeline()
    async with running(pipeline, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                       auth_tokens_file=pki["tokens"]) as app:
        address = f"localhost:{app.port}"

        def adapter():
            with GFPGANEnhancer(address=address, tls_ca=pki["server_ca"], token_file=str(token_file),
                                alignment="aligned") as enhancer:
                return enhancer.enhance_batch(make_faces(3, size=64)), enhancer.summary

        def adapter_without_token():
            GFPGANEnhancer(address=address, tls_ca=pki["server_ca"])

        def cli():
            monkeypatch.setenv("GFPGAN_TOKEN", TOKENS[1])
            try:
                cli_main(["--address", address, "--tls-ca", pki["server_ca"], "--quiet",
                          "-o", str(tmp_path / "out"), str(tmp_path / "in")])
            except SystemExit as exited:
                return exited.code

        faces, summary = await asyncio.to_thread(adapter)
        with pytest.raises(SettingsError, match="refused this client's credentials"):
            await asyncio.to_thread(adapter_without_token)
        code = await asyncio.to_thread(cli)
    assert faces.shape == (3, 256, 256, 3)
    assert summary.faces_enhanced == 3 and summary.faces_fell_back == 0
    assert code == 0
    assert pipeline.faces_total == 5
